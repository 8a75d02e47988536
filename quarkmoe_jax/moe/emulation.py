"""The MoE experts forward in pure jnp: the emulation backend and the numerical oracle of every kernel.

What it computes, per (token, expert) pair, for every scheme (docs/moe.md has the full description):

1. GEMM1 input: the token's hidden state, quantized as the scheme says (MX: fake-quant per token, blocks
   along H; FP8: the e4m3 codes with their scale, applied to the accumulator, except MX weights under Quark
   semantics, fake-quant ``q * s`` in float32 as Quark computes; INT8: codes with their scale).
2. ``acc = x_q @ W13^T`` with float32 accumulation (int32 for INT8 x INT8); epilogue
   ``(acc * a_scale * w_scale) + bias``, cast to the activation dtype (``x``'s dtype).
3. The activation (``quarkmoe_jax.activations``), in the activation dtype.
4. GEMM2 input quantized per (token, expert) row, blocks along I; GEMM2 with the same epilogue, then
   ``* topk_weight`` in float32 (unless ``apply_router_weight_on_input``), cast to the activation dtype.
5. The sum over the k experts of a token in float32, cast to the activation dtype.

Efficient rather than naive: the (token, k) pairs are sorted by local expert and run as grouped matmuls
(``jax.lax.ragged_dot``) on the dequantized local experts; pairs whose expert is not local (``expert_map``
-1) or that belong to bucket padding fall outside every group and contribute exactly zero. With fewer pairs
than local experts (decode) only the experts the pairs touch are gathered and dequantized. The jitted entry
point pads the token count to a bucket (:data:`quarkmoe_jax.moe.buckets.TOKEN_BUCKETS`), so it compiles once per bucket.

Non-finite inputs stay local: a NaN / Inf in a token's hidden state makes that token's output non-finite
and nothing else. Dynamic per-tensor scales are taken over the finite values (vLLM's float ``atomicMax``
also skips NaN).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from quarkmoe_jax.activations import apply_activation
from quarkmoe_jax.contracts import MoEQuantConfig, MoEShape
from quarkmoe_jax.formats import QArray
from quarkmoe_jax.moe.buckets import bucketed_backend
from quarkmoe_jax.moe.gemm_io import (
    combine_pairs,
    expert_weights,
    prepare_expert_input,
    quantize_gemm_input,
    static_input_scale,
)
from quarkmoe_jax.moe.pair_sort import sort_pairs
from quarkmoe_jax.moe.shard_axes import ShardAxes

__all__ = ["moe_experts", "moe_experts_unpadded"]

# ------------------------------------------------------------------------------------------- the GEMMs


def _weights_for_gemm(weight: QArray, operand_dtype, rows_expert=None):
    """Stored weights ``[E, N, K]`` as a GEMM operand of ``operand_dtype`` (int8 stays int8); 8-bit scales stay
    out (the epilogue applies them).

    MXFP4 / MXFP6 values, INT8 and FP8 codes are exact in bfloat16. With ``rows_expert`` the weights of each
    row's expert are gathered first, ``[P, N, K]``: for few pairs (decode) only the touched experts are
    dequantized.
    """
    if rows_expert is not None:
        weight = weight[rows_expert]
    if weight.kind == "mx":
        return weight.dequantize(operand_dtype)
    if operand_dtype == jnp.int8:
        return weight.values
    return weight.values.astype(operand_dtype)


def _row_scale(weight: QArray, rows_expert):
    """8-bit weights: each row's weight scale per output column ``[P, N]``; None for MX and float weights."""
    return weight.row_scales()[rows_expert] if weight.qtype.has_row_scales else None


def _per_tensor(weight: QArray) -> bool:
    return weight.qtype.has_row_scales and weight.qtype.granularity == "tensor"


def _gemm_dtype(operand, weight: QArray):
    """int8 for INT8 x INT8; bfloat16 when both sides are exact in it
    (:attr:`~quarkmoe_jax.formats.QType.operand_exact_in_bfloat16`); float32 otherwise."""
    if operand.dtype == jnp.int8 and weight.kind == "int8":
        return jnp.int8
    exact = operand.dtype == jnp.bfloat16 and weight.qtype.operand_exact_in_bfloat16
    return jnp.bfloat16 if exact else jnp.float32


def _grouped_gemm(operand, weight, group_sizes, rows_expert, rows_valid, a_scale, w_scale, bias):
    """Expert GEMM of every row + epilogue ``(acc * a_scale * w_scale) + bias``; float32 ``[P, N]``.

    Many rows: one ``ragged_dot`` over all local experts (rows outside the groups give 0). Fewer rows than
    experts (decode): each row's expert is gathered and dequantized, and invalid rows are zeroed.
    """
    num_rows, num_experts = operand.shape[0], weight.shape[0]
    gemm_dtype = _gemm_dtype(operand, weight)
    operand = operand.astype(gemm_dtype)
    integer = gemm_dtype == jnp.int8
    kwargs = (
        {"preferred_element_type": jnp.int32}
        if integer
        else {"precision": lax.Precision.HIGHEST, "preferred_element_type": jnp.float32}
    )
    if num_rows < num_experts:
        w = _weights_for_gemm(weight, gemm_dtype, rows_expert)
        acc = jnp.einsum("pk,pnk->pn", operand, w, **kwargs)
        acc = jnp.where(rows_valid[:, None], acc, 0)
    else:
        w = jnp.swapaxes(_weights_for_gemm(weight, gemm_dtype), 1, 2)
        acc = lax.ragged_dot(operand, w, group_sizes, **kwargs)
    acc = scaled_in_order(acc.astype(jnp.float32), a_scale, w_scale, _per_tensor(weight))
    if bias is not None:
        acc = acc + jnp.asarray(bias, jnp.float32)[rows_expert]
    return acc


# ------------------------------------------------------------------------------------------ the forward


def moe_experts_unpadded(
    x,
    topk_weights,
    topk_ids,
    valid_tokens,
    params: dict[str, Any],
    quant_config: MoEQuantConfig,
    shape: MoEShape,
    activation: str,
    swiglu_limit: float | None,
    expert_map,
    apply_router_weight_on_input: bool,
    shard_axes: ShardAxes | None = None,
    pair_dtype=None,
    out_dtype=None,
):
    """The forward on given arrays (no bucketing); ``valid_tokens [T]`` bool masks padding tokens.

    ``shard_axes``, ``pair_dtype``, ``out_dtype``: see :func:`combine_pairs` and
    :class:`~quarkmoe_jax.moe.shard_axes.ShardAxes` (the sharded forward's options; defaults: one device).
    """
    dtype = x.dtype
    axes = shard_axes or ShardAxes()
    t, k = topk_ids.shape
    params = {name: v.to_checkpoint_layout() if isinstance(v, QArray) else v for name, v in params.items()}
    w13, w2 = expert_weights(params, quant_config.weight)
    num_local = w13.shape[0]
    h_pad, i_pad = w13.shape[2], w2.shape[2]
    hidden = x.shape[1]
    x, shards = prepare_expert_input(
        x, topk_weights, w13.shape, i_pad, activation, apply_router_weight_on_input, valid_tokens
    )

    pairs = sort_pairs(topk_ids, valid_tokens, expert_map, num_local)
    order, group_sizes = pairs.order, pairs.group_sizes
    rows_expert, rows_valid, rows_token = pairs.rows_expert, pairs.rows_valid, pairs.rows_token

    act = quant_config.activation
    weight_kind = quant_config.weight.kind
    semantics = quant_config.numerics
    static13 = static_input_scale(params, "w13_input_scale", rows_expert)
    axes1, axes2 = axes.amax_axes(1, act.granularity), axes.amax_axes(2, act.granularity)
    if act.granularity == "channel":  # scales over each expert's rows: quantize the gathered pairs
        segments = (rows_expert, rows_valid, num_local)
        operand, a_scale = quantize_gemm_input(x[rows_token], act, weight_kind, segments, semantics, axes1)
    elif static13 is not None and static13.ndim == 2:  # per-expert static scales (Quark): quantize each pair
        operand, a_scale = quantize_gemm_input(x[rows_token], act, weight_kind, static13, semantics)
    else:  # the same for every expert of a token: quantize each token once, then gather its pairs
        operand, a_scale = quantize_gemm_input(x, act, weight_kind, static13, semantics, axes1)
        operand = operand[rows_token]
        a_scale = a_scale[rows_token] if a_scale is not None and jnp.ndim(a_scale) == 2 else a_scale

    h = _grouped_gemm(
        operand,
        w13,
        group_sizes,
        rows_expert,
        rows_valid,
        a_scale,
        _row_scale(w13, rows_expert),
        params.get("w13_bias"),
    ).astype(dtype)
    a2 = apply_activation(h, activation, limit=swiglu_limit)
    a2 = jnp.where(rows_valid[:, None], a2, 0).astype(dtype)

    static2 = (
        (rows_expert, rows_valid, num_local)
        if act.granularity == "channel"
        else static_input_scale(params, "w2_input_scale", rows_expert)
    )
    operand, a_scale = quantize_gemm_input(a2, act, weight_kind, static2, semantics, axes2)
    y = _grouped_gemm(
        operand,
        w2,
        group_sizes,
        rows_expert,
        rows_valid,
        a_scale,
        _row_scale(w2, rows_expert),
        params.get("w2_bias"),
    )
    if not apply_router_weight_on_input:
        y = y * topk_weights.reshape(-1).astype(jnp.float32)[order][:, None]
    y = jnp.where(rows_valid[:, None], y, 0)
    per_pair = jnp.zeros((t * k, h_pad), jnp.float32).at[order].set(y)
    return combine_pairs(per_pair.reshape(t, k, h_pad), dtype, pair_dtype, out_dtype)[:, :hidden]


def _emulation_core(x, topk_weights, topk_ids, valid_tokens, params, *, expert_map, **kwargs):
    """The pure-jnp oracle (this module's docstring)."""
    return moe_experts_unpadded(x, topk_weights, topk_ids, valid_tokens, params, expert_map=expert_map, **kwargs)


moe_experts = bucketed_backend(_emulation_core)


def dense_gemm(operand, weight: QArray, a_scale=None):
    """One dense GEMM ``operand [T, K] x weight [N, K]^T`` as the oracle's expert GEMMs compute it: the GEMM
    dtype rule, the stored weight as its operand, float32 accumulation and the epilogue ``acc * a_scale *
    w_scale``; float32 ``[T, N]``. The quantized Linear layers of whole models (``models.layers.Linear``) run
    it, so a Linear and an expert quantized alike compute alike."""
    gemm_dtype = _gemm_dtype(operand, weight)
    w = _weights_for_gemm(weight, gemm_dtype)
    if gemm_dtype == jnp.int8:
        acc = jnp.dot(operand, w.T, preferred_element_type=jnp.int32).astype(jnp.float32)
    else:
        acc = jnp.dot(
            operand.astype(gemm_dtype), w.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
    return scaled_in_order(acc, a_scale, _row_scale(weight, ...), _per_tensor(weight))


def scaled_in_order(acc, a_scale, w_scale, w_per_tensor: bool = False):
    """``(acc * a_scale) * w_scale`` (float32; either scale may be None), rounded in that order as vLLM's
    kernels do. XLA's simplifier may reassociate the product into ``acc * (a_scale * w_scale)`` where the
    scales are broadcast scalars (a per-tensor activation scale, or ``w_per_tensor``: a per-tensor weight
    scale, a broadcast scalar where a shard holds one expert), one ulp off for some elements; there a
    barrier after the first product keeps the order (per-token x per-channel scales need none, and keep
    their fusion)."""
    if a_scale is not None:
        a_scale = jnp.asarray(a_scale, jnp.float32)
        acc = acc * a_scale
        if w_scale is not None and (a_scale.size == 1 or w_per_tensor):
            acc = lax.optimization_barrier(acc)
    if w_scale is not None:
        acc = acc * w_scale
    return acc
