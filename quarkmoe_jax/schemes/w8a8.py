"""INT8 and FP8 W8A8 expert weights: vLLM's ``QuarkW8A8Int8MoEMethod`` and ``QuarkW8A8Fp8MoEMethod``.

Weights ``w13_weight [E, S*I, H]`` and ``w2_weight [E, H, I]`` (int8 or float8_e4m3fn) with float32 scales,
per output channel (``[E, S*I]``, ``[E, H]``) or per tensor (``[E, S]`` for w1/w3, ``[E]`` for w2). Static
activation scales ``[E]``. After loading each weight is one :class:`~quarkmoe_jax.formats.QArray` holding its
scales with their granularity: "channel", "tensor", or "shard" (Quark semantics' per-tensor w1 / w3 scales).

Post-load under ``semantics="vllm"`` (vLLM 0.33, in its order): zero points are dropped (symmetric kernels;
an asymmetric activation config runs as symmetric, with a warning); static input scales collapse to the max
over experts; per-tensor w1/w3 shards are requantized to the per-expert max scale through float16
(``q' = sat(RNE(fp16(q * s_shard) / s_max))``, e4m3 for FP8). INT8 per-tensor weights with dynamic per-tensor
activations run as W8A16 (vLLM's ``int8_w8a16`` config: activations not quantized).

Under ``semantics="quark"`` per-tensor shard scales stay per shard and static input scales per expert.

Beyond vLLM: every (weight, activation) granularity pair runs, e.g. per-channel weights with static
activations, where vLLM's legacy kernel mis-indexes the ``[E, N, 1]`` scales (a likely bug); we compute
``acc * s_a * s_w[n]``.
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_dtypes
import numpy as np

from quarkmoe_jax.errors import CheckpointError
from quarkmoe_jax.formats import scaled_qarray
from quarkmoe_jax.formats.quantizers import FP8_E4M3_MAX
from quarkmoe_jax.schemes.base import (
    ActivationQuant,
    MoEQuantConfig,
    MoEScheme,
    MoEShape,
    ParamSpec,
    WeightQuant,
    _as_float32,
    _copy_into,
    _scalar,
)

__all__ = ["Int8W8A8Scheme", "Fp8W8A8Scheme"]

_F32 = np.dtype(np.float32)


class _W8A8Scheme(MoEScheme):
    weight_dtype: np.dtype
    kind: str

    def __init__(self, config, semantics, weight_granularity: str, activation: ActivationQuant, name: str):
        super().__init__(config, semantics, name)
        if weight_granularity not in ("channel", "tensor"):
            raise ValueError(weight_granularity)
        self.weight_granularity = weight_granularity
        self.activation = activation
        self._nonzero_zero_points: list[str] = []

    @property
    def static_input_scales(self) -> bool:
        return self.activation.static_scaled

    def create_weights(self, shape: MoEShape) -> dict[str, ParamSpec]:
        self.shape = shape
        e, s, h, i = shape.num_experts, shape.num_shards, shape.hidden_size, shape.intermediate_size
        specs = {
            "w13_weight": ParamSpec((e, s * i, h), self.weight_dtype),
            "w2_weight": ParamSpec((e, h, i), self.weight_dtype),
        }
        if self.weight_granularity == "channel":
            specs["w13_weight_scale"] = ParamSpec((e, s * i), _F32, 1.0)
            specs["w2_weight_scale"] = ParamSpec((e, h), _F32, 1.0)
        else:
            specs["w13_weight_scale"] = ParamSpec((e, s), _F32, 1.0)
            specs["w2_weight_scale"] = ParamSpec((e,), _F32, 1.0)
        if self.static_input_scales:
            specs["w13_input_scale"] = ParamSpec((e,), _F32, 1.0)
            specs["w2_input_scale"] = ParamSpec((e,), _F32, 1.0)
        specs.update(self._bias_specs())
        return specs

    def required_suffixes(self) -> tuple[str, ...]:
        return ("weight", "weight_scale") + (("input_scale",) if self.static_input_scales else ())

    def _load_weight(self, buffers, tensor, expert, shard, name):
        if tensor.dtype != self.weight_dtype:
            raise CheckpointError(
                f"{name}: {self.kind} weights must be {self.weight_dtype}, found dtype {tensor.dtype}"
            )
        h, i = self.shape.hidden_size, self.shape.intermediate_size
        if shard == "w2":
            _copy_into(buffers["w2_weight"][expert], tensor, (h, i), name, "w2 weight")
        else:
            rows = self._rows(shard)
            _copy_into(
                buffers["w13_weight"][expert, rows], tensor, (rows.stop - rows.start, h), name, f"{shard} weight"
            )

    def _load_weight_scale(self, buffers, tensor, expert, shard, name):
        values = _as_float32(tensor, name)
        if self.values_checked and (not np.isfinite(values).all() or (values <= 0).any()):
            raise CheckpointError(f"{name}: weight scales must be finite and positive, found {values.ravel()[:4]}...")
        if self.weight_granularity == "tensor":
            value = _scalar(tensor, name, "per-tensor weight scale")
            if shard == "w2":
                buffers["w2_weight_scale"][expert] = value
            elif shard == "w13":
                buffers["w13_weight_scale"][expert, :] = value
            else:
                buffers["w13_weight_scale"][expert, 0 if shard == "w1" else 1] = value
            return
        n = self.shape.hidden_size if shard == "w2" else None
        if shard == "w2":
            target = buffers["w2_weight_scale"][expert]
        else:
            rows = self._rows(shard)
            target, n = buffers["w13_weight_scale"][expert, rows], rows.stop - rows.start
        if values.shape == (n, 1):
            values = values[:, 0]
        _copy_into(target, values, (n,), name, f"per-channel {shard} weight scale")

    def _load_weight_zero_point(self, buffers, tensor, expert, shard, name):
        self._check_zero_point(tensor, name)

    def _load_input_zero_point(self, buffers, tensor, expert, shard, name):
        self._check_zero_point(tensor, name)

    def _check_zero_point(self, tensor, name):
        tensor = np.asarray(tensor)
        if tensor.dtype.kind not in "iu":
            raise CheckpointError(f"{name}: zero points must be integers, found dtype {tensor.dtype}")
        if self.values_checked and np.any(tensor != 0):
            if self.numerics.asymmetric_int8_refused:
                index = tuple(int(i) for i in np.argwhere(tensor != 0)[0])
                raise CheckpointError(
                    f"{name}: expected zero points of 0, found {tensor[index]} at index {index}; nonzero zero "
                    "points (asymmetric quantization) are only supported with semantics='vllm', which treats them "
                    "as symmetric, as vLLM does"
                )
            self._nonzero_zero_points.append(name)

    def process_weights_after_loading(self, buffers: dict[str, np.ndarray]) -> dict[str, Any]:
        if self._nonzero_zero_points:
            warnings.warn(
                f"{len(self._nonzero_zero_points)} nonzero zero points (e.g. {self._nonzero_zero_points[0]}) "
                "discarded: asymmetric INT8 runs as symmetric, as in vLLM",
                stacklevel=2,
            )
        w13, w13_scale = buffers["w13_weight"], buffers["w13_weight_scale"]
        per_shard = self.numerics.tensor_weight_scales_per_shard
        if self.weight_granularity == "tensor" and not per_shard:
            w13, w13_scale = self._requantize_shards_to_max(w13, w13_scale)
        g13 = g2 = self.weight_granularity
        if g13 == "tensor" and per_shard:
            g13 = "shard"  # Quark keeps a per-tensor scale per w1 / w3 shard: [E, S]
        params: dict[str, Any] = {
            "w13": scaled_qarray(w13, w13_scale, g13),
            "w2": scaled_qarray(buffers["w2_weight"], buffers["w2_weight_scale"], g2),
        }
        params.update(self._bias_and_input_scale_params(buffers))
        return params

    def _requantize_shards_to_max(self, w13: np.ndarray, scales: np.ndarray):
        """vLLM: per expert, requantize each w1/w3 shard to ``max`` of the shard scales, through float16."""
        s_max = scales.max(axis=1)
        out = w13.copy()
        rows_per_shard = self.shape.intermediate_size
        for e in range(w13.shape[0]):
            for j in range(scales.shape[1]):
                if scales[e, j] == s_max[e]:
                    continue
                rows = slice(j * rows_per_shard, (j + 1) * rows_per_shard)
                dequant = (w13[e, rows].astype(np.float32) * scales[e, j]).astype(np.float16).astype(np.float32)
                out[e, rows] = self._requantize(dequant, s_max[e])
        return out, s_max.astype(np.float32)

    def quant_config(self) -> MoEQuantConfig:
        granularity = self.weight_granularity
        if granularity == "tensor" and self.numerics.tensor_weight_scales_per_shard:
            granularity = "shard"
        activation = self.activation
        if (
            self.kind == "int8"
            and self.numerics.int8_w8a16_for_dynamic_tensor
            and self.weight_granularity == "tensor"
            and activation.dynamic
            and activation.granularity == "tensor"
        ):
            activation = ActivationQuant("none")  # vLLM 0.33 builds int8_w8a16 for this pair
        return MoEQuantConfig(self.name, WeightQuant(self.kind, None, granularity), activation, self.semantics)


class Int8W8A8Scheme(_W8A8Scheme):
    """Symmetric INT8 weights (per-channel or per-tensor) with static or dynamic INT8 activations."""

    vllm_method = "QuarkW8A8Int8MoEMethod"
    weight_dtype = np.dtype(np.int8)
    kind = "int8"

    @staticmethod
    def _requantize(values: np.ndarray, scale: np.float32) -> np.ndarray:
        return np.clip(np.rint(values / scale), -128, 127).astype(np.int8)


class Fp8W8A8Scheme(_W8A8Scheme):
    """FP8 e4m3fn weights (per-channel or per-tensor) with static or dynamic FP8 activations."""

    vllm_method = "QuarkW8A8Fp8MoEMethod"
    weight_dtype = np.dtype(ml_dtypes.float8_e4m3fn)
    kind = "fp8"

    @staticmethod
    def _requantize(values: np.ndarray, scale: np.float32) -> np.ndarray:
        scaled = values * (np.float32(1.0) / np.float32(scale))
        return np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
