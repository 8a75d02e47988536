"""OCP MX block quantization along the last axis (block 32), bit-exact to amd-quark 0.13.

The codec: :func:`quantize_packed` (float -> packed codes + E8M0 scales), :func:`quant_dequant` (Quark's
fake-quant in one call), :func:`pack_codes` / :func:`unpack_codes`. The container is
:class:`quarkmoe_jax.formats.QArray` (``quantize`` / ``dequantize`` there).

What Quark computes for a 32-element block ``x`` (see docs/formats.md for the derivation and the cases where
Quark and the OCP spec part ways):

1. ``amax = max |x|`` (exact).
2. The scale exponent, by ``scale_mode``:
   * ``"even"`` (Quark's default): round ``amax`` at the element's mantissa width (add half an ulp at mbits
     in float32 bits, mask to sign+exponent), then ``clamp(floor(log2) - emax, -127, 127)``.
   * ``"floor"`` (the OCP MX v1.0 rule) / ``"ceil"``: ``floor|ceil(log2(amax)) - emax``. Quark evaluates
     ``log2`` and ``2**e`` *in the input's dtype*, so an amax just below a power of two can round up (always
     visible for bfloat16 inputs), a ``2**e`` that underflows the dtype becomes float32 eps (2^-23), and a
     zero block gets 2^-23 too. We reproduce that exactly from tables built with correctly rounded log2.
3. Elements ``RNE_sat(x / 2**e)`` in the element format (zero results lose their sign).
4. The stored E8M0 byte is ``clamp(e, -126, 127) + 127``: Quark's exporter never writes code 0, so a block
   quantized with 2^-127 (or, in floor/ceil mode, smaller) stores 2^-126 (see :func:`elements.e8m0_encode`).
   ``quant_dequant`` uses the exponent the elements were quantized with, like Quark's fake-quant.

Non-finite inputs: in ``"even"`` mode an Inf makes the block scale 2^127 and the Inf element keeps its sign
(it decodes back to Inf), exactly as Quark. A NaN anywhere in a block (and an Inf in ``"floor"``/``"ceil"``
mode, where Quark's scale becomes Inf) makes the whole block NaN: we store the E8M0 NaN code 0xFF where Quark
stores an undefined byte, and every element code is the positive NaN pattern Quark writes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from quarkmoe_jax.formats import elements as el

__all__ = [
    "MX_BLOCK_SIZE",
    "round_up",
    "SCALE_MODES",
    "MXFormat",
    "MXFP4",
    "MXFP6_E3M2",
    "MXFP6_E2M3",
    "MXFP8_E4M3",
    "MX_FORMATS",
    "mx_format",
    "quantize_packed",
    "quant_dequant",
    "pack_codes",
    "unpack_codes",
    "block_scale_exponents",
]

MX_BLOCK_SIZE = 32
SCALE_MODES = ("even", "floor", "ceil")


def round_up(n: int, multiple: int = MX_BLOCK_SIZE) -> int:
    """The smallest multiple of ``multiple`` that is at least ``n`` (a padded size)."""
    return -(-n // multiple) * multiple


_EPS_EXPONENT = -23  # torch.finfo(torch.float32).eps, Quark's replacement for a zero scale


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """An OCP MX format: element codec, bits per element, Quark's dtype name and the dtype Quark stores the
    packed codes as (``stored_dtype``: uint8, or float8_e4m3fn for MXFP8, the same bytes)."""

    name: str
    element: el.FloatFormat
    quark_dtype: str
    stored_dtype: np.dtype = np.dtype(np.uint8)

    @property
    def code_dtypes(self) -> tuple[np.dtype, ...]:
        """The dtypes a reader accepts for the packed codes (read as their bytes): uint8 and the stored one."""
        return tuple(dict.fromkeys((np.dtype(np.uint8), self.stored_dtype)))

    @property
    def bits(self) -> int:
        return self.element.nbits

    def packed_length(self, length: int) -> int:
        """Bytes along the packed axis for ``length`` elements (length/2 for fp4, 3*length/4 for fp6, length
        for fp8)."""
        return length * self.bits // 8

    def logical_length(self, packed_length: int) -> int:
        return packed_length * 8 // self.bits

    @property
    def bytes_per_element(self) -> float:
        """Storage per element including the shared E8M0 scale byte."""
        return self.bits / 8 + 1 / MX_BLOCK_SIZE

    def __repr__(self) -> str:
        return f"MXFormat({self.name})"


MXFP4 = MXFormat("mxfp4", el.E2M1, "fp4")
MXFP6_E3M2 = MXFormat("mxfp6_e3m2", el.E3M2, "fp6_e3m2")
MXFP6_E2M3 = MXFormat("mxfp6_e2m3", el.E2M3, "fp6_e2m3")
MXFP8_E4M3 = MXFormat("mxfp8_e4m3", el.E4M3FN, "fp8_e4m3", np.dtype(ml_dtypes.float8_e4m3fn))
"""MXFP8: e4m3fn elements (one uint8 code each, the float8_e4m3fn bit pattern) with E8M0 block scales
(vLLM's ``QuarkW8A8Mxfp8MoEMethod``; Quark's ``fp8_e4m3`` with ``per_group`` 32 and ``e8m0`` scales)."""
MX_FORMATS = {f.name: f for f in (MXFP4, MXFP6_E3M2, MXFP6_E2M3, MXFP8_E4M3)}
_BY_QUARK_DTYPE = {f.quark_dtype: f for f in MX_FORMATS.values()}


def mx_format(fmt: str | MXFormat) -> MXFormat:
    """Resolve ``"mxfp4"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``, ``"mxfp8_e4m3"`` (or Quark's ``"fp4"``,
    ``"fp6_*"``, ``"fp8_e4m3"``)."""
    if isinstance(fmt, MXFormat):
        return fmt
    found = MX_FORMATS.get(fmt) or _BY_QUARK_DTYPE.get(fmt)
    if found is None:
        raise ValueError(
            f"unknown MX format {fmt!r}; expected one of {sorted(MX_FORMATS)} (or Quark's {sorted(_BY_QUARK_DTYPE)})"
        )
    return found


def _check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; expected one of {SCALE_MODES}")


def _check_block_axis(length: int, what: str = "last axis") -> None:
    if length % MX_BLOCK_SIZE != 0:
        raise ValueError(
            f"MX quantization needs the {what} to be a multiple of {MX_BLOCK_SIZE}, got length {length}; "
            "pad it first (the checkpoint loader pads hidden/intermediate sizes with zeros)"
        )


# --------------------------------------------------------------------------------------------- packing


def pack_codes(codes, fmt: str | MXFormat):
    """Pack uint8 element codes along the last axis in Quark's layout.

    FP4: two codes per byte, low nibble = even index. FP6: four codes ``v0..v3`` form the 24-bit little-endian
    word ``v0 | v1<<6 | v2<<12 | v3<<18`` stored as 3 bytes. FP8: one code per byte.
    ``[..., K] -> [..., K/2 | 3K/4 | K]``.
    """
    fmt = mx_format(fmt)
    if fmt.bits == 8:
        return jnp.asarray(codes).astype(jnp.uint8)
    codes = jnp.asarray(codes).astype(jnp.uint32)
    k = codes.shape[-1]
    if fmt.bits == 4:
        if k % 2:
            raise ValueError(f"FP4 packing needs an even last axis, got {k}")
        pairs = codes.reshape(*codes.shape[:-1], k // 2, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8)
    if k % 4:
        raise ValueError(f"FP6 packing needs a last axis that is a multiple of 4, got {k}")
    quads = codes.reshape(*codes.shape[:-1], k // 4, 4)
    word = quads[..., 0] | (quads[..., 1] << 6) | (quads[..., 2] << 12) | (quads[..., 3] << 18)
    packed = jnp.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], axis=-1)
    return packed.reshape(*codes.shape[:-1], 3 * k // 4).astype(jnp.uint8)


def unpack_codes(packed, fmt: str | MXFormat):
    """Inverse of :func:`pack_codes`: ``[..., K/2 | 3K/4 | K]`` uint8 -> ``[..., K]`` uint8 codes."""
    fmt = mx_format(fmt)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed MX data must be uint8, got {packed.dtype}")
    if fmt.bits == 8:
        return packed
    n = packed.shape[-1]
    if fmt.bits == 4:
        lo, hi = packed & 0x0F, packed >> 4
        return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * n)
    if n % 3:
        raise ValueError(f"packed FP6 data needs a last axis that is a multiple of 3, got {n}")
    triples = packed.reshape(*packed.shape[:-1], n // 3, 3).astype(jnp.uint32)
    word = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
    codes = jnp.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], axis=-1)
    return codes.reshape(*packed.shape[:-1], 4 * n // 3).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------- block scales

_LOG2_DTYPES = {
    jnp.dtype(jnp.float32): np.float32,
    jnp.dtype(jnp.bfloat16): ml_dtypes.bfloat16,
    jnp.dtype(jnp.float16): np.float16,
}
_MIN_SUBNORMAL_EXPONENT = {np.float32: -149, ml_dtypes.bfloat16: -133, np.float16: -24}
_LOWEST_BINADE = -149  # float32's smallest subnormal


@functools.cache
def _log2_rounding_thresholds(dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Where ``dtype(float32(log2(v)))`` leaves the binade ``[2^e, 2^(e+1))``: how Quark's floor/ceil round.

    Returns two uint32 arrays indexed by ``e + 149``: the first float32 bit pattern in the binade at which the
    rounded log2 reaches ``e + 1`` (floor moves up) and at which it exceeds ``e`` (ceil moves up); 2**32-1 when
    it never does. float32 log2 is taken as correctly rounded (torch's is, on these inputs; the golden vectors
    check it), and a bfloat16/float16 input's log2 is rounded once more to that dtype, as torch does.
    """
    np_dtype = _LOG2_DTYPES[jnp.dtype(dtype_name)]
    exponents = np.arange(_LOWEST_BINADE, 128)
    floor_up = np.full(exponents.shape, 0xFFFFFFFF, np.uint64)
    ceil_up = np.full(exponents.shape, 0xFFFFFFFF, np.uint64)

    def rounded_log2(pattern: int) -> float:
        v = np.array([pattern], np.uint32).view(np.float32).astype(np.float64)
        return float(np.log2(v).astype(np.float32).astype(np_dtype)[0])

    def first_true(lo: int, hi: int, predicate) -> int | None:
        if not predicate(hi):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if predicate(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    for i, e in enumerate(exponents):
        lo = int(np.array([2.0**e], np.float32).view(np.uint32)[0])
        hi = 0x7F7FFFFF if e == 127 else int(np.array([2.0 ** (e + 1)], np.float32).view(np.uint32)[0]) - 1
        up = first_true(lo, hi, lambda p, e=e: rounded_log2(p) >= e + 1)
        above = first_true(lo, hi, lambda p, e=e: rounded_log2(p) > e)
        if up is not None:
            floor_up[i] = up
        if above is not None:
            ceil_up[i] = above
    return floor_up.astype(np.uint32), ceil_up.astype(np.uint32)


def _block_amax_bits(x):
    """float32 bit pattern of ``max |x|`` per 32-block (NaN if the block has one). ``[..., K] -> [..., K/32]``."""
    _, _, _, bits = el.f32_parts(x)
    magnitude = bits & 0x7FFFFFFF  # integer order == float order for |x|, NaN patterns above +inf
    blocks = magnitude.reshape(*magnitude.shape[:-1], -1, MX_BLOCK_SIZE)
    return blocks.max(axis=-1)


def block_scale_exponents(x, fmt: str | MXFormat, scale_mode: str = "even"):
    """Quark's per-block scale for ``x [..., K]``.

    Returns:
      ``(quant_exponent, scale_codes, nonfinite)``: int32 ``[..., K/32]`` exponent the elements are quantized
      with, uint8 E8M0 codes as Quark stores them, and a bool mask of blocks whose scale is not finite (NaN
      anywhere, or Inf in floor/ceil mode), which get code 0xFF.
    """
    fmt = mx_format(fmt)
    _check_scale_mode(scale_mode)
    x = jnp.asarray(x)
    _check_block_axis(x.shape[-1])
    emax = fmt.element.emax
    amax = _block_amax_bits(x)
    is_nan = amax > 0x7F800000
    is_inf = amax == 0x7F800000
    biased = (amax >> 23).astype(jnp.int32)
    if scale_mode == "even":
        # Round amax at the element's mantissa width: add half an ulp there, keep sign+exponent bits.
        rounded = (amax + jnp.uint32(1 << (22 - fmt.element.mbits))) & jnp.uint32(0xFF800000)
        rounded_biased = (rounded >> 23).astype(jnp.int32)
        # biased 0: amax rounds to zero (log2 -> -inf); 255: it rounds to inf (log2 -> inf). Both clamp.
        exponent = jnp.clip(rounded_biased - 127 - emax, -127, 127)
        exponent = jnp.where(rounded_biased == 0, -127, jnp.where(rounded_biased == 255, 127, exponent))
        nonfinite = is_nan
    else:
        floor_up, ceil_up = _log2_rounding_thresholds(jnp.dtype(x.dtype).name)
        mantissa = amax & 0x7FFFFF
        # exact floor(log2(amax)) for normal and subnormal amax
        exact = jnp.where(biased == 0, el._bit_length(mantissa) - 1 - 149, biased - 127)
        table = floor_up if scale_mode == "floor" else ceil_up
        index = jnp.clip(exact - _LOWEST_BINADE, 0, table.shape[0] - 1)
        log2_rounded = exact + (amax >= jnp.asarray(table)[index]).astype(jnp.int32)
        exponent = log2_rounded - emax
        min_exponent = _MIN_SUBNORMAL_EXPONENT[_LOG2_DTYPES[jnp.dtype(x.dtype)]]
        # 2**exponent underflows the input dtype (or amax == 0): Quark substitutes float32 eps.
        exponent = jnp.where((exponent < min_exponent) | (amax == 0), _EPS_EXPONENT, exponent)
        nonfinite = is_nan | is_inf
    exponent = jnp.where(nonfinite, 0, exponent)
    codes = (jnp.clip(exponent, -126, 127) + 127).astype(jnp.uint8)
    codes = jnp.where(nonfinite, jnp.uint8(el.E8M0_NAN), codes)
    return exponent.astype(jnp.int32), codes, nonfinite


def _encode_blocks(x, fmt: MXFormat, scale_mode: str):
    """Element codes ``[..., K]`` plus the outputs of :func:`block_scale_exponents`."""
    quant_exponent, scale_codes, nonfinite = block_scale_exponents(x, fmt, scale_mode)
    code = el.encode(x, fmt.element, jnp.repeat(quant_exponent, MX_BLOCK_SIZE, axis=-1)).astype(jnp.uint32)
    element = fmt.element
    nan_pattern = element.nan_code
    if nan_pattern is None:  # the MX elements have no NaN: Quark's packers write exponent ones, mantissa top bit
        nan_pattern = (((1 << element.ebits) - 1) << element.mbits) | (1 << (element.mbits - 1))
    code = jnp.where(jnp.repeat(nonfinite, MX_BLOCK_SIZE, axis=-1), jnp.uint32(nan_pattern), code)
    return code.astype(jnp.uint8), quant_exponent, scale_codes, nonfinite


def _fast_exponent_range(fmt: MXFormat) -> tuple[int, int]:
    """Scale exponents for which every nonzero element value times 2^e is a normal float32: the element's
    smallest subnormal (2^min_exponent) and largest value (< 2^(emax+1)) keep a biased exponent in [1, 254]."""
    return 1 - (fmt.element.min_exponent + 127), 254 - (fmt.element.emax + 127)


@functools.cache
def _value_bits_table(fmt: MXFormat) -> np.ndarray:
    """int32 float32 bit patterns of every element code (signed zero included)."""
    return el.decode_table(fmt.element).astype(np.float32).view(np.int32)


def _rescale(codes, exponents, nan_blocks, fmt: MXFormat, dtype):
    """``decode(code) * 2**exponent`` per block, computed in float32 and then cast to ``dtype`` (as Quark).

    Exact either way: when every exponent is in :func:`_fast_exponent_range` the float32 result is the
    element's bit pattern with the exponent added to its exponent field (and bfloat16 is its top half, exact
    for these values); otherwise every value is composed and rounded by :func:`elements.compose_bits`.
    """
    per_element = jnp.repeat(exponents, MX_BLOCK_SIZE, axis=-1)
    nan = jnp.repeat(nan_blocks, MX_BLOCK_SIZE, axis=-1)
    target_dtype = jnp.dtype(dtype)

    def exact():
        values = el.decode(codes, fmt.element, jnp.float32, per_element)
        values = jnp.where(nan, jnp.float32(jnp.nan), values)
        return el.round_float32_to(values, target_dtype)

    def fast():
        bits = jnp.asarray(_value_bits_table(fmt))[codes.astype(jnp.int32)]
        finite_nonzero = ((bits & 0x7FFFFFFF) != 0) & ((bits & 0x7F800000) != 0x7F800000)  # e4m3fn has a NaN
        bits = jnp.where(finite_nonzero, bits + (per_element << 23), bits)
        bits = jnp.where(nan, jnp.int32(0x7FC00000), bits)
        if target_dtype == jnp.bfloat16:
            return jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
        values = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return values if target_dtype == jnp.float32 else el.round_float32_to(values, target_dtype)

    lo, hi = _fast_exponent_range(fmt)
    in_range = jnp.all((exponents >= lo) & (exponents <= hi))
    return jax.lax.cond(in_range, fast, exact)


# ----------------------------------------------------------------------------------------- entry points


def quantize_packed(x, fmt: str | MXFormat, scale_mode: str = "even"):
    """Quantize ``x [..., K]`` (float32/bfloat16/float16, K a multiple of 32) as Quark's exporter does.

    Returns ``(packed, scales)``: uint8 codes packed along the last axis and uint8 E8M0 ``[..., K/32]``
    (:func:`quarkmoe_jax.formats.quantize` wraps them in a :class:`~quarkmoe_jax.formats.QArray`).
    """
    fmt = mx_format(fmt)
    x = _check_float_input(x)
    codes, _, scale_codes, _ = _encode_blocks(x, fmt, scale_mode)
    return pack_codes(codes, fmt), scale_codes


def quant_dequant(x, fmt: str | MXFormat, scale_mode: str = "even", dtype=None):
    """Quark's fake quantization (QDQ) of ``x [..., K]``: quantize then dequantize, in ``x``'s dtype.

    Computed as Quark does (float32, then cast); equal to ``quantize(x).dequantize()`` except for blocks
    whose scale exponent is below -126, where Quark stores a larger scale than it quantized with.
    """
    fmt = mx_format(fmt)
    x = _check_float_input(x)
    codes, quant_exponent, _, nonfinite = _encode_blocks(x, fmt, scale_mode)
    return _rescale(codes, quant_exponent, nonfinite, fmt, x.dtype if dtype is None else dtype)


def _check_float_input(x):
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"MX quantization takes float32, bfloat16 or float16 input, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("MX quantization needs at least one axis (blocks run along the last axis)")
    _check_block_axis(x.shape[-1])
    return x
