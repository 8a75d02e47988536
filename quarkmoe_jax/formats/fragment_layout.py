"""MX weights in the *fragment layout* the v2 jax-triton kernels read, and the exact conversion both ways.

Hopper's ``wgmma`` takes its A operand from registers in a fixed fragment: in a 64-row slice each warp owns
16 rows; lane ``l`` (``g = l // 4``, ``tig = l % 4``) holds rows ``g`` and ``g + 8`` and, per 16-wide K step,
the element pairs ``2*tig + {0, 1}`` and ``2*tig + 8 + {0, 1}``. The v2 kernels feed the decoded weights
there straight from the load (:mod:`quarkmoe_jax.kernels.triton.mx_gemm`), so the bytes are stored in that
order and bit-arranged for a short decode:

* **Units.** The ``[N, K]`` weight of one expert is cut into units of 16 rows x 128 K (1 KiB of FP4),
  stored N-major: unit ``(nb, kb)`` holds rows ``16*nb ..`` and K ``128*kb ..``; ``words [E, N/16, K/128,
  1024]`` uint8. Inside a unit the byte offset is ``c6*512 + g*64 + tig*16 + 4*q + b``: each thread reads
  16 contiguous bytes, a warp 512.
* **Words.** The little-endian 32-bit word ``(c6, g, tig, q = q0 + 2*q1)`` holds the four bf16x2 register
  pairs ``o = 2*h8 + k3`` of row ``16*nb + 8*h8 + g`` at ``k = 128*kb + 64*c6 + 32*q1 + 16*q0 + 8*k3 +
  2*tig + {0, 1}``. The eight code bits of pair ``o`` (mantissa, exponent low, exponent high, sign of the
  even element, then of the odd one) sit at word bits :data:`SOURCE_BITS`, so that
  ``rotl(w, 6)``, ``rotl(w, 12)``, ``rotl(w, 2)`` masked by ``0x81C081C0`` and
  ``(rotl(w, 8) & 0x00400040) | (w & 0x81808180)`` are the bf16 bit patterns ``sign<<15 | magnitude<<6``
  (the e2m1 value times 2^-126) of the four pairs: 9 integer instructions per 8 elements.
* **Scales.** E8M0 units of 16 rows x 4 groups (one 128-K block) = 64 bytes, byte ``g*8 + kg*2 + h8`` =
  scale of row ``16*nb + 8*h8 + g``, group ``4*kb + kg``: one 8-byte load per thread.
* **FP6.** Each 6-bit code is split in two. Its sign and three magnitude bits form a 4-bit code stored in
  ``words`` exactly as an FP4 code is (so the same rotate-and-mask formulas place them at the bf16 bits they
  take: 15 and 6..8); the other two magnitude bits (:data:`LOW_TARGETS`: bf16 bits 4, 5 for e2m3, 5 and 9
  for e3m2) go to ``low_bits [E, N/16, K/128, 512]``: unit byte ``g*64 + c6*32 + tig*8 + 2*q + b`` (each
  thread reads 8 bytes per ``c6``), two bytes per word. The kernel sees the two bytes of word ``w`` as the
  register ``R = B0 | B0<<8 | B1<<16 | B1<<24``; pair ``o`` takes ``rotl(R, LOW_ROTATIONS[o]) & mask`` (bits
  placed by :data:`LOW_SOURCE_BITS`), OR'ed into the FP4-style pattern. The pattern is the element's value
  times ``2^-(127 - bias)`` (``bias`` 1 for e2m1 and e2m3, 3 for e3m2); 6 bits per element, as packed.
* **Padding.** K is padded to a multiple of 128 with code 0 (value +0) and scale code 127, N to a multiple
  of 128 with zero rows: the padded products are exact zeros. ``shape`` keeps the logical ``(E, N, K)``.
  (N to 128, not one warpgroup's 64, so that 128-row tiles fit every weight: gpt-oss's N = 2880 ran 64-row
  tiles, 8-28% slower per GEMM on the H200, docs/performance.md.)

Same bytes as the checkpoint plus that padding (gpt-oss's K = 2880 -> 2944: 2.2%). :func:`to_fragment_layout`
and :meth:`QArray.to_checkpoint_layout` are exact inverses (tested), and :func:`decode_fragment_words` is the
kernel's decode written in jnp (the CPU test that the layout and the decode give the checkpoint's values).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.formats.elements import E8M0_ONE
from quarkmoe_jax.formats.mx import mx_format, pack_codes, round_up, unpack_codes
from quarkmoe_jax.formats.qarray import LayoutCodec, QArray, QType, register_layout

__all__ = [
    "FRAGMENT_LAYOUT",
    "to_fragment_layout",
    "fragment_qarray",
    "padded_shape",
    "exact_scales",
    "decode_fragment_words",
    "SOURCE_BITS",
    "UNIT_ROWS",
    "UNIT_K",
    "ROW_ALIGN",
    "fast_scale_max",
    "LOW_TARGETS",
    "LOW_ROTATIONS",
    "LOW_SOURCE_BITS",
    "FRAGMENT_FORMATS",
]

UNIT_ROWS, UNIT_K = 16, 128
ROW_ALIGN = 128  # the v2 kernels' usual block_n (docstring: Padding)
FRAGMENT_FORMATS = ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3")


def fast_scale_max(fmt) -> int:
    """Largest E8M0 code for which one bf16 multiply by ``2^(s - bias)`` applies the scale to the decoded
    pattern exactly (the kernels' fast path: 128 for e2m1 and e2m3, 130 for e3m2); larger codes take two
    multiplies (:func:`exact_scales`)."""
    return 127 + mx_format(fmt).element.bias


_TARGET_LOW, _TARGET_HIGH = (6, 7, 8, 15), (22, 23, 24, 31)  # bf16 bits of mantissa, exponent 0/1, sign
_ROTATIONS = {0: 6, 1: 12, 2: 2}


def _source_bit(pair: int, target: int) -> int:
    if pair in _ROTATIONS:
        return (target - _ROTATIONS[pair]) % 32
    return (target - 8) % 32 if target in (6, 22) else target  # pair 3: two bits rotated by 8, the rest in place


SOURCE_BITS = np.array([[_source_bit(o, t) for t in _TARGET_LOW + _TARGET_HIGH] for o in range(4)], np.int64)
"""``SOURCE_BITS[o, i]``: the word bit holding bit ``i % 4`` of the even (``i < 4``) or odd element's code
of register pair ``o``."""
assert sorted(SOURCE_BITS.ravel().tolist()) == list(range(32))  # a permutation of the word's bits

LOW_TARGETS = {"mxfp6_e2m3": (4, 5), "mxfp6_e3m2": (5, 9)}
"""bf16 bit of an FP6 code's low-plane bit 0 and bit 1 (the magnitude bits the 4-bit part leaves out)."""
LOW_ROTATIONS = {"mxfp6_e2m3": (0, 2, 4, 6), "mxfp6_e3m2": (0, 1, 2, 3)}
"""Left rotation of the low-plane register ``R`` for register pair ``o`` (found by search: the 16 bits of
the two bytes, each present twice in ``R``, are taken once each)."""


def _low_source_bits(fmt_name: str) -> np.ndarray:
    """``[o, i]``: bit (``8*byte + bit``) of the word's two low-plane bytes that holds low bit ``i % 2`` of the
    even (``i < 2``) or odd element of pair ``o``."""
    t0, t1 = LOW_TARGETS[fmt_name]
    table = []
    for rotation in LOW_ROTATIONS[fmt_name]:
        sources = [(t - rotation) % 32 for t in (t0, t1, t0 + 16, t1 + 16)]
        table.append([(s // 16) * 8 + s % 8 for s in sources])  # R's bits s and s ^ 8 are the same bit
    return np.array(table, np.int64)


LOW_SOURCE_BITS = {name: _low_source_bits(name) for name in LOW_TARGETS}
for _table in LOW_SOURCE_BITS.values():
    assert sorted(_table.ravel().tolist()) == list(range(16))  # every bit of the two bytes, once


def low_mask(fmt_name: str) -> int:
    """The mask of a pair's low-plane bits in its bf16x2 register."""
    t0, t1 = LOW_TARGETS[fmt_name]
    return (1 << t0) | (1 << t1) | (1 << (t0 + 16)) | (1 << (t1 + 16))


def _split_codes(codes, fmt_name: str):
    """FP6 codes (bits m0.. up to the sign at bit 5) -> (4-bit codes laid out as e2m1's, 2-bit low codes)."""
    codes = codes.astype(jnp.uint8)
    if fmt_name == "mxfp6_e2m3":  # s e1 e0 m2 | m1 m0
        return codes >> 2, codes & 3
    # e3m2: (s, e1, e0, m1) | (e2, m0)
    nibble = ((codes >> 1) & 7) | ((codes >> 5) << 3)
    return nibble, (codes & 1) | (((codes >> 4) & 1) << 1)


def _join_codes(nibble, low, fmt_name: str):
    """Inverse of :func:`_split_codes`."""
    if fmt_name == "mxfp6_e2m3":
        return (nibble << 2) | low
    return ((nibble & 7) << 1) | ((nibble >> 3) << 5) | (low & 1) | ((low >> 1) << 4)


def _encode_words(even, odd):
    """Codes of the four pairs (``[..., 4]`` uint8 each) -> uint32 words ``[...]``."""
    even, odd = even.astype(jnp.uint32), odd.astype(jnp.uint32)
    word = jnp.zeros(even.shape[:-1], jnp.uint32)
    for o in range(4):
        for i in range(4):
            word |= ((even[..., o] >> i) & 1) << int(SOURCE_BITS[o, i])
            word |= ((odd[..., o] >> i) & 1) << int(SOURCE_BITS[o, 4 + i])
    return word


def _decode_words_to_codes(word):
    """Inverse of :func:`_encode_words`: ``(even, odd)`` codes ``[..., 4]`` uint8."""
    word = word.astype(jnp.uint32)
    even, odd = [], []
    for o in range(4):
        even.append(sum(((word >> int(SOURCE_BITS[o, i])) & 1) << i for i in range(4)))
        odd.append(sum(((word >> int(SOURCE_BITS[o, 4 + i])) & 1) << i for i in range(4)))
    return jnp.stack(even, -1).astype(jnp.uint8), jnp.stack(odd, -1).astype(jnp.uint8)


def _codes_to_units(codes):
    """``[N, K]`` codes (N % 16 == 0, K % 128 == 0) -> ``[N/16, K/128, 1024]`` uint8 unit bytes."""
    n, k = codes.shape
    c = codes.reshape(n // 16, 2, 8, k // 128, 2, 2, 2, 2, 4, 2)  # nb h8 g kb c6 q1 q0 k3 tig j
    c = c.transpose(0, 3, 4, 2, 8, 5, 6, 1, 7, 9)  # nb kb c6 g tig q1 q0 h8 k3 j
    c = c.reshape(n // 16, k // 128, 2, 8, 4, 2, 2, 4, 2)  # ... pair o = 2*h8 + k3, element j
    words = _encode_words(c[..., 0], c[..., 1])  # [nb, kb, c6, g, tig, q1, q0]
    return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(n // 16, k // 128, 1024)


def _units_to_codes(units):
    """Inverse of :func:`_codes_to_units`."""
    nb, kb = units.shape[0], units.shape[1]
    words = jax.lax.bitcast_convert_type(units.reshape(nb, kb, 2, 8, 4, 2, 2, 4), jnp.uint32)
    even, odd = _decode_words_to_codes(words)  # [nb, kb, c6, g, tig, q1, q0, o]
    c = jnp.stack([even, odd], -1).reshape(nb, kb, 2, 8, 4, 2, 2, 2, 2, 2)  # o -> (h8, k3)
    c = c.transpose(0, 7, 3, 1, 2, 5, 6, 8, 4, 9)  # nb h8 g kb c6 q1 q0 k3 tig j
    return c.reshape(nb * 16, kb * 128)


def _low_to_units(low, fmt_name: str):
    """``[N, K]`` 2-bit low codes -> ``[N/16, K/128, 512]`` uint8 low-plane unit bytes."""
    n, k = low.shape
    c = low.astype(jnp.uint32).reshape(n // 16, 2, 8, k // 128, 2, 2, 2, 2, 4, 2)  # nb h8 g kb c6 q1 q0 k3 tig j
    c = c.transpose(0, 3, 2, 4, 8, 5, 6, 1, 7, 9)  # nb kb g c6 tig q1 q0 h8 k3 j
    c = c.reshape(n // 16, k // 128, 8, 2, 4, 2, 2, 4, 2)  # ... pair o, element j
    table = LOW_SOURCE_BITS[fmt_name]
    bits = jnp.zeros(c.shape[:-2], jnp.uint32)  # the 16 bits of the word's two bytes
    for o in range(4):
        for j in range(2):
            for i in range(2):
                bits |= ((c[..., o, j] >> i) & 1) << int(table[o, 2 * j + i])
    two = jnp.stack([bits & 0xFF, bits >> 8], -1)  # [nb, kb, g, c6, tig, q1, q0, byte]
    return two.astype(jnp.uint8).reshape(n // 16, k // 128, 512)


def _units_to_low(units, fmt_name: str):
    """Inverse of :func:`_low_to_units`."""
    nb, kb = units.shape[0], units.shape[1]
    two = units.reshape(nb, kb, 8, 2, 4, 2, 2, 2).astype(jnp.uint32)
    bits = two[..., 0] | (two[..., 1] << 8)  # [nb, kb, g, c6, tig, q1, q0]
    table = LOW_SOURCE_BITS[fmt_name]
    pairs = []
    for o in range(4):
        pairs.append(
            jnp.stack([sum(((bits >> int(table[o, 2 * j + i])) & 1) << i for i in range(2)) for j in range(2)], -1)
        )
    c = jnp.stack(pairs, -2).reshape(nb, kb, 8, 2, 4, 2, 2, 2, 2, 2)  # ... h8 k3 j
    c = c.transpose(0, 7, 2, 1, 3, 5, 6, 8, 4, 9)  # nb h8 g kb c6 q1 q0 k3 tig j
    return c.reshape(nb * 16, kb * 128).astype(jnp.uint8)


def _scales_to_units(scales):
    n, groups = scales.shape
    s = scales.reshape(n // 16, 2, 8, groups // 4, 4)  # nb h8 g kb kg
    return s.transpose(0, 3, 2, 4, 1).reshape(n // 16, groups // 4, 64)


def _units_to_scales(units):
    nb, kb = units.shape[0], units.shape[1]
    return units.reshape(nb, kb, 8, 4, 2).transpose(0, 4, 2, 1, 3).reshape(nb * 16, kb * 4)


FRAGMENT_LAYOUT = "fragment"


def padded_shape(weights: QArray) -> tuple[int, int, int]:
    """``(E, N_pad, K_pad)`` of a fragment-layout :class:`QArray`."""
    e, nb, kb = weights.values.shape[:3]
    return (e, nb * UNIT_ROWS, kb * UNIT_K)


def exact_scales(weights: QArray) -> bool:
    """Whether the kernels apply this weight's scales with two multiplies (some code exceeds
    :func:`fast_scale_max`, or the layout was made under ``jit``)."""
    return weights.qtype.layout_params[2]


def _shape(weights: QArray) -> tuple[int, int, int]:
    n, k, _ = weights.qtype.layout_params
    return (weights.values.shape[0], n, k)


def _to_checkpoint(weights: QArray) -> QArray:
    """Back to Quark's layout, bit for bit (padding dropped)."""
    name = weights.qtype.element
    fmt = mx_format(name)
    n, k, _ = weights.qtype.layout_params

    def one(arrays):
        codes = _units_to_codes(arrays[0])
        if name != "mxfp4":
            codes = _join_codes(codes, _units_to_low(arrays[2], name), name)
        return pack_codes(codes[:n, :k], fmt), _units_to_scales(arrays[1])[:n, : k // 32]

    arrays = (weights.values, weights.scales) + (() if weights.extra is None else (weights.extra,))
    packed, scales = jax.lax.map(one, arrays)
    return QArray(packed, scales, fmt)


def _take(weights: QArray, index) -> QArray:
    """Select experts (the leading axis)."""
    values = weights.values[index]
    if values.ndim != 4:
        raise IndexError("fragment-layout weights select experts (a slice or an index array) only")
    extra = None if weights.extra is None else weights.extra[index]
    return dataclasses.replace(weights, values=values, scales=weights.scales[index], extra=extra)


register_layout(FRAGMENT_LAYOUT, LayoutCodec(_to_checkpoint, _shape, _take))


def fragment_qarray(words, scales, n: int, k: int, exact: bool = True, low_bits=None, fmt: str = "mxfp4") -> QArray:
    """A fragment-layout :class:`QArray` from its units (``words``, ``scales``, FP6's ``low_bits``; shapes in
    :func:`to_fragment_layout`) and the logical ``n``, ``k``, e.g. random bytes for a benchmark."""
    if fmt not in FRAGMENT_FORMATS:
        raise ValueError(f"fragment layout format must be one of {FRAGMENT_FORMATS}, got {fmt!r}")
    if (low_bits is None) != (fmt == "mxfp4"):
        raise ValueError(f"{fmt} fragment weights {'need' if low_bits is None else 'take no'} low_bits")
    return QArray(words, scales, QType(fmt, "block32", FRAGMENT_LAYOUT, (n, k, bool(exact))), low_bits)


def to_fragment_layout(weights: QArray) -> QArray:
    """Re-lay MX weights ``[E, N, K]`` (MXFP4 or either MXFP6; ``K`` a multiple of 32) for the v2 kernels;
    exact. Returns a :class:`QArray` with layout ``"fragment"``: ``values`` the words ``[E, N_pad/16,
    K_pad/128, 1024]``, ``scales`` the E8M0 units ``[E, N_pad/16, K_pad/128, 64]``, ``extra`` FP6's low bits
    ``[E, N_pad/16, K_pad/128, 512]`` (``None`` for MXFP4); ``layout_params = (N, K, exact_scales)``.

    One expert at a time (bounded temporaries). Outside ``jit`` the scale codes are inspected once to pick
    the kernels' one-multiply scale path (:func:`fast_scale_max`).

    Raises:
      ValueError: not an MX format of :data:`FRAGMENT_FORMATS`, not 3-D, or K not a multiple of 32.
    """
    if not isinstance(weights, QArray) or weights.kind != "mx":
        raise TypeError(f"to_fragment_layout takes MX weights (a QArray), got {weights!r:.80}")
    if weights.layout == FRAGMENT_LAYOUT:
        return weights
    weights = weights.to_checkpoint_layout()
    name = weights.fmt.name
    if name not in FRAGMENT_FORMATS:
        raise ValueError(f"the fragment layout takes {FRAGMENT_FORMATS}; got {name}")
    if weights.ndim != 3:
        raise ValueError(f"the fragment layout takes expert weights [E, N, K], got shape {weights.shape}")
    e, n, k = weights.shape
    n_pad, k_pad = round_up(n, ROW_ALIGN), round_up(k, UNIT_K)

    def one(packed_and_scales):
        packed, scales = packed_and_scales
        codes = jnp.pad(unpack_codes(packed, weights.fmt), ((0, n_pad - n), (0, k_pad - k)))
        scales = _scales_to_units(jnp.pad(scales, ((0, n_pad - n), (0, (k_pad - k) // 32)), constant_values=E8M0_ONE))
        if name == "mxfp4":
            return _codes_to_units(codes), scales
        nibbles, low = _split_codes(codes, name)
        return _codes_to_units(nibbles), scales, _low_to_units(low, name)

    words, scales, *low = jax.lax.map(one, (weights.packed, weights.scales))
    exact = True
    if not isinstance(weights.scales, jax.core.Tracer):  # concrete (also when captured by a jit): one look
        exact = bool(np.asarray(weights.scales).max(initial=0) > fast_scale_max(name))
    qtype = weights.qtype.with_layout(FRAGMENT_LAYOUT, (n, k, exact))
    return QArray(words, scales, qtype, low[0] if low else None)


def decode_fragment_words(weights: QArray) -> np.ndarray:
    """What the kernels compute from the fragment layout, modelled on the host in numpy (float64, so bf16
    subnormals stay exact, as they are on the GPU; XLA:CPU would flush them): each word decoded by the
    rotate-and-mask formulas to bf16 bit patterns (value x 2^-(127 - bias)), FP6's low-plane bits rotated
    and OR'ed in, times ``2^(127 - bias) * 2^(s - 127)``. Returns ``[E, N, K]`` float64; E8M0 code 255
    gives NaN. For tests, not a fast path."""
    e, nb, kb = weights.values.shape[:3]
    n, k, _ = weights.qtype.layout_params
    words = np.ascontiguousarray(np.asarray(weights.values)).view(np.uint32).reshape(e, nb, kb, 2, 8, 4, 2, 2)
    words = words.astype(np.uint64)

    def rotl(w, r):
        return ((w << r) | (w >> (32 - r))) & 0xFFFFFFFF

    pairs = np.stack(
        [
            rotl(words, 6) & 0x81C081C0,
            rotl(words, 12) & 0x81C081C0,
            rotl(words, 2) & 0x81C081C0,
            (rotl(words, 8) & 0x00400040) | (words & 0x81808180),
        ],
        -1,
    )  # [e, nb, kb, c6, g, tig, q1, q0, o]
    name = weights.qtype.element
    if name != "mxfp4":
        low = np.asarray(weights.extra).reshape(e, nb, kb, 8, 2, 4, 2, 2, 2).astype(np.uint64)
        b0, b1 = low[..., 0], low[..., 1]  # [e, nb, kb, g, c6, tig, q1, q0]
        register = (b0 | (b0 << 8) | (b1 << 16) | (b1 << 24)).transpose(0, 1, 2, 4, 3, 5, 6, 7)
        mask = low_mask(name)
        pairs |= np.stack([rotl(register, r) & mask for r in LOW_ROTATIONS[name]], -1)
    halves = (np.stack([pairs & 0xFFFF, pairs >> 16], -1) << 16).astype(np.uint32)
    bias = weights.fmt.element.bias
    values = halves.view(np.float32).astype(np.float64) * 2.0 ** (127 - bias)
    values = values.reshape(e, nb, kb, 2, 8, 4, 2, 2, 2, 2, 2).transpose(0, 1, 8, 4, 2, 3, 6, 7, 9, 5, 10)
    values = values.reshape(e, nb * 16, kb * 128)
    scales = np.asarray(weights.scales).reshape(e, nb, kb, 8, 4, 2).transpose(0, 1, 5, 3, 2, 4)
    exponent = scales.reshape(e, nb * 16, kb * 4).astype(np.int64) - 127
    factor = np.where(exponent == 128, np.nan, np.ldexp(1.0, exponent))
    return (values * np.repeat(factor, 32, axis=2))[:, :n, :k]
