"""Element codecs: e2m1, e3m2, e2m3, fp8 e4m3fn and E8M0, in integer arithmetic.

Every conversion here works on integer bit patterns, never on float arithmetic, for two reasons:

* ``astype`` to the fp6 dtypes crashes XLA:CPU inside ``jit`` (LLVM "Invalid bitcast i6 to i8"), and the
  emulation oracle must run on CPU;
* XLA:CPU flushes subnormal results of float arithmetic to zero, but Quark (torch on CPU) keeps them, and
  MX values at extreme E8M0 scales *are* fp32/bf16 subnormals. Composing the result bits directly makes
  every result correctly rounded whatever the backend's denormal mode.

A value is handled as ``(-1)^sign * significand * 2^exponent`` with an integer significand below 2^25. The
one rounding primitive, :func:`compose_bits`, rounds such a value to any binary float format with
round-to-nearest-even; element formats saturate at their largest finite value instead of overflowing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "FloatFormat",
    "E2M1",
    "E3M2",
    "E2M3",
    "E4M3FN",
    "FLOAT32",
    "BFLOAT16",
    "FLOAT16",
    "ELEMENT_FORMATS",
    "E8M0_NAN",
    "E8M0_ONE",
    "element_format",
    "target_format",
    "compose_bits",
    "decode_parts",
    "encode",
    "decode",
    "f32_parts",
    "e8m0_decode",
    "e8m0_encode",
    "e8m0_is_nan",
    "round_float32_to",
    "exact_divide",
]


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``ebits`` exponent bits, ``mbits`` mantissa bits.

    ``saturating`` formats (the MX elements and e4m3fn) have no infinity: values beyond the largest finite
    one round to it. ``max_code`` is the largest finite magnitude code (e4m3fn reserves 0x7F for NaN).
    """

    name: str
    ebits: int
    mbits: int
    saturating: bool
    max_code: int
    nan_code: int | None = None

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def nbits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value (Quark's ``emax``: 2 for e2m1, 4 for e3m2)."""
        return (self.max_code >> self.mbits) - self.bias

    @property
    def max_value(self) -> float:
        return float(decode_table(self)[self.max_code])

    @property
    def min_exponent(self) -> int:
        """Exponent of the least significant bit of the smallest subnormal."""
        return 1 - self.bias - self.mbits


E2M1 = FloatFormat("e2m1", 2, 1, saturating=True, max_code=0b0111)
E3M2 = FloatFormat("e3m2", 3, 2, saturating=True, max_code=0b011111)
E2M3 = FloatFormat("e2m3", 2, 3, saturating=True, max_code=0b011111)
E4M3FN = FloatFormat("e4m3fn", 4, 3, saturating=True, max_code=0x7E, nan_code=0x7F)
FLOAT32 = FloatFormat("float32", 8, 23, saturating=False, max_code=0x7F7FFFFF)
BFLOAT16 = FloatFormat("bfloat16", 8, 7, saturating=False, max_code=0x7F7F)
FLOAT16 = FloatFormat("float16", 5, 10, saturating=False, max_code=0x7BFF)

ELEMENT_FORMATS = {f.name: f for f in (E2M1, E3M2, E2M3, E4M3FN)}
_ELEMENT_ALIASES = {"fp4": E2M1, "fp4_e2m1": E2M1, "fp6_e3m2": E3M2, "fp6_e2m3": E2M3, "fp8_e4m3": E4M3FN}
_TARGETS = {jnp.dtype(jnp.float32): FLOAT32, jnp.dtype(jnp.bfloat16): BFLOAT16, jnp.dtype(jnp.float16): FLOAT16}
_UINT_FOR_BITS = {32: jnp.uint32, 16: jnp.uint16, 8: jnp.uint8}

E8M0_NAN = 255
"""The E8M0 code that the OCP MX spec reserves for NaN. Quark never writes it; we decode it as NaN."""
E8M0_ONE = 127
"""The E8M0 code of 1.0: the neutral scale that pads blocks and fills parameters a checkpoint does not write."""


def element_format(name: str | FloatFormat) -> FloatFormat:
    """Look up an element format by our name (``e2m1``…) or Quark's dtype name (``fp4``, ``fp6_e3m2``…)."""
    if isinstance(name, FloatFormat):
        return name
    fmt = ELEMENT_FORMATS.get(name) or _ELEMENT_ALIASES.get(name)
    if fmt is None:
        known = sorted(ELEMENT_FORMATS) + sorted(_ELEMENT_ALIASES)
        raise ValueError(f"unknown element format {name!r}; expected one of {known}")
    return fmt


def target_format(dtype) -> FloatFormat:
    """The :class:`FloatFormat` of an output dtype (float32, bfloat16 or float16)."""
    fmt = _TARGETS.get(jnp.dtype(dtype))
    if fmt is None:
        raise ValueError(f"unsupported float dtype {jnp.dtype(dtype)}; expected float32, bfloat16 or float16")
    return fmt


def _bit_length(x):
    """Number of significant bits of a uint32 array (0 for 0)."""
    return (32 - lax.clz(x)).astype(jnp.int32)


def _shift_right_rne(value, shift):
    """``round_half_even(value / 2**shift)`` for uint32 ``value`` < 2**25 and int32 ``shift`` >= 0."""
    shift = jnp.minimum(shift, 31).astype(jnp.uint32)
    one = jnp.uint32(1)
    quotient = value >> shift
    remainder = value & ((one << shift) - one)
    half = jnp.where(shift > 0, one << (shift - one), jnp.uint32(0))
    round_up = (shift > 0) & ((remainder > half) | ((remainder == half) & ((quotient & one) == one)))
    return quotient + round_up.astype(jnp.uint32)


def compose_bits(sign, significand, exponent, fmt: FloatFormat):
    """Bits of ``fmt`` nearest (RNE) to ``(-1)^sign * significand * 2^exponent``.

    Args:
      sign: bool/int array, 1 = negative.
      significand: uint32 array, below 2**25.
      exponent: int32 array (any range).
      fmt: target format. Saturating formats clamp to ``max_code``; the others overflow to infinity.

    Returns:
      uint32 array of ``fmt.nbits``-bit codes. A zero significand gives a signed zero.
    """
    significand = significand.astype(jnp.uint32)
    exponent = exponent.astype(jnp.int32)
    length = _bit_length(significand)
    top_exponent = exponent + length - 1  # floor(log2(value)) for a nonzero value
    min_normal = 1 - fmt.bias
    normal = top_exponent >= min_normal
    # Exponent of the least significant kept bit: mbits below the top bit, or the subnormal quantum.
    lsb_exponent = jnp.where(normal, top_exponent - fmt.mbits, fmt.min_exponent)
    shift = lsb_exponent - exponent
    rounded = jnp.where(
        shift >= 0,
        _shift_right_rne(significand, jnp.maximum(shift, 0)),
        significand << jnp.clip(-shift, 0, 31).astype(jnp.uint32),
    )
    # For a normal value `rounded` has mbits+1 bits (or carried to mbits+2); adding the biased exponent of
    # the implicit bit's position handles the carry. A subnormal value is its own code (carry -> min normal).
    biased = jnp.where(normal, top_exponent + fmt.bias - 1, 0).astype(jnp.uint32)
    magnitude = (biased << fmt.mbits) + rounded
    magnitude = jnp.where(length == 0, jnp.uint32(0), magnitude)
    if fmt.saturating:
        magnitude = jnp.minimum(magnitude, jnp.uint32(fmt.max_code))
    else:
        infinity = jnp.uint32(((1 << fmt.ebits) - 1) << fmt.mbits)
        magnitude = jnp.minimum(magnitude, infinity)
    sign_bit = jnp.asarray(sign).astype(jnp.uint32) << (fmt.ebits + fmt.mbits)
    return sign_bit | magnitude


@functools.cache
def _parts_tables(fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """Per magnitude code: integer significand and exponent with value = significand * 2^exponent."""
    codes = np.arange(1 << (fmt.ebits + fmt.mbits))
    biased = codes >> fmt.mbits
    mantissa = codes & ((1 << fmt.mbits) - 1)
    significand = np.where(biased == 0, mantissa, mantissa | (1 << fmt.mbits)).astype(np.uint32)
    exponent = (np.maximum(biased, 1) - fmt.bias - fmt.mbits).astype(np.int32)
    return significand, exponent


@functools.cache
def decode_table(fmt: FloatFormat) -> np.ndarray:
    """float64 value of every code of an element format (NaN at ``nan_code``), the reference grid."""
    significand, exponent = _parts_tables(fmt)
    magnitude = significand * np.exp2(exponent.astype(np.float64))
    if fmt.nan_code is not None:
        magnitude[fmt.nan_code] = np.nan
    return np.concatenate([magnitude, -magnitude])


def decode_parts(codes, fmt: FloatFormat):
    """Split element codes into ``(sign, significand, exponent)``: the exact value, ready to rescale."""
    codes = jnp.asarray(codes).astype(jnp.int32)
    magnitude_bits = fmt.ebits + fmt.mbits
    magnitude = codes & ((1 << magnitude_bits) - 1)
    significand, exponent = _parts_tables(fmt)
    sign = (codes >> magnitude_bits) & 1
    return sign, jnp.asarray(significand)[magnitude], jnp.asarray(exponent)[magnitude]


def f32_parts(x):
    """Split float32 (or narrower, converted exactly) values into ``(sign, significand, exponent, bits)``.

    ``bits`` is the uint32 pattern; non-finite values give meaningless parts and are for the caller to mask.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        x = x.astype(jnp.float32)  # exact for bf16 / f16 (XLA converts by bit manipulation)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    sign = bits >> 31
    biased = ((bits >> 23) & 0xFF).astype(jnp.int32)
    mantissa = bits & 0x7FFFFF
    significand = jnp.where(biased == 0, mantissa, mantissa | 0x800000)
    exponent = jnp.maximum(biased, 1) - 127 - 23
    return sign, significand, exponent, bits


def _to_float(bits, dtype):
    fmt = target_format(dtype)
    return lax.bitcast_convert_type(bits.astype(_UINT_FOR_BITS[fmt.nbits]), jnp.dtype(dtype))


def encode(x, fmt: str | FloatFormat, exponent_shift=0):
    """Encode ``x / 2**exponent_shift`` to element codes with round-to-nearest-even and saturation.

    Args:
      x: float32 / bfloat16 / float16 array.
      fmt: an element format (``e2m1``, ``e3m2``, ``e2m3``, ``e4m3fn`` or Quark's names).
      exponent_shift: int32 array broadcastable to ``x``; the division is exact (no intermediate rounding).

    Returns:
      uint8 codes ``sign << (ebits+mbits) | magnitude``. For the MX elements a value that rounds to zero is
      +0 (Quark's ``fake_quantize_element`` drops the sign of zero) and NaN / ±Inf map to the bit patterns
      Quark's packers produce (exponent all ones; mantissa top bit set for NaN). For e4m3fn zero keeps its
      sign, ±Inf saturates to ±448 and NaN is 0x7F / 0xFF, as ``clamp`` + ``torch.float8_e4m3fn`` give.
    """
    fmt = element_format(fmt)
    sign, significand, exponent, bits = f32_parts(x)
    code = compose_bits(sign, significand, exponent - jnp.asarray(exponent_shift, jnp.int32), fmt)
    if fmt.nan_code is None:
        code = jnp.where((code & ((1 << (fmt.ebits + fmt.mbits)) - 1)) == 0, jnp.uint32(0), code)
    return _nonfinite_codes(code, bits, fmt).astype(jnp.uint8)


def _nonfinite_codes(code, bits, fmt: FloatFormat):
    """Replace the codes of non-finite inputs (given by their float32 ``bits``) by Quark's patterns."""
    magnitude_bits = fmt.ebits + fmt.mbits
    is_inf = (bits & 0x7FFFFFFF) == 0x7F800000
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    sign = (bits >> 31).astype(jnp.uint32) << magnitude_bits
    exponent_ones = ((1 << fmt.ebits) - 1) << fmt.mbits
    if fmt.nan_code is not None:
        inf_code = fmt.max_code  # clamp(±inf, ±448) saturates in the FP8 quantizers
        nan_code = fmt.nan_code
    else:  # Quark's Pack_fp4/Pack_fp6 read the exponent/mantissa bits of inf/NaN quotients
        inf_code = exponent_ones
        nan_code = exponent_ones | (1 << (fmt.mbits - 1))
    code = jnp.where(is_inf, sign | inf_code, code)
    return jnp.where(is_nan, sign | nan_code, code)


def decode(codes, fmt: str | FloatFormat, dtype=jnp.float32, exponent_offset=0):
    """Decode element codes to floats, optionally times ``2**exponent_offset`` (an E8M0 scale), exactly.

    Args:
      codes: uint8 codes of ``fmt``.
      fmt: element format.
      dtype: float32, bfloat16 or float16. The result is the exact value correctly rounded to ``dtype``
        (overflow gives ±inf; for float32 and bfloat16 every MX value is exact or overflows).
      exponent_offset: int32 array broadcastable to ``codes``.

    Returns:
      Array of ``dtype``. e4m3fn's NaN code decodes to NaN.
    """
    fmt = element_format(fmt)
    target = target_format(dtype)
    sign, significand, exponent = decode_parts(codes, fmt)
    bits = compose_bits(sign, significand, exponent + jnp.asarray(exponent_offset, jnp.int32), target)
    if fmt.nan_code is not None:
        is_nan = (jnp.asarray(codes).astype(jnp.int32) & ((1 << (fmt.ebits + fmt.mbits)) - 1)) == fmt.nan_code
        bits = jnp.where(is_nan, _quiet_nan_bits(target), bits)
    return _to_float(bits, dtype)


def round_float32_to(values, dtype):
    """Cast float32 ``values`` to ``dtype`` with round-to-nearest-even, subnormals kept (no FTZ)."""
    values = jnp.asarray(values, jnp.float32)
    if jnp.dtype(dtype) == jnp.float32:
        return values
    target = target_format(dtype)
    sign, significand, exponent, bits = f32_parts(values)
    out = compose_bits(sign, significand, exponent, target)
    is_inf = (bits & 0x7FFFFFFF) == 0x7F800000
    inf_bits = jnp.uint32(((1 << target.ebits) - 1) << target.mbits)
    out = jnp.where(is_inf, (sign << (target.nbits - 1)) | inf_bits, out)
    out = jnp.where((bits & 0x7FFFFFFF) > 0x7F800000, _quiet_nan_bits(target), out)
    return _to_float(out, dtype)


def exact_divide(numerator, denominator):
    """IEEE-correct ``numerator / denominator`` (float32), broadcasting as usual.

    XLA rewrites a division by a broadcast scalar or row (even a runtime one) into a multiplication by the
    rounded reciprocal, which is off by one ulp for about half of all inputs. Dividing two arrays of the
    full shape, hidden from the simplifier by an optimization barrier, keeps the true division that torch
    and CUDA perform.
    """
    numerator = jnp.asarray(numerator, jnp.float32)
    denominator = jnp.asarray(denominator, jnp.float32)
    shape = jnp.broadcast_shapes(numerator.shape, denominator.shape)
    numerator, denominator = lax.optimization_barrier(
        (jnp.broadcast_to(numerator, shape), jnp.broadcast_to(denominator, shape))
    )
    return numerator / denominator


def _quiet_nan_bits(fmt: FloatFormat):
    return jnp.uint32((((1 << fmt.ebits) - 1) << fmt.mbits) | (1 << (fmt.mbits - 1)))


def e8m0_decode(scales, dtype=jnp.float32):
    """E8M0 codes -> ``2**(s - 127)`` in ``dtype``, exactly (code 0 is 2^-127, a float32 subnormal).

    Code 255 decodes to NaN, as the OCP MX spec says (Quark and vLLM's bf16 path give +inf; Quark never
    writes 255, so the two agree on every checkpoint Quark produces). Codes that ``dtype`` cannot
    represent round correctly (float16: large codes overflow to inf, small ones to subnormals or 0).
    """
    scales = jnp.asarray(scales)
    if scales.dtype != jnp.uint8:
        raise TypeError(f"E8M0 scales must be uint8 codes, got {scales.dtype}")
    target = target_format(dtype)
    exponent = scales.astype(jnp.int32) - 127
    bits = compose_bits(jnp.zeros_like(exponent), jnp.ones_like(exponent, jnp.uint32), exponent, target)
    bits = jnp.where(scales == E8M0_NAN, _quiet_nan_bits(target), bits)
    return _to_float(bits, dtype)


def e8m0_is_nan(scales):
    """True where an E8M0 code is the NaN code 0xFF."""
    return jnp.asarray(scales) == E8M0_NAN


def e8m0_encode(scale):
    """Power-of-two float scales -> E8M0 codes exactly as Quark's exporter writes them.

    Quark's ``to_e8m0_uint8`` computes ``round(log2(max(scale, 2**-126)))`` clamped to [-127, 127], so the
    smallest code it writes is **1** (2^-126), never 0. A power of two below 2^-126 therefore encodes as
    code 1. A non-power-of-two rounds its exponent to nearest (mantissa >= sqrt(2) rounds up). NaN, +inf and
    values <= 0 encode to :data:`E8M0_NAN`, which Quark leaves undefined.
    """
    _, significand, _, bits = f32_parts(scale)
    biased = ((bits >> 23) & 0xFF).astype(jnp.int32)
    # round(log2(x)) for a normal x: exponent + (significand >= sqrt(2)); sqrt(2) * 2^23 = 0xB504F3.3
    unbiased = biased - 127 + (significand >= 0xB504F4).astype(jnp.int32)
    code = jnp.clip(jnp.where(biased == 0, -126, unbiased), -126, 127) + 127
    invalid = (bits >= 0x7F800000) | ((bits & 0x7FFFFFFF) == 0)
    return jnp.where(invalid, E8M0_NAN, code).astype(jnp.uint8)
