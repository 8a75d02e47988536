"""MXFP4 weights in the *fragment layout* the v2 jax-triton kernels read, and the exact conversion both ways.

Hopper's ``wgmma`` takes its A operand from registers in a fixed fragment: in a 64-row slice each warp owns
16 rows; lane ``l`` (``g = l // 4``, ``tig = l % 4``) holds rows ``g`` and ``g + 8`` and, per 16-wide K step,
the element pairs ``2*tig + {0, 1}`` and ``2*tig + 8 + {0, 1}``. The v2 kernels feed the decoded weights
there straight from the load (:mod:`quarkmoe_jax.kernels.triton_mx_gemm`), so the bytes are stored in that
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
* **Padding.** K is padded to a multiple of 128 with code 0 (value +0) and scale code 127, N to a multiple
  of 64 with zero rows: the padded products are exact zeros. ``shape`` keeps the logical ``(E, N, K)``.

Same bytes as the checkpoint plus that padding (gpt-oss's K = 2880 -> 2944: 2.2%). :func:`to_fragment_layout`
and :meth:`MXFragmentWeights.to_mx` are exact inverses (tested), and :func:`decode_fragment_words` is the
kernel's decode written in jnp (the CPU test that the layout and the decode give the checkpoint's values).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.formats.mx import MXTensor, mx_format, pack_codes, unpack_codes

__all__ = [
    "MXFragmentWeights",
    "to_fragment_layout",
    "decode_fragment_words",
    "SOURCE_BITS",
    "UNIT_ROWS",
    "UNIT_K",
    "ROW_ALIGN",
    "FAST_SCALE_MAX",
]

UNIT_ROWS, UNIT_K = 16, 128
ROW_ALIGN = 64  # one warpgroup's wgmma M
FAST_SCALE_MAX = 128
"""Largest E8M0 code for which one bf16 multiply by ``2^(s-1)`` applies the scale exactly (the kernels'
fast path); larger codes take two multiplies (``MXFragmentWeights.exact_scales``)."""

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


def _scales_to_units(scales):
    n, groups = scales.shape
    s = scales.reshape(n // 16, 2, 8, groups // 4, 4)  # nb h8 g kb kg
    return s.transpose(0, 3, 2, 4, 1).reshape(n // 16, groups // 4, 64)


def _units_to_scales(units):
    nb, kb = units.shape[0], units.shape[1]
    return units.reshape(nb, kb, 8, 4, 2).transpose(0, 4, 2, 1, 3).reshape(nb * 16, kb * 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXFragmentWeights:
    """MXFP4 expert weights in the fragment layout (module docstring); the same values as an :class:`MXTensor`.

    Attributes:
      words: uint8 ``[E, N_pad/16, K_pad/128, 1024]`` code units.
      scales: uint8 ``[E, N_pad/16, K_pad/128, 64]`` E8M0 units.
      n, k: static logical ``N`` and ``K`` (before padding).
      exact_scales: static; some scale code exceeds :data:`FAST_SCALE_MAX`, so the kernels apply scales with
        two multiplies (``True`` as well when the layout was made under ``jit``, where the codes are unknown).
    """

    words: jax.Array
    scales: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    exact_scales: bool = dataclasses.field(default=True, metadata=dict(static=True))

    fmt = mx_format("mxfp4")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Logical ``(E, N, K)``."""
        return (self.words.shape[0], self.n, self.k)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        e, nb, kb = self.words.shape[:3]
        return (e, nb * UNIT_ROWS, kb * UNIT_K)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def nbytes(self) -> int:
        return int(self.words.size + self.scales.size)

    def to_mx(self) -> MXTensor:
        """Back to Quark's layout, bit for bit (padding dropped)."""

        def one(words, scales):
            codes = _units_to_codes(words)[: self.n, : self.k]
            return pack_codes(codes, self.fmt), _units_to_scales(scales)[: self.n, : self.k // 32]

        packed, scales = jax.lax.map(lambda ws: one(*ws), (self.words, self.scales))
        return MXTensor(packed, scales, self.fmt)

    def dequantize(self, dtype=jnp.bfloat16):
        return self.to_mx().dequantize(dtype)

    def __getitem__(self, index) -> MXFragmentWeights:
        """Select experts (the leading axis)."""
        words, scales = self.words[index], self.scales[index]
        if words.ndim != 4:
            raise IndexError("MXFragmentWeights indexing selects experts (a slice or an index array) only")
        return MXFragmentWeights(words, scales, self.n, self.k, self.exact_scales)

    def __repr__(self) -> str:
        return f"MXFragmentWeights(mxfp4, shape={self.shape}, padded={self.padded_shape})"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def to_fragment_layout(weights: MXTensor) -> MXFragmentWeights:
    """Re-lay MXFP4 weights ``[E, N, K]`` (``K`` a multiple of 32) for the v2 kernels; exact.

    One expert at a time (bounded temporaries). Outside ``jit`` the scale codes are inspected once to pick
    the kernels' one-multiply scale path (:data:`FAST_SCALE_MAX`).

    Raises:
      ValueError: not MXFP4 (the fragment layout is FP4's), not 3-D, or K not a multiple of 32.
    """
    if isinstance(weights, MXFragmentWeights):
        return weights
    if not isinstance(weights, MXTensor):
        raise TypeError(f"to_fragment_layout takes an MXTensor, got {type(weights).__name__}")
    if weights.fmt.name != "mxfp4":
        raise ValueError(f"the fragment layout is MXFP4's; got {weights.fmt.name}")
    if weights.ndim != 3:
        raise ValueError(f"the fragment layout takes expert weights [E, N, K], got shape {weights.shape}")
    e, n, k = weights.shape
    n_pad, k_pad = _round_up(n, ROW_ALIGN), _round_up(k, UNIT_K)

    def one(packed_and_scales):
        packed, scales = packed_and_scales
        codes = jnp.pad(unpack_codes(packed, weights.fmt), ((0, n_pad - n), (0, k_pad - k)))
        scales = jnp.pad(scales, ((0, n_pad - n), (0, (k_pad - k) // 32)), constant_values=127)
        return _codes_to_units(codes), _scales_to_units(scales)

    words, scales = jax.lax.map(one, (weights.packed, weights.scales))
    exact = True
    if not isinstance(weights.scales, jax.core.Tracer):  # concrete (also when captured by a jit): one look
        exact = bool(np.asarray(weights.scales).max(initial=0) > FAST_SCALE_MAX)
    return MXFragmentWeights(words, scales, n, k, exact)


def decode_fragment_words(weights: MXFragmentWeights) -> np.ndarray:
    """What the kernels compute from the fragment layout, modelled on the host in numpy (float64, so bf16
    subnormals stay exact, as they are on the GPU; XLA:CPU would flush them): each word decoded by the
    rotate-and-mask formulas to bf16 bit patterns (value x 2^-126), times ``2^126 * 2^(s - 127)``.
    Returns ``[E, N, K]`` float64; E8M0 code 255 gives NaN. For tests, not a fast path."""
    e, nb, kb = weights.words.shape[:3]
    words = np.ascontiguousarray(np.asarray(weights.words)).view(np.uint32).reshape(e, nb, kb, 2, 8, 4, 2, 2)
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
    halves = (np.stack([pairs & 0xFFFF, pairs >> 16], -1) << 16).astype(np.uint32)
    values = halves.view(np.float32).astype(np.float64) * 2.0**126
    values = values.reshape(e, nb, kb, 2, 8, 4, 2, 2, 2, 2, 2).transpose(0, 1, 8, 4, 2, 3, 6, 7, 9, 5, 10)
    values = values.reshape(e, nb * 16, kb * 128)
    scales = np.asarray(weights.scales).reshape(e, nb, kb, 8, 4, 2).transpose(0, 1, 5, 3, 2, 4)
    exponent = scales.reshape(e, nb * 16, kb * 4).astype(np.int64) - 127
    factor = np.where(exponent == 128, np.nan, np.ldexp(1.0, exponent))
    return (values * np.repeat(factor, 32, axis=2))[:, : weights.n, : weights.k]
