"""OCP MX weights (MXFP4 / MXFP6 / MXFP8) with any activation quantization: vLLM's ``QuarkOCP_MX_MoEMethod``
and, for MXFP8 (e4m3 elements), ``QuarkW8A8Mxfp8MoEMethod``.

Weights stay packed exactly as Quark wrote them: ``w13_weight`` uint8 ``[E, S*I, packed(H)]``, ``w2_weight``
uint8 ``[E, H, packed(I)]`` (MXFP8: one e4m3 code per byte; a float8_e4m3fn checkpoint tensor is read as its
bit pattern) and E8M0 scales ``[E, N, K/32]``, wrapped in a checkpoint-layout :class:`QArray`. Hidden and
intermediate sizes are padded up to a multiple of 32 (zero codes, scale code 127 = 1.0), as vLLM's emulation
does.

Activations: none (W4A16 / W6A16 / W8A16), dynamic MXFP4 / MXFP6 / MXFP8, static per-tensor FP8, or dynamic
FP8 per token / per tensor. vLLM's MXFP8 method takes no bias; here a bias is added as for the other schemes.
vLLM runs 7 of these pairs; it refuses weight-only MXFP6 (an assertion), MXFP6 weights with FP8
activations and any MX weights with dynamic FP8 activations, and pairs outside its table (e.g. MXFP6 weights
with MXFP4 activations). Every pair is well defined (dequantize the weights, fake-quantize the GEMM inputs),
so we run all of them.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.errors import CheckpointError
from quarkmoe_jax.formats import E8M0_NAN, E8M0_ONE, MX_BLOCK_SIZE, QArray, mx_format, round_up
from quarkmoe_jax.schemes.base import (
    ActivationQuant,
    MoEQuantConfig,
    MoEScheme,
    MoEShape,
    ParamSpec,
    WeightQuant,
    _copy_into,
)

__all__ = ["OcpMxScheme"]


class OcpMxScheme(MoEScheme):
    """MX-packed expert weights; see the module docstring for the activation options."""

    vllm_method = "QuarkOCP_MX_MoEMethod"

    def __init__(self, config, semantics: str, weight_format: str, activation: ActivationQuant, name: str):
        super().__init__(config, semantics, name)
        self.weight_format = mx_format(weight_format)
        self.activation = activation

    @property
    def static_input_scales(self) -> bool:
        return self.activation.static_scaled

    @property
    def padded_intermediate(self) -> int:
        return round_up(self.shape.intermediate_size)

    @property
    def padded_hidden(self) -> int:
        return round_up(self.shape.hidden_size)

    def create_weights(self, shape: MoEShape) -> dict[str, ParamSpec]:
        self.shape = shape
        fmt, e, s = self.weight_format, shape.num_experts, shape.num_shards
        h, i = self.padded_hidden, self.padded_intermediate
        u8 = np.dtype(np.uint8)
        specs = {
            "w13_weight": ParamSpec((e, s * i, fmt.packed_length(h)), u8),
            "w2_weight": ParamSpec((e, h, fmt.packed_length(i)), u8),
            "w13_weight_scale": ParamSpec((e, s * i, h // MX_BLOCK_SIZE), u8, E8M0_ONE),
            "w2_weight_scale": ParamSpec((e, h, i // MX_BLOCK_SIZE), u8, E8M0_ONE),
        }
        if self.static_input_scales:
            specs["w13_input_scale"] = ParamSpec((e,), np.dtype(np.float32), 1.0)
            specs["w2_input_scale"] = ParamSpec((e,), np.dtype(np.float32), 1.0)
        specs.update(self._bias_specs())
        return specs

    def required_suffixes(self) -> tuple[str, ...]:
        return ("weight", "weight_scale") + (("input_scale",) if self.static_input_scales else ())

    def _logical_k(self, shard) -> int:
        """Contraction length of a shard in the checkpoint (before padding)."""
        return self.shape.intermediate_size if shard == "w2" else self.shape.hidden_size

    def _target(self, buffers, key, expert, shard):
        if shard == "w2":
            return buffers[f"w2_{key}"][expert], self.shape.hidden_size
        rows = self._rows(shard)
        return buffers[f"w13_{key}"][expert, rows], rows.stop - rows.start

    def _load_weight(self, buffers, tensor, expert, shard, name):
        fmt = self.weight_format
        if tensor.dtype in fmt.code_dtypes:  # MXFP8 codes may be stored as e4m3 values: read their bytes
            tensor = tensor.view(np.uint8)
        if tensor.dtype != np.uint8:
            stored = " or ".join(["uint8 codes", *(str(d) for d in fmt.code_dtypes[1:])])
            raise CheckpointError(f"{name}: packed {fmt.name} weights must be {stored}, found dtype {tensor.dtype}")
        k = self._logical_k(shard)
        if (k * fmt.bits) % 8:
            raise CheckpointError(f"{name}: contraction length {k} cannot be packed as {fmt.name}")
        target, rows = self._target(buffers, "weight", expert, shard)
        _copy_into(target, tensor, (rows, fmt.packed_length(k)), name, f"packed {fmt.name} {shard} weight")

    def _load_weight_scale(self, buffers, tensor, expert, shard, name):
        if tensor.dtype != np.uint8:
            raise CheckpointError(f"{name}: E8M0 weight scales must be uint8, found dtype {tensor.dtype}")
        if self.values_checked and (tensor == E8M0_NAN).any():
            where = tuple(int(i) for i in np.argwhere(tensor == E8M0_NAN)[0])
            raise CheckpointError(f"{name}: E8M0 code 255 (NaN) in a weight scale, first at index {where}")
        target, rows = self._target(buffers, "weight_scale", expert, shard)
        blocks = -(-self._logical_k(shard) // MX_BLOCK_SIZE)
        _copy_into(target, tensor, (rows, blocks), name, f"E8M0 {shard} weight scale (one per 32 elements)")

    def process_weights_after_loading(self, buffers: dict[str, np.ndarray]) -> dict[str, Any]:
        fmt = self.weight_format
        params: dict[str, Any] = {
            "w13": QArray(jnp.asarray(buffers["w13_weight"]), jnp.asarray(buffers["w13_weight_scale"]), fmt),
            "w2": QArray(jnp.asarray(buffers["w2_weight"]), jnp.asarray(buffers["w2_weight_scale"]), fmt),
        }
        params.update(self._bias_and_input_scale_params(buffers))
        return params

    def quant_config(self) -> MoEQuantConfig:
        return MoEQuantConfig(self.name, WeightQuant("mx", self.weight_format.name), self.activation, self.semantics)
