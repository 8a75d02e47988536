"""The ``pallas`` backend: the MoE experts forward on the fused grouped-GEMM kernels.

Same signature and result as the emulation oracle (:mod:`quarkmoe_jax.moe.emulation`), computed as:

1. Sort the (token, k) pairs by local expert and pad each expert's group to the kernel's row tile
   (:mod:`quarkmoe_jax.moe.dispatch`); all static shapes, no host sync.
2. Quantize the GEMM1 input with the oracle's own quantizer (once per token, fused by XLA with the gather
   into the padded row layout), so the operand is the oracle's bit for bit.
3. GEMM1 kernel: MX weights decoded in the kernel (or bfloat16 weights), bias and the gated activation in the
   epilogue, intermediate written in the activation dtype.
   With many rows per expert (prefill) the MX weights are instead dequantized to bfloat16 a bounded chunk of
   experts at a time (:data:`PREFILL_DEQUANT_CAP_BYTES`) and multiplied by the same kernel with dense tiles:
   on an H100 that is faster than decoding each weight tile once per row tile (docs/performance.md).
4. The intermediate's quantization (MX / FP8 schemes) with the oracle's quantizer.
5. GEMM2 kernel: bias and router weight in the epilogue.
6. Combine: each token gathers its k rows and sums them in float32 (deterministic; no atomics).

What it does not take (it raises ``NotImplementedError``, and ``backend="auto"`` moves on): W8A8 INT8 / FP8
weights (their tensor-core kernels are a later issue), Quark's per-channel dynamic activation scales, and
FP6 weights whose K is not a multiple of 64. The exact gelu (erf) has no Triton lowering: for it the GEMM1
kernel writes the pre-activation and XLA applies the activation.

Weights are read in the kernel layout (:mod:`quarkmoe_jax.formats.kernel_layout`); ``MXTensor`` weights in
Quark's layout are re-laid on every call, which costs a pass over the weights: re-lay them once after loading
(``QuarkMoE.prepare_for_kernels()``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quarkmoe_jax.formats import MXTensor
from quarkmoe_jax.formats import quantizers as qz
from quarkmoe_jax.formats.kernel_layout import DEFAULT_CHUNK, MXKernelWeights, to_kernel_layout
from quarkmoe_jax.kernels.configs import dequant_min_rows, tile_configs
from quarkmoe_jax.kernels.grouped_gemm import Epilogue, TileConfig, dequantize_to_bfloat16, grouped_gemm
from quarkmoe_jax.moe.activations import apply_activation
from quarkmoe_jax.moe.dispatch import sort_pairs, tile_rows
from quarkmoe_jax.moe.emulation import (
    bucketed_backend,
    prepare_expert_input,
    quantize_gemm_input,
    static_input_scale,
)

__all__ = ["moe_experts", "kernel_weights", "UNFUSED_ACTIVATIONS", "PREFILL_DEQUANT_CAP_BYTES"]

PREFILL_DEQUANT_CAP_BYTES = 1 << 30
"""Prefill dequantizes at most this many bytes of bfloat16 weights per chunk of experts (XLA may overlap
one chunk's dequantize with the previous chunk's GEMM, so at most twice this is live)."""

UNFUSED_ACTIVATIONS = ("gelu", "gelu_no_mul")
"""Activations applied by XLA after GEMM1 (the Triton dialect has no erf)."""


def kernel_weights(weight, name: str):
    """``weight`` as the kernels read it: :class:`MXKernelWeights`, or a float ``[E, N, K]`` array."""
    if isinstance(weight, MXKernelWeights):
        return weight
    if isinstance(weight, MXTensor):
        try:
            return to_kernel_layout(weight, DEFAULT_CHUNK)
        except ValueError as e:
            raise NotImplementedError(f"pallas backend: {name}: {e}") from None
    if jnp.issubdtype(weight.dtype, jnp.floating):
        return weight
    raise NotImplementedError(f"pallas backend: {name} of dtype {weight.dtype} (W8A8 weights) is not supported yet")


def _fit_block_n(config: TileConfig, n: int) -> TileConfig:
    block_n = config.block_n
    while n % block_n:
        block_n //= 2
    if block_n < 16:
        raise NotImplementedError(f"pallas backend: N = {n} has no power-of-two tile >= 16")
    return dataclasses.replace(config, block_n=block_n)


def _padded(values, row_sorted, fill=0):
    """Rows in sorted-pair order ``[P, ...]`` -> the padded row layout ``[M_pad, ...]`` (``fill`` in padding)."""
    return jnp.take(values, row_sorted, axis=0, mode="fill", fill_value=fill)


def _gemm_operand(values, act, weight_kind, static_scale, semantics):
    """The GEMM operand and its per-row scale (``None`` or ``[rows]`` float32).

    Wherever the oracle's operand is exact in bfloat16 (MX activations, any bfloat16 data) it is used as is.
    FP8 fake-quantized float32 activations are not (the oracle dequantizes ``q * s`` in float32, rounded
    through float16 under vLLM semantics): they go in as their e4m3 values, exact in bfloat16, and the scale
    multiplies the float32 accumulator in the epilogue, as vLLM's FP8 kernels do (a difference at float16
    rounding, ~5e-4).
    """
    if act.kind == "fp8" and values.dtype != jnp.bfloat16:
        granularity = act.granularity or "tensor"
        scale = None if act.dynamic else static_scale
        q, scale = qz.fp8_quantize(values, scale, granularity=granularity, semantics=semantics)
        rows = jnp.broadcast_to(jnp.reshape(scale, (-1,)) if jnp.ndim(scale) else scale, (values.shape[0],))
        return q.astype(jnp.bfloat16), rows.astype(jnp.float32)
    operand, a_scale = quantize_gemm_input(values, act, weight_kind, static_scale, semantics)
    if a_scale is not None:
        raise NotImplementedError("pallas backend: integer GEMM operands (W8A8) are not supported yet")
    return operand, None


def _padded_scale(scale, rows):
    return None if scale is None else _padded(scale, rows, fill=0)


def _gemm(a, weight, tile_expert, bias, row_weights, row_scales, *, n_out, config, epilogue, dtype, interpret, dequant):
    """One GEMM: the fused kernel, or (``dequant``, prefill) bounded expert chunks dequantized to bfloat16
    and multiplied by the same kernel with dense tiles, all chunks writing into one output buffer."""
    kwargs = dict(n_out=n_out, config=config, epilogue=epilogue, out_dtype=dtype, interpret=interpret)
    if not (dequant and isinstance(weight, MXKernelWeights)):
        return grouped_gemm(a, weight, tile_expert, bias, row_weights, row_scales, **kwargs)
    num_experts, n, k = weight.shape
    per_chunk = max(1, PREFILL_DEQUANT_CAP_BYTES // (2 * n * k))
    out = None
    for first in range(0, num_experts, per_chunk):
        last = min(num_experts, first + per_chunk)
        dense = dequantize_to_bfloat16(weight[first:last], interpret=interpret)
        in_chunk = (tile_expert >= first) & (tile_expert < last)
        chunk_bias = None if bias is None else bias[first:last]
        out = grouped_gemm(
            a, dense, jnp.where(in_chunk, tile_expert - first, -1), chunk_bias, row_weights, row_scales, out, **kwargs
        )
    return out


def _pallas_core(
    x,
    topk_weights,
    topk_ids,
    valid_tokens,
    params,
    *,
    expert_map,
    quant_config,
    shape,
    activation,
    swiglu_limit,
    apply_router_weight_on_input,
):
    """Fused Pallas kernels (:mod:`quarkmoe_jax.moe.pallas_backend`)."""
    act = quant_config.activation
    if act.granularity == "channel":
        raise NotImplementedError("pallas backend: per-channel dynamic activation scales (Quark) are not supported")
    w13 = kernel_weights(params["w13"], "w13")
    w2 = kernel_weights(params["w2"], "w2")
    if params.get("w13_weight_scale") is not None or params.get("w2_weight_scale") is not None:
        raise NotImplementedError("pallas backend: weights with float scales (W8A8) are not supported yet")

    dtype = x.dtype
    t, k = topk_ids.shape
    num_local, n13, h_pad = w13.shape[0], w13.shape[1], w13.shape[2]
    i_pad = w2.shape[2]
    hidden = x.shape[1]
    x, shards = prepare_expert_input(x, topk_weights, w13.shape, i_pad, activation, apply_router_weight_on_input)
    gated = shards == 2

    num_pairs = t * k
    device_kind = jax.devices()[0].device_kind
    touched = max(1, min(num_local, num_pairs))
    rows_per_expert = num_pairs / touched
    config1, config2 = tile_configs(device_kind, rows_per_expert, touched)
    dequant = rows_per_expert >= dequant_min_rows(device_kind)
    if config1.block_m != config2.block_m:
        raise ValueError("GEMM1 and GEMM2 tile configs must share block_m (they share the row layout)")
    interpret = jax.default_backend() == "cpu"
    pairs = sort_pairs(topk_ids, valid_tokens, expert_map, num_local)
    tiled = tile_rows(pairs, config1.block_m)

    weight_kind = quant_config.weight.kind
    semantics = quant_config.semantics
    static13 = static_input_scale(params, "w13_input_scale", pairs.rows_expert)
    if static13 is not None and static13.ndim == 2:  # per-expert static scales: quantize each pair
        operand, a_scale = _gemm_operand(x[pairs.rows_token], act, weight_kind, static13, semantics)
        a1, scale1 = _padded(operand, tiled.row_sorted), _padded_scale(a_scale, tiled.row_sorted)
    else:  # quantize each token once, gather it into its rows
        operand, a_scale = _gemm_operand(x, act, weight_kind, static13, semantics)
        row_token = _padded(pairs.rows_token, tiled.row_sorted, fill=t)
        a1, scale1 = _padded(operand, row_token), _padded_scale(a_scale, row_token)

    fused = activation not in UNFUSED_ACTIVATIONS
    epilogue1 = Epilogue(
        activation=activation if fused else None,
        gated=gated and fused,
        interleaved=activation == "swigluoai",
        swiglu_limit=swiglu_limit,
        activation_dtype=jnp.dtype(dtype).name,
        has_bias=params.get("w13_bias") is not None,
        row_scales=scale1 is not None,
    )
    h = _gemm(
        a1,
        w13,
        tiled.tile_expert,
        params.get("w13_bias"),
        None,
        scale1,
        n_out=i_pad if fused else n13,
        config=_fit_block_n(config1, i_pad if fused else n13),
        epilogue=epilogue1,
        dtype=dtype,
        interpret=interpret,
        dequant=dequant,
    )
    if not fused:
        h = apply_activation(h, activation, limit=swiglu_limit)
    if act.kind == "fp8":  # dynamic per-tensor scales see only real rows, as in the oracle
        row_valid = tiled.row_sorted < num_pairs
        h = jnp.where(row_valid[:, None], h, 0).astype(dtype)

    static2 = static_input_scale(params, "w2_input_scale", pairs.rows_expert)
    if static2 is not None and static2.ndim == 2:
        static2 = _padded(static2, tiled.row_sorted, fill=1)
    a2, a_scale = _gemm_operand(h, act, weight_kind, static2, semantics)
    scale2 = _padded_scale(a_scale, jnp.arange(h.shape[0]))

    row_weights = None
    if not apply_router_weight_on_input:
        row_weights = _padded(topk_weights.reshape(-1).astype(jnp.float32)[pairs.order], tiled.row_sorted)
    y = _gemm(
        a2,
        w2,
        tiled.tile_expert,
        params.get("w2_bias"),
        row_weights,
        scale2,
        n_out=h_pad,
        config=_fit_block_n(config2, h_pad),
        epilogue=Epilogue(
            has_bias=params.get("w2_bias") is not None,
            row_weights=row_weights is not None,
            row_scales=scale2 is not None,
        ),
        dtype=dtype,
        interpret=interpret,
        dequant=dequant,
    )
    # Each pair's padded row (invalid pairs read the fill row: zero), in the original (token, k) order.
    pair_row = jnp.zeros((num_pairs,), jnp.int32).at[pairs.order].set(tiled.pair_row)
    per_pair = jnp.take(y, pair_row, axis=0, mode="fill", fill_value=0)
    out = per_pair.reshape(t, k, h_pad).astype(jnp.float32).sum(axis=1).astype(dtype)
    return out[:, :hidden]


moe_experts = bucketed_backend(_pallas_core)
