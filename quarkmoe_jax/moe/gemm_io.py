"""What goes into and comes out of the expert GEMMs, the same for every backend (the oracle and the kernels).

* :func:`prepare_expert_input`: check that the weights fit the activation, apply the router weight on the
  input, zero padding tokens, pad ``H``.
* :func:`quantize_gemm_input`: a GEMM input quantized as the scheme says (MX fake-quant, FP8 / INT8 codes
  with their scale, Quark's per-expert-channel fake-quant); :func:`static_input_scale` picks a static scale.
* :func:`combine_pairs`: each token's sum over its ``k`` expert outputs, in vLLM's rounding order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from quarkmoe_jax.activations import is_gated
from quarkmoe_jax.contracts import ActivationQuant, Numerics, WeightQuant
from quarkmoe_jax.formats import QArray, mx_format, quant_dequant
from quarkmoe_jax.formats import quantizers as qz

__all__ = [
    "expert_weights",
    "prepare_expert_input",
    "quantize_gemm_input",
    "static_input_scale",
    "combine_pairs",
]


def expert_weights(params, weight: WeightQuant | None = None) -> tuple[QArray, QArray]:
    """``params["w13"]``, ``params["w2"]``, refusing anything but :class:`QArray` (a bare array's format and
    scale granularity would be a guess) and, given the config's ``weight``, QArrays whose type says otherwise
    (:meth:`WeightQuant.check_data`)."""
    w13, w2 = params["w13"], params["w2"]
    if not (isinstance(w13, QArray) and isinstance(w2, QArray)):
        raise TypeError(
            "w13 and w2 must be QArrays (quarkmoe_jax.formats: quantize, scaled_qarray, float_qarray), found "
            f"{_describe(w13)} and {_describe(w2)}"
        )
    if weight is not None:
        weight.check_data(w13.qtype, "w13")
        weight.check_data(w2.qtype, "w2")
    return w13, w2


def _describe(value) -> str:
    if isinstance(value, QArray):
        return "a QArray"
    return f"a bare {getattr(value, 'dtype', type(value).__name__)} {list(getattr(value, 'shape', ()))}"


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


def quantize_gemm_input(
    values,
    act: ActivationQuant,
    weight_kind: str,
    static_scale,
    semantics: str | Numerics,
    axis_name: tuple[str, ...] = (),
):
    """Quantize a GEMM input ``[P, K]`` (rows = tokens or pairs) as the scheme says.

    ``semantics``: the layer's :class:`Numerics` (or its name).

    ``axis_name``: mesh axes a dynamic amax is reduced over when the input is split across devices
    (:meth:`quarkmoe_jax.moe.shard_axes.ShardAxes.amax_axes`); empty on one device.

    Returns ``(operand, a_scale)``: the GEMM operand (float32, or int8 codes for INT8 x INT8) and the
    activation scale for the epilogue (``None``, a scalar or ``[P, 1]``).
    """
    if act.kind == "none":
        return _operand(values, values.dtype == jnp.bfloat16), None
    if act.kind == "mx":  # MX values have at most 4 significant bits: exact in bfloat16, but MXFP8's
        # subnormals times the smallest scales lie below bfloat16's range (float32 inputs keep them)
        qdq = quant_dequant(values, act.mx_format, act.scale_mode)
        return _operand(qdq, qdq.dtype != jnp.float32 or mx_format(act.mx_format).bits < 8), None
    if act.granularity == "channel":
        qdq = _fake_quant_per_expert_channel(values, act.kind, *static_scale, axis_name=axis_name)
        return _operand(qdq, False), None
    numerics = Numerics.of(semantics)
    scale = None if act.dynamic else static_scale
    kwargs = dict(granularity=act.granularity or "tensor", semantics=numerics, axis_name=axis_name or None)
    if act.kind == "fp8":
        if numerics.fp8_input_fake_quant(act, weight_kind):  # Quark's fake-quant: q * s in float32, then the GEMM
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


def static_input_scale(params, key, rows_expert):
    scale = params.get(key)
    if scale is None:
        return None
    scale = jnp.asarray(scale, jnp.float32)
    return scale if scale.ndim == 0 else scale[rows_expert][:, None]  # Quark semantics: one per expert


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
