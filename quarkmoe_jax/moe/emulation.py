"""The MoE experts forward in pure jnp: the emulation backend and the numerical oracle of every kernel.

What it computes, per (token, expert) pair, for every scheme (docs/moe.md has the full description):

1. GEMM1 input: the token's hidden state, quantized as the scheme says (MX: fake-quant per token, blocks
   along H; FP8: the e4m3 codes with their scale, applied to the accumulator, except MX weights under Quark
   semantics, fake-quant ``q * s`` in float32 as Quark computes; INT8: codes with their scale).
2. ``acc = x_q @ W13^T`` with float32 accumulation (int32 for INT8 x INT8); epilogue
   ``(acc * a_scale * w_scale) + bias``, cast to the activation dtype (``x``'s dtype).
3. The activation (``moe.activations``), in the activation dtype.
4. GEMM2 input quantized per (token, expert) row, blocks along I; GEMM2 with the same epilogue, then
   ``* topk_weight`` in float32 (unless ``apply_router_weight_on_input``), cast to the activation dtype.
5. The sum over the k experts of a token in float32, cast to the activation dtype.

Efficient rather than naive: the (token, k) pairs are sorted by local expert and run as grouped matmuls
(``jax.lax.ragged_dot``) on the dequantized local experts; pairs whose expert is not local (``expert_map``
-1) or that belong to bucket padding fall outside every group and contribute exactly zero. With fewer pairs
than local experts (decode) only the experts the pairs touch are gathered and dequantized. The jitted entry
point pads the token count to a bucket (:data:`TOKEN_BUCKETS`), so it compiles once per bucket.

Non-finite inputs stay local: a NaN / Inf in a token's hidden state makes that token's output non-finite
and nothing else. Dynamic per-tensor scales are taken over the finite values (vLLM's float ``atomicMax``
also skips NaN).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quarkmoe_jax.formats import MXTensor, quant_dequant
from quarkmoe_jax.formats import quantizers as qz
from quarkmoe_jax.formats.kernel_layout import as_mx_tensor
from quarkmoe_jax.moe.activations import apply_activation, is_gated
from quarkmoe_jax.moe.dispatch import sort_pairs
from quarkmoe_jax.moe.shard_axes import ShardAxes
from quarkmoe_jax.schemes import ActivationQuant, MoEQuantConfig, MoEShape

__all__ = [
    "TOKEN_BUCKETS",
    "token_bucket",
    "host_rows",
    "moe_experts",
    "moe_experts_unpadded",
    "validate_moe_inputs",
    "bucketed_backend",
    "quantize_gemm_input",
    "static_input_scale",
    "prepare_expert_input",
    "expert_column_scales",
    "combine_pairs",
]

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
"""Token counts the jitted forward compiles for; larger counts round up to a multiple of 8192."""


def host_rows(array, rows: int):
    """``array``'s first ``rows`` rows, zero-padded to ``rows``, as a device array made through host memory:
    a device op on each new token count would compile an XLA program for it (eager calls only)."""
    host = np.asarray(array)
    if host.shape[0] >= rows:
        return jax.device_put(host[:rows])
    return jax.device_put(np.pad(host, [(0, rows - host.shape[0])] + [(0, 0)] * (host.ndim - 1)))


def token_bucket(num_tokens: int) -> int:
    for bucket in TOKEN_BUCKETS:
        if num_tokens <= bucket:
            return bucket
    return -(-num_tokens // TOKEN_BUCKETS[-1]) * TOKEN_BUCKETS[-1]


def validate_moe_inputs(x, topk_weights, topk_ids, hidden_size: int, num_experts: int, apply_on_input: bool) -> None:
    """Clear errors for bad forward inputs (shapes and dtypes are static, so this also works under jit)."""
    if x.ndim != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"x must be [T, {hidden_size}], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array (float32 / bfloat16 / float16), got {x.dtype}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T={x.shape[0]}, k], got shape {tuple(topk_ids.shape)}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids must be integers, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    if apply_on_input and topk_ids.shape[1] != 1:
        raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got k = {topk_ids.shape[1]}")
    if not isinstance(topk_ids, jax.core.Tracer):
        ids = np.asarray(topk_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise ValueError(f"topk_ids must be in [0, {num_experts}), found values in [{ids.min()}, {ids.max()}]")


# ----------------------------------------------------------------------------------- input quantization


def quantize_gemm_input(
    values, act: ActivationQuant, weight_kind: str, static_scale, semantics: str, axis_name: tuple[str, ...] = ()
):
    """Quantize a GEMM input ``[P, K]`` (rows = tokens or pairs) as the scheme says.

    ``axis_name``: mesh axes a dynamic amax is reduced over when the input is split across devices
    (:meth:`quarkmoe_jax.moe.shard_axes.ShardAxes.amax_axes`); empty on one device.

    Returns ``(operand, a_scale)``: the GEMM operand (float32, or int8 codes for INT8 x INT8) and the
    activation scale for the epilogue (``None``, a scalar or ``[P, 1]``).
    """
    if act.kind == "none":
        return _operand(values, values.dtype == jnp.bfloat16), None
    if act.kind == "mx":  # MX values have at most 4 significant bits: exact in bfloat16
        return _operand(quant_dequant(values, act.mx_format, act.scale_mode), True), None
    if act.granularity == "channel":
        qdq = _fake_quant_per_expert_channel(values, act.kind, *static_scale, axis_name=axis_name)
        return _operand(qdq, False), None
    scale = None if act.dynamic else static_scale
    kwargs = dict(granularity=act.granularity or "tensor", semantics=semantics, axis_name=axis_name or None)
    if act.kind == "fp8":
        if weight_kind == "mx" and semantics == "quark":  # Quark's fake-quant: q * s in float32, then the GEMM
            qdq = qz.fp8_quant_dequant(values, scale, **kwargs)
            return _operand(qdq, qdq.dtype == jnp.bfloat16), None
        # vLLM semantics (and W8A8): the e4m3 codes enter the GEMM, s multiplies the float32 accumulator
        # (what fused FP8 kernels compute; vLLM's torch emulation of MX x FP8 rounds q * s through float16
        # instead, docs/moe.md "Differences from vLLM")
        q, s = qz.fp8_quantize(values, scale, **kwargs)
        return _operand(q.astype(jnp.float32), True), s  # e4m3 codes are exact in bfloat16
    return qz.int8_quantize(values, scale, **kwargs)


def _operand(values, exact_in_bfloat16: bool):
    """GEMM operand dtype: bfloat16 where every value is exactly representable (tensor cores on GPU; the
    products are exact in the float32 accumulator, so the result equals the float32 GEMM), else float32."""
    return values.astype(jnp.bfloat16 if exact_in_bfloat16 else jnp.float32)


def _fake_quant_per_expert_channel(values, kind: str, rows_expert, rows_valid, num_experts: int, axis_name=()):
    """Quark's dynamic ``per_channel`` (ch_axis 1 / -1) fake-quant of expert inputs ``[P, K]``: one scale
    per input channel, ``amax / 127.5`` (INT8) or ``amax / 448`` (FP8) over the rows routed to each expert
    (on every device of ``axis_name``)."""
    magnitude = jnp.where(rows_valid[:, None], jnp.abs(values.astype(jnp.float32)), 0.0)
    magnitude = jnp.where(jnp.isfinite(magnitude), magnitude, 0.0)
    amax = jax.ops.segment_max(magnitude, rows_expert, num_segments=num_experts)  # [E, K]
    amax = lax.pmax(amax, axis_name) if axis_name else amax
    denominator = 127.5 if kind == "int8" else qz.FP8_E4M3_MAX
    scale = jnp.where(amax > 0, qz.el.exact_divide(amax, denominator), jnp.float32(qz._F32_EPS))[rows_expert]
    x = values.astype(jnp.float32)
    if kind == "int8":
        q = jnp.clip(jnp.round(x * (1.0 / scale)), -128, 127)
    else:
        q = qz._e4m3_to_float32(qz._e4m3_from_float32(qz.el.exact_divide(x, scale)))
    return (q * scale).astype(values.dtype).astype(jnp.float32)


# ------------------------------------------------------------------------------------------- the GEMMs


def _weights_for_gemm(weight, operand_dtype, rows_expert=None):
    """Stored weights ``[E, N, K]`` as a GEMM operand of ``operand_dtype`` (int8 stays int8).

    MX values, INT8 and FP8 codes are exact in bfloat16. With ``rows_expert`` the weights of each row's
    expert are gathered first, ``[P, N, K]``: for few pairs (decode) only the touched experts are dequantized.
    """
    if rows_expert is not None:
        weight = weight[rows_expert]
    if isinstance(weight, MXTensor):
        return weight.dequantize(operand_dtype)
    if operand_dtype == jnp.int8:
        return weight
    return weight.astype(operand_dtype)


def expert_column_scales(scale, num_columns: int):
    """W8A8 weight scales, per output column: float32 ``[E, N]`` from ``[E]`` (per tensor), ``[E, S]`` (per
    w1 / w3 shard, each covering ``N / S`` consecutive rows) or ``[E, N]`` (per channel)."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim == 1:
        return jnp.broadcast_to(scale[:, None], (scale.shape[0], num_columns))
    if scale.shape[1] == num_columns:
        return scale
    return jnp.repeat(scale, num_columns // scale.shape[1], axis=1)


def _row_scale(scale, rows_expert, num_columns: int):
    """Per-row weight scale ``[P, N]`` (or None)."""
    return None if scale is None else expert_column_scales(scale, num_columns)[rows_expert]


def _gemm_dtype(operand, weight):
    """int8 for INT8 x INT8; bfloat16 when both sides are exact in it (MX values, INT8 / FP8 codes, bfloat16
    data); float32 otherwise."""
    weight_dtype = weight.packed.dtype if isinstance(weight, MXTensor) else weight.dtype
    if operand.dtype == jnp.int8 and weight_dtype == jnp.int8:
        return jnp.int8
    weight_exact = isinstance(weight, MXTensor) or weight_dtype in (jnp.int8, jnp.float8_e4m3fn, jnp.bfloat16)
    return jnp.bfloat16 if operand.dtype == jnp.bfloat16 and weight_exact else jnp.float32


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
    acc = acc.astype(jnp.float32)
    if a_scale is not None:
        acc = acc * jnp.asarray(a_scale, jnp.float32)
    if w_scale is not None:
        acc = acc * w_scale
    if bias is not None:
        acc = acc + jnp.asarray(bias, jnp.float32)[rows_expert]
    return acc


def static_input_scale(params, key, rows_expert):
    scale = params.get(key)
    if scale is None:
        return None
    scale = jnp.asarray(scale, jnp.float32)
    return scale if scale.ndim == 0 else scale[rows_expert][:, None]  # Quark semantics: one per expert


# ------------------------------------------------------------------------------------------ the forward


def prepare_expert_input(
    x, topk_weights, w13_shape, i_pad: int, activation: str, apply_router_weight_on_input: bool, valid_tokens=None
):
    """Every backend's first step: check that ``w13 [E, S*I_pad, H_pad]`` fits the activation (S = 2 when
    gated), apply the router weight on the input if asked, zero the padding tokens (``valid_tokens [T]``
    False: they must not enter a dynamic per-tensor scale) and pad ``x [T, H]`` to ``[T, H_pad]``.

    Returns the padded ``x`` (``x``'s dtype) and the number of weight shards ``S``.
    """
    n13, h_pad = w13_shape[1], w13_shape[2]
    shards = 2 if is_gated(activation) else 1
    if n13 != shards * i_pad:
        raise ValueError(f"w13 has {n13} rows; activation {activation!r} needs {shards} x {i_pad}")
    if apply_router_weight_on_input:
        x = (x.astype(jnp.float32) * topk_weights.astype(jnp.float32)).astype(x.dtype)
    if valid_tokens is not None:
        x = jnp.where(valid_tokens[:, None], x, jnp.zeros((), x.dtype))
    if h_pad > x.shape[1]:
        x = jnp.pad(x, ((0, 0), (0, h_pad - x.shape[1])))
    return x, shards


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
    params = {name: as_mx_tensor(v) for name, v in params.items()}
    w13, w2 = params["w13"], params["w2"]
    num_local = w13.shape[0]
    h_pad, n13, i_pad = w13.shape[2], w13.shape[1], w2.shape[2]
    hidden = x.shape[1]
    x, shards = prepare_expert_input(
        x, topk_weights, w13.shape, i_pad, activation, apply_router_weight_on_input, valid_tokens
    )

    pairs = sort_pairs(topk_ids, valid_tokens, expert_map, num_local)
    order, group_sizes = pairs.order, pairs.group_sizes
    rows_expert, rows_valid, rows_token = pairs.rows_expert, pairs.rows_valid, pairs.rows_token

    act = quant_config.activation
    weight_kind = quant_config.weight.kind
    semantics = quant_config.semantics
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
        _row_scale(params.get("w13_weight_scale"), rows_expert, n13),
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
        _row_scale(params.get("w2_weight_scale"), rows_expert, h_pad),
        params.get("w2_bias"),
    )
    if not apply_router_weight_on_input:
        y = y * topk_weights.reshape(-1).astype(jnp.float32)[order][:, None]
    y = jnp.where(rows_valid[:, None], y, 0)
    per_pair = jnp.zeros((t * k, h_pad), jnp.float32).at[order].set(y)
    return combine_pairs(per_pair.reshape(t, k, h_pad), dtype, pair_dtype, out_dtype)[:, :hidden]


def combine_pairs(per_pair, dtype, pair_dtype=None, out_dtype=None):
    """Each token's sum over its ``k`` pair outputs ``[T, k, H]`` (float32 or ``dtype``) -> ``[T, H]``.

    One device (the defaults): each pair's output is rounded to the activation ``dtype``, summed in float32
    and rounded to ``dtype`` (vLLM's order). A sharded forward returns partial sums in float32
    (``out_dtype=float32``) and rounds after the cross-device sum: expert-parallel shards keep the per-pair
    rounding (their pairs are whole), tensor-parallel shards hold partial pair outputs and pass
    ``pair_dtype=float32`` (no per-pair rounding).
    """
    per_pair = per_pair.astype(pair_dtype or dtype).astype(jnp.float32)
    return per_pair.sum(axis=1).astype(out_dtype or dtype)


def bucketed_backend(core: Callable) -> Callable:
    """Wrap a forward core with :func:`moe_experts_unpadded`'s signature into a backend entry point.

    The entry point validates the inputs, pads T to :func:`token_bucket` and calls the core under ``jit``
    (compiled once per bucket, scheme and shape); inside an outer ``jit`` it calls the core directly.
    """
    static = (
        "quant_config",
        "shape",
        "activation",
        "swiglu_limit",
        "apply_router_weight_on_input",
        "shard_axes",
        "pair_dtype",
        "out_dtype",
    )

    @functools.partial(jax.jit, static_argnames=static)
    def jitted(x, topk_weights, topk_ids, valid_tokens, params, expert_map, **kwargs):
        return core(x, topk_weights, topk_ids, valid_tokens, params, expert_map=expert_map, **kwargs)

    def entry(
        x,
        topk_weights,
        topk_ids,
        params: dict[str, Any],
        quant_config: MoEQuantConfig,
        shape: MoEShape,
        *,
        activation: str = "silu",
        swiglu_limit: float | None = None,
        expert_map=None,
        num_global_experts: int | None = None,
        apply_router_weight_on_input: bool = False,
        valid_tokens=None,
        shard_axes: ShardAxes | None = None,
        pair_dtype=None,
        out_dtype=None,
    ):
        traced = any(isinstance(v, jax.core.Tracer) for v in (x, topk_weights, topk_ids, valid_tokens))
        if traced:
            x, topk_weights, topk_ids = jnp.asarray(x), jnp.asarray(topk_weights, jnp.float32), jnp.asarray(topk_ids)
        else:  # host copies: device ops on each new T would compile a program per token count
            x, topk_weights, topk_ids = np.asarray(x), np.asarray(topk_weights, np.float32), np.asarray(topk_ids)
        num_global = num_global_experts or shape.num_experts
        validate_moe_inputs(x, topk_weights, topk_ids, shape.hidden_size, num_global, apply_router_weight_on_input)
        t = x.shape[0]
        if t == 0:
            return jnp.zeros((0, shape.hidden_size), out_dtype or x.dtype)
        kwargs = dict(
            quant_config=quant_config,
            shape=shape,
            activation=activation,
            swiglu_limit=swiglu_limit,
            apply_router_weight_on_input=apply_router_weight_on_input,
            shard_axes=shard_axes,
            pair_dtype=None if pair_dtype is None else jnp.dtype(pair_dtype),
            out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
        )
        if expert_map is not None and not isinstance(expert_map, jax.core.Tracer):
            expert_map = jax.device_put(np.asarray(expert_map, np.int32))
        if traced:
            valid = jnp.ones((t,), bool) if valid_tokens is None else jnp.asarray(valid_tokens, bool)
        else:
            valid = np.ones((t,), bool) if valid_tokens is None else np.asarray(valid_tokens, bool)
        if valid.shape != (t,):
            raise ValueError(f"valid_tokens must be [T={t}] bool, got shape {tuple(valid.shape)}")
        if traced:
            return core(x, topk_weights, topk_ids.astype(jnp.int32), valid, params, expert_map=expert_map, **kwargs)
        bucket = token_bucket(t)
        out = jitted(
            host_rows(x, bucket),
            host_rows(topk_weights, bucket),
            host_rows(topk_ids.astype(np.int32), bucket),
            host_rows(valid, bucket),
            params,
            expert_map,
            **kwargs,
        )
        return out if bucket == t else host_rows(out, t)

    entry.cache_size = jitted._cache_size  # compiled variants, for tests of the bucketing
    entry.__doc__ = (
        "MoE experts: ``x [T, H]``, ``topk_weights [T, k]`` fp32, ``topk_ids [T, k]`` (global ids) -> ``[T, H]`` "
        "in ``x``'s dtype. ``valid_tokens [T]`` bool (optional) marks padding rows: they contribute nothing and "
        "enter no dynamic scale. ``shard_axes`` / ``pair_dtype`` / ``out_dtype``: the sharded forward's options "
        "(:func:`combine_pairs`). " + (core.__doc__ or "")
    )
    return entry


def _emulation_core(x, topk_weights, topk_ids, valid_tokens, params, *, expert_map, **kwargs):
    """The pure-jnp oracle (this module's docstring)."""
    return moe_experts_unpadded(x, topk_weights, topk_ids, valid_tokens, params, expert_map=expert_map, **kwargs)


moe_experts = bucketed_backend(_emulation_core)
