"""The MoE quantization-scheme lifecycle, named as in vLLM's ``FusedMoEMethodBase``.

A scheme owns how one MoE layer's expert parameters look and how they get there:

1. :meth:`MoEScheme.create_weights` -> ``{param_name: ParamSpec}``: exact shapes and dtypes (as vLLM creates
   them), with hidden / intermediate sizes padded where the scheme needs it.
2. :meth:`MoEScheme.load_weights`: copy one checkpoint tensor (one expert, one shard) into host buffers,
   checking its dtype, shape and values; errors name the checkpoint tensor.
3. :meth:`MoEScheme.process_weights_after_loading`: vLLM's post-load transforms under ``semantics="vllm"``
   (collapse static input scales, requantize per-tensor shards, drop zero points) or Quark's fake-quant view
   under ``semantics="quark"``; returns the device arrays the module keeps.
4. :meth:`MoEScheme.quant_config`: what the forward needs to know (weight and activation quantization).

Parameter names follow vLLM: ``w13_weight [E, S*I, H]`` (S = 2 gate+up shards, 1 for non-gated
activations), ``w2_weight [E, H, I]``, ``w13_weight_scale``, ``w2_weight_scale``, ``w13_input_scale``,
``w2_input_scale``, ``w13_bias [E, S*I]``, ``w2_bias [E, H]``, zero points.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.contracts import (
    SEMANTICS,
    ActivationQuant,
    MoEQuantConfig,
    MoEShape,
    Numerics,
    WeightQuant,
)
from quarkmoe_jax.errors import CheckpointError, SchemeError
from quarkmoe_jax.quark_config import LayerQuantConfig

__all__ = [
    "SEMANTICS",
    "Shard",
    "MoEShape",
    "ParamSpec",
    "WeightQuant",
    "ActivationQuant",
    "MoEQuantConfig",
    "MoEScheme",
    "SchemeError",
    "HeaderCheckBuffer",
]

Shard = Literal["w1", "w3", "w2", "w13"]  # "w13": fused gate+up (interleaved gpt-oss layout)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A parameter created by ``create_weights``: shape, numpy dtype and initial fill value."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: float | int = 0

    def allocate(self) -> np.ndarray:
        return np.full(self.shape, self.fill, dtype=self.dtype)


def shard_rows(shape: MoEShape, shard: Shard, padded_intermediate: int) -> slice:
    """Rows of ``w13`` that a w1 (gate) or w3 (up) shard fills: ``[0, I)`` and ``[I_pad, I_pad + I)``."""
    if shard == "w1":
        return slice(0, shape.intermediate_size)
    if shard == "w3":
        if not shape.gated:
            raise CheckpointError("w3 (up_proj) given for a non-gated activation, whose w13 has one shard")
        return slice(padded_intermediate, padded_intermediate + shape.intermediate_size)
    raise ValueError(shard)


class MoEScheme(abc.ABC):
    """Base class of the quantization schemes. Subclasses mirror vLLM's Quark MoE methods."""

    #: vLLM's class this scheme mirrors, for messages and docs.
    vllm_method: str = ""

    def __init__(self, config: LayerQuantConfig | None, semantics: str = "vllm", name: str = ""):
        self.numerics = Numerics.of(semantics)  # what the semantics changes, read as flags
        self.config = config
        self.semantics = self.numerics.semantics
        self.name = name
        self.shape: MoEShape | None = None
        self._loaded_input_scales: dict[tuple[str, int], float] = {}  # (param, expert) -> value, w1/w3 share
        #: False while ``quarkmoe inspect`` checks names, dtypes and shapes from the headers alone
        #: (:class:`HeaderCheckBuffer`): the handlers skip the checks that need the tensor's values.
        self.values_checked = True

    # -- lifecycle ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def create_weights(self, shape: MoEShape) -> dict[str, ParamSpec]:
        """Parameter specs of one layer. Remembers ``shape`` for the later steps."""

    def load_weights(
        self, buffers: dict[str, np.ndarray], suffix: str, tensor: np.ndarray, expert: int, shard: Shard, name: str
    ) -> None:
        """Copy one checkpoint tensor into ``buffers``.

        Args:
          buffers: host arrays allocated from :meth:`create_weights`.
          suffix: the checkpoint tensor's kind: "weight", "weight_scale", "input_scale", "bias",
            "weight_zero_point" or "input_zero_point".
          tensor: the tensor for one expert and one shard (w1, w3 or w2).
          expert: local expert index.
          shard: "w1" (gate), "w3" (up) or "w2" (down).
          name: the checkpoint tensor's name, for error messages.
        """
        handler = getattr(self, f"_load_{suffix}", None)
        if handler is None:
            raise CheckpointError(f"{name}: a {self.name} checkpoint has no {suffix!r} tensors")
        handler(buffers, tensor, expert, shard, name)

    @abc.abstractmethod
    def process_weights_after_loading(self, buffers: dict[str, np.ndarray]) -> dict[str, Any]:
        """Post-load transforms; returns the parameters the module keeps: QArray weights holding their scales,
        biases and input scales as arrays."""

    @abc.abstractmethod
    def quant_config(self) -> MoEQuantConfig:
        """The layer's quantization, for the forward."""

    # -- helpers shared by the schemes ----------------------------------------------------------------

    @property
    def padded_intermediate(self) -> int:
        return self.shape.intermediate_size

    @property
    def padded_hidden(self) -> int:
        return self.shape.hidden_size

    def _bias_specs(self) -> dict[str, ParamSpec]:
        s = self.shape
        if not s.has_bias:
            return {}
        return {
            "w13_bias": ParamSpec((s.num_experts, s.num_shards * self.padded_intermediate), np.dtype(np.float32)),
            "w2_bias": ParamSpec((s.num_experts, self.padded_hidden), np.dtype(np.float32)),
        }

    def _rows(self, shard: str) -> slice:
        """Rows of w13 that a shard fills; "w13" is a fused gate+up tensor (gpt-oss's interleaved layout)."""
        if shard == "w13":
            return slice(0, self.shape.num_shards * self.shape.intermediate_size)
        if self.shape.interleaved:
            raise CheckpointError("gpt-oss checkpoints store gate and up fused (gate_up_proj); got a separate shard")
        return shard_rows(self.shape, shard, self.padded_intermediate)

    def _load_bias(self, buffers, tensor, expert, shard, name):
        if "w13_bias" not in buffers:
            raise CheckpointError(f"{name}: bias found but the layer was created without bias")
        tensor = _as_float32(tensor, name)
        if shard == "w2":
            _copy_into(buffers["w2_bias"][expert], tensor, (self.shape.hidden_size,), name, "w2 bias")
        else:
            rows = self._rows(shard)
            _copy_into(buffers["w13_bias"][expert, rows], tensor, (rows.stop - rows.start,), name, f"{shard} bias")

    def _load_input_scale(self, buffers, tensor, expert, shard, name):
        key = "w2_input_scale" if shard == "w2" else "w13_input_scale"
        if key not in buffers:
            raise CheckpointError(f"{name}: input_scale found but scheme {self.name} has no static input scales")
        value = _scalar(tensor, name, "input scale")
        if not self.values_checked:
            return
        if not np.isfinite(value) or value <= 0:
            raise CheckpointError(f"{name}: input scale must be finite and positive, found {value}")
        loaded = self._loaded_input_scales.setdefault((key, expert), value)
        if loaded != value:  # w1 and w3 write the same slot; keep the larger one (vLLM keeps the last)
            warnings.warn(
                f"{name}: gate and up input scales differ ({loaded} vs {value}) for expert {expert}; using the larger",
                stacklevel=3,
            )
        buffers[key][expert] = max(loaded, value)

    def _bias_and_input_scale_params(self, buffers: dict[str, np.ndarray]) -> dict[str, Any]:
        """Biases as they are; static input scales per expert (Quark) or max over experts, 0-d (vLLM)."""
        out = {key: jnp.asarray(buffers[key]) for key in ("w13_bias", "w2_bias") if key in buffers}
        for key in ("w13_input_scale", "w2_input_scale"):
            if key not in buffers:
                continue
            scales = buffers[key]
            if not self.numerics.static_input_scales_per_expert:
                if not np.allclose(scales, scales.max()):
                    warnings.warn(
                        f"{key}: static input scales differ across experts (min {scales.min():g}, max "
                        f"{scales.max():g}); vLLM semantics use the maximum for all experts",
                        stacklevel=3,
                    )
                out[key] = jnp.asarray(scales.max(), jnp.float32)
            else:
                out[key] = jnp.asarray(scales, jnp.float32)
        return out


class HeaderCheckBuffer:
    """Stands in for a parameter buffer when only the checkpoint's headers are checked: indexing returns the
    buffer itself and writes are dropped, so ``load_weights`` checks dtypes and shapes without allocating."""

    def __getitem__(self, index):
        return self

    def __setitem__(self, index, value) -> None:
        pass


def _as_float32(tensor: np.ndarray, name: str) -> np.ndarray:
    if tensor.dtype.kind != "f" and tensor.dtype.name not in ("bfloat16",):
        raise CheckpointError(f"{name}: expected a float tensor, found dtype {tensor.dtype}")
    return np.asarray(tensor, np.float32)


def _scalar(tensor: np.ndarray, name: str, what: str) -> float:
    if tensor.size != 1:
        raise CheckpointError(f"{name}: {what} must be a scalar (per-tensor), found shape {tuple(tensor.shape)}")
    return float(_as_float32(tensor, name).reshape(()))


def _copy_into(target: np.ndarray, tensor: np.ndarray, expected_shape: tuple[int, ...], name: str, what: str) -> None:
    """``target[...] = tensor`` after checking ``tensor`` has exactly ``expected_shape``.

    ``target`` may be larger (padding): the tensor fills its leading corner.
    """
    if tuple(tensor.shape) != tuple(expected_shape):
        raise CheckpointError(f"{name}: {what} shape {tuple(tensor.shape)}, expected {tuple(expected_shape)}")
    index = tuple(slice(0, n) for n in expected_shape)
    target[index] = tensor
