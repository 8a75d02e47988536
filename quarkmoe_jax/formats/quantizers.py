"""FP8 (e4m3fn) and INT8 activation quantizers with vLLM's and Quark's numerics.

Two numeric semantics (chosen per call; the checkpoint loader picks one per model). ``semantics`` is a name
or a :class:`~quarkmoe_jax.contracts.Numerics`; these functions read its ``quark_quantizers`` flag:

``semantics="vllm"`` (vLLM 0.33's runtime):
  * FP8 static: ``q = e4m3(RNE(clamp(fp32(x) * (1/s), ±448)))``; dequant ``fp16(q) * s`` (stays float16 for
    a scalar ``s``), then cast to the activation dtype.
  * FP8 dynamic: per-token or per-tensor ``s = max(amax / 448, 1 / (448 * 512))`` (vLLM's minimum scaling
    factor), then the static formula.
  * INT8 static: ``q = sat(RNE(fp32(x) / s))``.
  * INT8 dynamic per-token: ``absmax = max(max|x_row|, 1e-10)``, ``s = absmax / 127``,
    ``q = round_half_away_from_zero(x * (127 / absmax))``.
  * INT8 dynamic per-tensor: ``s = max(max|x| / 127, 1e-10)``, then the static formula.

``semantics="quark"`` (amd-quark 0.13's fake-quant, what a user measured when calibrating):
  * FP8: ``q = e4m3(clip(x / s, ±448))``, dequant ``q * s`` in float32; dynamic ``s = amax / 448``.
  * INT8 (symmetric): ``s = amax / 127.5`` (``(qmax - qmin) / 2``), ``q = clamp(RNE(x * (1/s)), -128, 127)``;
    dequant ``q * s`` in float32.
  * A zero ``amax`` gives ``s = float32 eps`` (Quark's observer replaces zero scales by eps).

Shapes: ``x [..., H]``; a per-tensor scale is a 0-d float32, a per-token (or per-row static) scale is
``[..., 1]`` float32. Dynamic per-tensor scales are taken over the finite values.

Sharded tensors: with ``axis_name`` (mesh axes of an enclosing ``shard_map``) a dynamic ``amax`` is reduced
with ``lax.pmax`` over those axes, so a tensor split across devices gets the scale the whole tensor would
get. The caller names the axes that split what the scale covers (rows for per-tensor, columns for per-token).
Quantized FP8 values are ``jnp.float8_e4m3fn`` arrays (their codes are bit-exact to torch's e4m3fn cast),
INT8 values are ``int8``.

The multiplications here are float32 arithmetic, as in vLLM; XLA:CPU flushes float32 subnormals, which can
only matter for inputs below 2^-126 (they quantize to zero on any path).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from quarkmoe_jax.contracts import SEMANTICS, Numerics
from quarkmoe_jax.formats import elements as el

__all__ = [
    "FP8_E4M3_MAX",
    "FP8_MIN_SCALING_FACTOR",
    "SEMANTICS",
    "GRANULARITIES",
    "fp8_quantize",
    "fp8_dequantize",
    "fp8_quant_dequant",
    "int8_quantize",
    "int8_dequantize",
    "int8_quant_dequant",
]

FP8_E4M3_MAX = 448.0
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_E4M3_MAX * 512.0)
INT8_MIN_SCALE = 1e-10
GRANULARITIES = ("tensor", "token")
_F32_EPS = float(jnp.finfo(jnp.float32).eps)


def _check(semantics: str | Numerics, granularity: str) -> Numerics:
    """The numerics of ``semantics`` (a name or a :class:`Numerics`), after checking ``granularity``."""
    numerics = Numerics.of(semantics)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    return numerics


def _amax(x, granularity: str, axis_name=None):
    """Per-row ``max|x|`` (a NaN / Inf stays in its row), or per-tensor over the finite values only, so that
    one non-finite token cannot change every other token's scale (vLLM's float atomicMax skips NaN too).
    With ``axis_name`` the maximum is also taken across those mesh axes."""
    x = jnp.abs(jnp.asarray(x).astype(jnp.float32))
    if granularity == "token":
        amax = jnp.max(x, axis=-1, keepdims=True)
    else:
        amax = jnp.max(jnp.where(jnp.isfinite(x), x, 0.0))
    return lax.pmax(amax, axis_name) if axis_name else amax


def _static_scale(scale, name: str):
    """A static scale: a scalar (per tensor), or ``[..., 1]`` (one per row, e.g. per expert under Quark)."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale.size == 1:
        return scale.reshape(())
    if scale.shape[-1] != 1:
        raise ValueError(
            f"static {name} input scale must be a scalar (per-tensor) or [..., 1] per row, got shape {scale.shape}"
        )
    return scale


def _e4m3_from_float32(values):
    """float32 -> float8_e4m3fn with RNE, ±448 saturation (clamp first), NaN kept; bit-exact to torch."""
    codes = el.encode(jnp.clip(values, -FP8_E4M3_MAX, FP8_E4M3_MAX), el.E4M3FN)
    return lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)


def _e4m3_to_float32(q):
    return el.decode(lax.bitcast_convert_type(q, jnp.uint8), el.E4M3FN, jnp.float32)


def fp8_quantize(x, scale=None, *, granularity: str = "tensor", semantics: str | Numerics = "vllm", axis_name=None):
    """Quantize activations to FP8 e4m3fn.

    Args:
      x: ``[..., H]`` float array.
      scale: static per-tensor scale (scalar float32), or None for dynamic quantization.
      granularity: for dynamic quantization, ``"tensor"`` (one scale) or ``"token"`` (one per row).
      semantics: ``"vllm"`` or ``"quark"``, or their :class:`Numerics` (module docstring).
      axis_name: mesh axes a dynamic amax is reduced over (module docstring), or None.

    Returns:
      ``(q, scale)``: ``q`` float8_e4m3fn ``[..., H]``; ``scale`` float32, 0-d or ``[..., 1]``.
    """
    quark = _check(semantics, granularity).quark_quantizers
    x32 = jnp.asarray(x).astype(jnp.float32)
    if scale is None:
        amax = _amax(x32, granularity, axis_name)
        if quark:
            scale = jnp.where(amax == 0, _F32_EPS, el.exact_divide(amax, FP8_E4M3_MAX))
        else:
            scale = jnp.maximum(el.exact_divide(amax, FP8_E4M3_MAX), FP8_MIN_SCALING_FACTOR)
    else:
        scale = _static_scale(scale, "FP8")
    scaled = el.exact_divide(x32, scale) if quark else x32 * (1.0 / scale)
    return _e4m3_from_float32(scaled), scale


def fp8_dequantize(q, scale, dtype=jnp.bfloat16, *, semantics: str | Numerics = "vllm"):
    """FP8 values times their scale, in ``dtype``. vLLM rounds through float16 first (its ``fp16(q) * s``)."""
    quark = _check(semantics, "tensor").quark_quantizers
    values = _e4m3_to_float32(q) * jnp.asarray(scale, jnp.float32)
    if not quark:
        values = el.round_float32_to(values, jnp.float16).astype(jnp.float32)
    return el.round_float32_to(values, dtype)


def fp8_quant_dequant(
    x, scale=None, *, granularity: str = "tensor", semantics: str | Numerics = "vllm", dtype=None, axis_name=None
):
    """FP8 fake quantization: :func:`fp8_quantize` then :func:`fp8_dequantize`, in ``x``'s dtype by default."""
    q, s = fp8_quantize(x, scale, granularity=granularity, semantics=semantics, axis_name=axis_name)
    return fp8_dequantize(q, s, jnp.asarray(x).dtype if dtype is None else dtype, semantics=semantics)


def _round_half_away(v):
    return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


def int8_quantize(x, scale=None, *, granularity: str = "token", semantics: str | Numerics = "vllm", axis_name=None):
    """Quantize activations to symmetric INT8.

    Args:
      x: ``[..., H]`` float array.
      scale: static per-tensor scale (scalar float32), or None for dynamic quantization.
      granularity: dynamic only: ``"token"`` (per row) or ``"tensor"``.
      semantics: ``"vllm"`` or ``"quark"``, or their :class:`Numerics` (module docstring).
      axis_name: mesh axes a dynamic amax is reduced over (module docstring), or None.

    Returns:
      ``(q, scale)``: int8 ``[..., H]`` and the float32 scale (0-d or ``[..., 1]``).
    """
    quark = _check(semantics, granularity).quark_quantizers
    x32 = jnp.asarray(x).astype(jnp.float32)
    if quark:
        if scale is None:
            amax = _amax(x32, granularity, axis_name)
            scale = jnp.where(amax == 0, _F32_EPS, el.exact_divide(amax, 127.5))
        else:
            scale = _static_scale(scale, "INT8")
        q = jnp.round(x32 * (1.0 / scale))  # jnp.round is round-half-to-even
    elif scale is None and granularity == "token":
        absmax = jnp.maximum(_amax(x32, "token", axis_name), INT8_MIN_SCALE)
        q = _round_half_away(x32 * (127.0 / absmax))
        scale = el.exact_divide(absmax, 127.0)
    else:
        if scale is None:
            scale = jnp.maximum(el.exact_divide(_amax(x32, "tensor", axis_name), 127.0), INT8_MIN_SCALE)
        else:
            scale = _static_scale(scale, "INT8")
        q = jnp.round(el.exact_divide(x32, scale))
    return jnp.clip(q, -128, 127).astype(jnp.int8), scale


def int8_dequantize(q, scale, dtype=jnp.bfloat16):
    """``q * scale`` in float32, cast to ``dtype``."""
    return el.round_float32_to(jnp.asarray(q).astype(jnp.float32) * jnp.asarray(scale, jnp.float32), dtype)


def int8_quant_dequant(x, scale=None, *, granularity: str = "token", semantics: str | Numerics = "vllm", dtype=None):
    """INT8 fake quantization: :func:`int8_quantize` then :func:`int8_dequantize`, in ``x``'s dtype by default."""
    q, s = int8_quantize(x, scale, granularity=granularity, semantics=semantics)
    return int8_dequantize(q, s, jnp.asarray(x).dtype if dtype is None else dtype)
