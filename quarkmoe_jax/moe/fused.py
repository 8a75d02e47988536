"""The MoE experts forward on fused grouped-GEMM kernels, shared by every kernel backend.

A :class:`~quarkmoe_jax.kernels.base.KernelBackend` (``kernels/pallas/``, ``kernels/triton/``) brings its
grouped GEMM, its MX weight layout and its tile rules; :func:`fused_core` builds the forward around it.
Same signature and result as the emulation oracle (:mod:`quarkmoe_jax.moe.emulation`), computed as:

1. Sort the (token, k) pairs by local expert and pad each expert's group to the kernel's row tile
   (:mod:`quarkmoe_jax.moe.pair_sort`); all static shapes, no host sync.
2. Quantize the GEMM1 input with the oracle's own quantizer (once per token, fused by XLA with the gather
   into the padded row layout), so the operand is the oracle's bit for bit: MX / bfloat16 values, INT8 codes
   or FP8 e4m3 codes, the latter two with their per-row scale for the epilogue.
3. GEMM1 kernel: MX weights decoded in the kernel, or INT8 / FP8 / bfloat16 weights (int8 x int8 and
   e4m3 x e4m3 on the 8-bit tensor cores, W8A16 as bfloat16); activation and weight scales, bias and the
   gated activation in the epilogue, intermediate written in the activation dtype.
   Backends that say so (Pallas): with many rows per expert (prefill) the MX weights are instead
   dequantized to bfloat16 a bounded chunk of experts at a time (:data:`PREFILL_DEQUANT_CAP_BYTES`) and
   multiplied by the same kernel with dense tiles: on an H100 that is faster than decoding each weight
   tile once per row tile (docs/performance.md).
4. The intermediate's quantization (MX / FP8 schemes) with the oracle's quantizer.
5. GEMM2 kernel: bias and router weight in the epilogue.
6. Combine: each token gathers its k rows and sums them in float32 (deterministic; no atomics).

What it does not take (it raises ``NotImplementedError``, and ``backend="auto"`` moves on): Quark's
per-channel dynamic activation scales (one scale per input channel over each expert's rows), MXFP8 weights
(no kernel layout holds 8-bit MX codes yet), FP6 weights whose K is not a multiple of 64, dense weights whose
K is not a multiple of 16. The exact gelu
(erf) has no Pallas-Triton lowering: for it the GEMM1 kernel writes the pre-activation and XLA applies the
activation.

MX weights are read in the backend's layout (:attr:`KernelBackend.layout`); MX weights in another layout are
re-laid on every call, which costs a pass over the weights: the load lays them out once for the backend
``auto`` prefers (``QuarkMoE.prepare_for_kernels()``, :func:`quarkmoe_jax.kernels.registry.load_backend`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from quarkmoe_jax.activations import apply_activation
from quarkmoe_jax.contracts import Numerics
from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats import quantizers as qz
from quarkmoe_jax.kernels.base import DENSE_MIN_K, Epilogue, KernelBackend, expected_load, fp8_tensor_cores
from quarkmoe_jax.kernels.pallas.grouped_gemm import dequantize_to_bfloat16
from quarkmoe_jax.moe.gemm_io import (
    combine_pairs,
    expert_weights,
    prepare_expert_input,
    quantize_gemm_input,
    static_input_scale,
)
from quarkmoe_jax.moe.pair_sort import sort_pairs, tile_rows
from quarkmoe_jax.moe.shard_axes import ShardAxes

__all__ = ["fused_core", "kernel_weights", "linear_gemm", "UNFUSED_ACTIVATIONS", "PREFILL_DEQUANT_CAP_BYTES"]

PREFILL_DEQUANT_CAP_BYTES = 1 << 30
"""Prefill dequantizes at most this many bytes of bfloat16 weights per chunk of experts (XLA may overlap
one chunk's dequantize with the previous chunk's GEMM, so at most twice this is live)."""

UNFUSED_ACTIVATIONS = ("gelu", "gelu_no_mul")
"""Activations applied by XLA after GEMM1 (the Triton dialect has no erf)."""


def kernel_weights(weight: QArray, name: str, backend: KernelBackend):
    """``weight`` as ``backend``'s kernels read it: MX weights as a :class:`QArray` in its layout; 8-bit or
    float weights as their ``[E, N, K]`` values (8-bit scales go to the epilogue).
    MX weights in another layout are re-laid (a pass over them on every call: lay them out once after
    loading, ``QuarkMoE.prepare_for_kernels``)."""
    if isinstance(weight, QArray) and weight.kind == "mx":
        if backend.in_layout(weight):
            return weight
        try:
            return backend.to_layout(weight)
        except ValueError as e:
            raise NotImplementedError(f"{backend.name} backend: {name}: {e}") from None
    weight = weight.values
    if jnp.issubdtype(weight.dtype, jnp.floating) or weight.dtype == jnp.int8:
        if weight.shape[2] % DENSE_MIN_K:
            k = weight.shape[2]
            raise NotImplementedError(f"{backend.name} backend: {name} has K = {k}, not a multiple of {DENSE_MIN_K}")
        return weight
    raise NotImplementedError(f"{backend.name} backend: {name} of dtype {weight.dtype} is not supported")


def _padded(values, row_sorted, fill=0):
    """Rows in sorted-pair order ``[P, ...]`` -> the padded row layout ``[M_pad, ...]`` (``fill`` in padding)."""
    return jnp.take(values, row_sorted, axis=0, mode="fill", fill_value=fill)


def _row_scales(scale, num_rows: int):
    """An activation scale (scalar or ``[rows, 1]``) as float32 ``[rows]``."""
    scale = jnp.asarray(scale, jnp.float32)
    return jnp.broadcast_to(jnp.reshape(scale, (-1,)) if scale.ndim else scale, (num_rows,))


def _gemm_operand(values, act, weight_kind, static_scale, semantics, fp8_dot: bool, axis_name=()):
    """The GEMM operand and its per-row scale (``None`` or ``[rows]`` float32).

    The oracle's own operand (:func:`quantize_gemm_input`): MX / bfloat16 values as they are; INT8 codes and
    FP8 e4m3 codes (as float8_e4m3fn for the fp8 tensor cores when ``fp8_dot`` and the weights are FP8, else
    as bfloat16, exact) with their scale for the epilogue. One exception: Quark semantics fake-quantize FP8
    activations of MX weights, ``q * s`` in float32, which bfloat16 cannot hold; for float32 activations the
    codes go in and ``s`` multiplies the float32 accumulator (a difference at float32 rounding, ~1e-7).
    """
    if Numerics.of(semantics).fp8_input_fake_quant(act, weight_kind) and values.dtype != jnp.bfloat16:
        granularity = act.granularity or "tensor"
        scale = None if act.dynamic else static_scale
        kwargs = dict(granularity=granularity, semantics=semantics, axis_name=axis_name or None)
        q, scale = qz.fp8_quantize(values, scale, **kwargs)
        return q.astype(jnp.bfloat16), _row_scales(scale, values.shape[0])
    operand, a_scale = quantize_gemm_input(values, act, weight_kind, static_scale, semantics, axis_name)
    if a_scale is None:
        return operand, None
    if act.kind == "fp8":
        operand = operand.astype(jnp.float8_e4m3fn if fp8_dot and weight_kind == "fp8" else jnp.bfloat16)
    return operand, _row_scales(a_scale, values.shape[0])


def _padded_scale(scale, rows):
    return None if scale is None else _padded(scale, rows, fill=0)


def _gemm(a, weight, tile_expert, bias, row_weights, row_scales, col_scales, *, backend, config, dequant, **kwargs):
    """One GEMM on ``backend``: its fused kernel on ``config`` fitted to the launch, or (``dequant``, prefill)
    bounded expert chunks dequantized to bfloat16 and multiplied by the same kernel with dense tiles, all
    chunks writing into one output buffer."""
    n_out, num_tiles = kwargs["n_out"], tile_expert.shape[0]
    if not (dequant and isinstance(weight, QArray) and weight.kind == "mx"):
        tile = backend.fit_tile(config, n_out, weight, num_tiles)
        return backend.gemm(
            a, weight, tile_expert, bias, row_weights, row_scales, col_scales=col_scales, config=tile, **kwargs
        )
    num_experts, n, k = weight.shape
    per_chunk = max(1, PREFILL_DEQUANT_CAP_BYTES // (2 * n * k))
    out = None
    for first in range(0, num_experts, per_chunk):
        last = min(num_experts, first + per_chunk)
        dense = dequantize_to_bfloat16(weight[first:last], interpret=kwargs["interpret"])
        in_chunk = (tile_expert >= first) & (tile_expert < last)
        chunk_bias = None if bias is None else bias[first:last]
        tile = backend.fit_tile(config, n_out, dense, num_tiles)
        out = backend.gemm(
            a,
            dense,
            jnp.where(in_chunk, tile_expert - first, -1),
            chunk_bias,
            row_weights,
            row_scales,
            out,
            config=tile,
            **kwargs,
        )
    return out


def linear_gemm(x, weight: QArray, quant_config, backend: KernelBackend, static_scale=None):
    """A quantized Linear's GEMM on ``backend``'s grouped GEMM with one group: ``x [T, K]`` (the activation
    dtype) times ``weight [1, N, K]`` (one expert, MX codes in the backend's layout: decoded in the kernel, so
    a decode step reads the packed bytes once instead of dequantizing the whole weight) -> float32 ``[T, N]``.

    The input is quantized as the oracle's (:func:`quantize_gemm_input`) and its scale applied in the
    epilogue, so the result is :func:`quarkmoe_jax.moe.emulation.dense_gemm`'s to float32 summation order.
    """
    act = quant_config.activation
    if act.granularity == "channel":
        raise NotImplementedError(f"{backend.name} backend: per-channel dynamic activation scales")
    weight = kernel_weights(weight, "weight", backend)
    t = x.shape[0]
    n = weight.shape[1]
    device_kind = jax.devices()[0].device_kind
    mx = isinstance(weight, QArray) and weight.kind == "mx"
    config, _ = backend.tiles(device_kind, expected_load(t, 1, 1), (weight.shape[2], weight.shape[2]), mx)
    num_tiles = -(-t // config.block_m)
    operand, a_scale = _gemm_operand(
        x,
        act,
        quant_config.weight.kind,
        static_scale,
        semantics=quant_config.semantics,
        fp8_dot=fp8_tensor_cores(device_kind),
    )
    rows = num_tiles * config.block_m - t
    operand = jnp.pad(operand, ((0, rows), (0, 0)))
    row_scales = None if a_scale is None else jnp.pad(a_scale, (0, rows))
    y = _gemm(
        operand,
        weight,
        jnp.zeros((num_tiles,), jnp.int32),
        None,
        None,
        row_scales,
        None,
        n_out=n,
        config=config,
        epilogue=Epilogue(row_scales=row_scales is not None, activation_dtype=jnp.dtype(x.dtype).name),
        backend=backend,
        out_dtype=jnp.float32,
        interpret=jax.default_backend() == "cpu",
        dequant=False,
    )
    return y[:t]


def fused_core(backend: KernelBackend) -> Callable:
    """The forward core of ``backend`` (:func:`quarkmoe_jax.moe.buckets.bucketed_backend` makes it an op)."""

    def core(x, topk_weights, topk_ids, valid_tokens, params, *, expert_map, **kwargs):
        reason = backend.unavailable()
        if reason is not None:
            raise NotImplementedError(f"{backend.name} backend: {reason}")
        return _fused_forward(x, topk_weights, topk_ids, valid_tokens, params, backend, expert_map=expert_map, **kwargs)

    core.__doc__ = f"Fused {backend.name} kernels (:mod:`quarkmoe_jax.moe.fused`)."
    return core


def _fused_forward(
    x,
    topk_weights,
    topk_ids,
    valid_tokens,
    params,
    backend: KernelBackend,
    *,
    expert_map,
    quant_config,
    shape,
    activation,
    swiglu_limit,
    apply_router_weight_on_input,
    shard_axes=None,
    pair_dtype=None,
    out_dtype=None,
):
    act = quant_config.activation
    axes = shard_axes or ShardAxes()
    if act.granularity == "channel":
        raise NotImplementedError(
            f"{backend.name} backend: per-channel dynamic activation scales (Quark) are not supported"
        )
    w13, w2 = expert_weights(params)
    w13 = kernel_weights(w13, "w13", backend)
    w2 = kernel_weights(w2, "w2", backend)

    dtype = x.dtype
    t, k = topk_ids.shape
    num_local, n13, h_pad = w13.shape[0], w13.shape[1], w13.shape[2]
    i_pad = w2.shape[2]
    hidden = x.shape[1]
    x, shards = prepare_expert_input(
        x, topk_weights, w13.shape, i_pad, activation, apply_router_weight_on_input, valid_tokens
    )
    gated = shards == 2

    num_pairs = t * k
    device_kind = jax.devices()[0].device_kind
    num_global = num_local if expert_map is None else expert_map.shape[0]
    load = expected_load(num_pairs, num_local, num_global)
    mx = isinstance(w13, QArray) and w13.kind == "mx"
    config1, config2 = backend.tiles(device_kind, load, (h_pad, i_pad), mx)
    dequant = backend.prefill_dequantizes and backend.prefill_dequant(device_kind, load)
    if config1.block_m != config2.block_m:
        raise ValueError("GEMM1 and GEMM2 tile configs must share block_m (they share the row layout)")
    interpret = jax.default_backend() == "cpu"
    pairs = sort_pairs(topk_ids, valid_tokens, expert_map, num_local)
    tiled = tile_rows(pairs, config1.block_m)

    weight_kind = quant_config.weight.kind
    operand_args = (act, weight_kind)
    operand_kwargs = dict(semantics=quant_config.semantics, fp8_dot=fp8_tensor_cores(device_kind))
    static13 = static_input_scale(params, "w13_input_scale", pairs.rows_expert)
    if static13 is not None and static13.ndim == 2:  # per-expert static scales: quantize each pair
        operand, a_scale = _gemm_operand(x[pairs.rows_token], *operand_args, static13, **operand_kwargs)
        a1, scale1 = _padded(operand, tiled.row_sorted), _padded_scale(a_scale, tiled.row_sorted)
    else:  # quantize each token once, gather it into its rows
        axis_name = axes.amax_axes(1, act.granularity)
        operand, a_scale = _gemm_operand(x, *operand_args, static13, **operand_kwargs, axis_name=axis_name)
        row_token = _padded(pairs.rows_token, tiled.row_sorted, fill=t)
        a1, scale1 = _padded(operand, row_token), _padded_scale(a_scale, row_token)

    col_scales = {  # W8A8 weight scales per output column [E, N]
        name: params[name].row_scales() for name in ("w13", "w2") if params[name].kind in ("int8", "fp8")
    }
    fused = activation not in UNFUSED_ACTIVATIONS
    epilogue1 = Epilogue(
        activation=activation if fused else None,
        gated=gated and fused,
        interleaved=activation == "swigluoai",
        swiglu_limit=swiglu_limit,
        activation_dtype=jnp.dtype(dtype).name,
        has_bias=params.get("w13_bias") is not None,
        row_scales=scale1 is not None,
        col_scales="w13" in col_scales,
    )
    h = _gemm(
        a1,
        w13,
        tiled.tile_expert,
        params.get("w13_bias"),
        None,
        scale1,
        col_scales.get("w13"),
        n_out=i_pad if fused else n13,
        config=config1,
        epilogue=epilogue1,
        backend=backend,
        out_dtype=dtype,
        interpret=interpret,
        dequant=dequant,
    )
    if not fused:
        h = apply_activation(h, activation, limit=swiglu_limit)
    if act.kind in ("fp8", "int8"):  # dynamic per-tensor scales see only real rows, as in the oracle
        row_valid = tiled.row_sorted < num_pairs
        h = jnp.where(row_valid[:, None], h, 0).astype(dtype)

    static2 = static_input_scale(params, "w2_input_scale", pairs.rows_expert)
    if static2 is not None and static2.ndim == 2:
        static2 = _padded(static2, tiled.row_sorted, fill=1)
    a2, a_scale = _gemm_operand(
        h, *operand_args, static2, **operand_kwargs, axis_name=axes.amax_axes(2, act.granularity)
    )
    scale2 = a_scale

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
        col_scales.get("w2"),
        n_out=h_pad,
        config=config2,
        epilogue=Epilogue(
            has_bias=params.get("w2_bias") is not None,
            row_weights=row_weights is not None,
            row_scales=scale2 is not None,
            col_scales="w2" in col_scales,
        ),
        backend=backend,
        out_dtype=pair_dtype or dtype,
        interpret=interpret,
        dequant=dequant,
    )
    # Each pair's padded row (invalid pairs read the fill row: zero), in the original (token, k) order.
    pair_row = jnp.zeros((num_pairs,), jnp.int32).at[pairs.order].set(tiled.pair_row)
    per_pair = jnp.take(y, pair_row, axis=0, mode="fill", fill_value=0)
    return combine_pairs(per_pair.reshape(t, k, h_pad), dtype, pair_dtype, out_dtype)[:, :hidden]
