"""The byte layout the Pallas kernels read MX weights in, and the exact conversion to and from Quark's.

Quark packs MX codes along the contraction axis K in element order: FP4 puts elements ``2j`` / ``2j+1`` in
the low / high nibble of byte ``j``; FP6 packs four codes into three bytes. A GPU kernel that decodes a
``[N, chunk]`` weight tile wants each nibble plane to be a *contiguous* run of K, so that every decoded
plane multiplies one contiguous slice of activations and no interleave is needed. :class:`MXKernelWeights`
stores exactly the same bits re-laid that way, chunk by chunk along K:

* **FP4** (``nibbles [..., N, K/2]``): in a chunk of ``c`` elements, byte ``j`` holds element ``j`` in its
  low nibble and element ``j + c/2`` in its high nibble.
* **FP6** (``nibbles [..., N, K/2]`` + ``high_bits [..., N, K/4]``): the low 4 bits of every code are laid
  out as FP4's nibbles; the top 2 bits go to a second plane where byte ``j`` of a chunk holds the top bits
  of elements ``j``, ``j + c/4``, ``j + c/2``, ``j + 3c/4`` at bit offsets 0, 2, 4, 6. Same 0.75 byte per
  element as Quark's packing.
* **Scales** are unchanged: uint8 E8M0 ``[..., N, K/32]``.

Chunks are ``chunk`` elements long (a power of two, default 128); the last ``K mod chunk`` elements form
smaller power-of-two chunks (64, then 32), so any K that is a multiple of 32 is covered. The kernel's K
loop walks the same chunks. :func:`to_kernel_layout` / :meth:`MXKernelWeights.to_mx` convert both ways and
round-trip bit for bit (tested), so a kernel-layout tensor holds exactly the checkpoint's values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from quarkmoe_jax.formats.fragment_layout import MXFragmentWeights
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE, MXFormat, MXTensor, pack_codes, unpack_codes

__all__ = ["DEFAULT_CHUNK", "MXKernelWeights", "to_kernel_layout", "chunk_sizes", "KERNEL_LAYOUTS", "as_mx_tensor"]

DEFAULT_CHUNK = 128


def chunk_sizes(length: int, chunk: int = DEFAULT_CHUNK, granule: int = MX_BLOCK_SIZE) -> tuple[int, ...]:
    """The chunks K is split into: ``chunk`` repeated, then the power-of-two pieces (>= ``granule``) of the
    remainder."""
    if length % granule:
        raise ValueError(f"the kernel layout needs K to be a multiple of {granule}, got {length}")
    if chunk < 2 * granule or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= {2 * granule}, got {chunk}")
    sizes = [chunk] * (length // chunk)
    rest = length % chunk
    piece = chunk // 2
    while rest:
        if rest >= piece:
            sizes.append(piece)
            rest -= piece
        piece //= 2
    return tuple(sizes)


def _split_chunks(codes, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [codes[..., s : s + c] for s, c in zip(starts, sizes, strict=True)]


def _nibble_plane(low4, c: int):
    """``low4 [..., c]`` (values < 16) -> ``[..., c/2]``: byte j = element j | element j + c/2 << 4."""
    return (low4[..., : c // 2] | (low4[..., c // 2 :] << 4)).astype(jnp.uint8)


def _high_plane(top2, c: int):
    q = c // 4
    return (
        top2[..., :q] | (top2[..., q : 2 * q] << 2) | (top2[..., 2 * q : 3 * q] << 4) | (top2[..., 3 * q :] << 6)
    ).astype(jnp.uint8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXKernelWeights:
    """MX weights in the kernel layout (module docstring); the same bits as an :class:`MXTensor`.

    Attributes:
      nibbles: uint8 ``[..., N, K/2]``, the low 4 bits of every code, chunk-planar.
      high_bits: uint8 ``[..., N, K/4]`` for FP6 (bits 4-5 of every code), ``None`` for FP4.
      scales: uint8 E8M0 ``[..., N, K/32]``, as in the checkpoint.
      fmt: static :class:`MXFormat`.
      chunk: static chunk length along K.
    """

    nibbles: jax.Array
    high_bits: jax.Array | None
    scales: jax.Array
    fmt: MXFormat = dataclasses.field(metadata=dict(static=True))
    chunk: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., N, K]``."""
        return tuple(self.nibbles.shape[:-1]) + (2 * self.nibbles.shape[-1],)

    @property
    def ndim(self) -> int:
        return self.nibbles.ndim

    @property
    def nbytes(self) -> int:
        high = 0 if self.high_bits is None else self.high_bits.size
        return int(self.nibbles.size + high + self.scales.size)

    def codes(self):
        """uint8 element codes ``[..., N, K]`` in element order."""
        sizes = chunk_sizes(self.shape[-1], self.chunk)
        nibble_chunks = _split_chunks(self.nibbles, [c // 2 for c in sizes])
        high_chunks = _split_chunks(self.high_bits, [c // 4 for c in sizes]) if self.high_bits is not None else None
        out = []
        for i in range(len(sizes)):
            plane = nibble_chunks[i]
            low4 = jnp.concatenate([plane & 0xF, plane >> 4], axis=-1)
            if high_chunks is not None:
                h = high_chunks[i]
                top2 = jnp.concatenate([(h >> s) & 0x3 for s in (0, 2, 4, 6)], axis=-1)
                low4 = low4 | (top2 << 4)
            out.append(low4)
        return jnp.concatenate(out, axis=-1).astype(jnp.uint8)

    def to_mx(self) -> MXTensor:
        """Back to Quark's layout, bit for bit."""
        return MXTensor(pack_codes(self.codes(), self.fmt), self.scales, self.fmt)

    def dequantize(self, dtype=jnp.bfloat16):
        return self.to_mx().dequantize(dtype)

    def __getitem__(self, index) -> MXKernelWeights:
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index or len(index) >= self.ndim:
            raise IndexError("MXKernelWeights indexing selects leading axes only")
        high = None if self.high_bits is None else self.high_bits[index]
        return MXKernelWeights(self.nibbles[index], high, self.scales[index], self.fmt, self.chunk)

    def __repr__(self) -> str:
        return f"MXKernelWeights({self.fmt.name}, shape={self.shape}, chunk={self.chunk})"


def to_kernel_layout(weights: MXTensor, chunk: int = DEFAULT_CHUNK) -> MXKernelWeights:
    """Re-lay an :class:`MXTensor` ``[..., N, K]`` for the kernels (exact; see the module docstring)."""
    if isinstance(weights, MXKernelWeights):
        if weights.chunk == chunk:
            return weights
        weights = weights.to_mx()
    if isinstance(weights, MXFragmentWeights):
        weights = weights.to_mx()
    if not isinstance(weights, MXTensor):
        raise TypeError(f"to_kernel_layout takes an MXTensor, got {type(weights).__name__}")
    if weights.fmt.bits not in (4, 6):
        raise ValueError(f"unsupported MX element width {weights.fmt.bits}")
    sizes = chunk_sizes(weights.shape[-1], chunk)
    if weights.fmt.bits == 6 and min(sizes) < 64:
        raise ValueError(
            f"the FP6 kernel layout needs K to be a multiple of 64 (its smallest chunk feeds 16-wide dots); "
            f"got K = {weights.shape[-1]}"
        )
    codes = unpack_codes(weights.packed, weights.fmt).astype(jnp.uint8)
    chunks = _split_chunks(codes, sizes)
    nibbles = jnp.concatenate([_nibble_plane(ch & 0xF, c) for ch, c in zip(chunks, sizes, strict=True)], axis=-1)
    high = None
    if weights.fmt.bits == 6:
        high = jnp.concatenate([_high_plane(ch >> 4, c) for ch, c in zip(chunks, sizes, strict=True)], axis=-1)
    return MXKernelWeights(nibbles, high, weights.scales, weights.fmt, chunk)


KERNEL_LAYOUTS = (MXKernelWeights, MXFragmentWeights)
"""The kernels' MX weight layouts (exact re-lays of an :class:`MXTensor`)."""


def as_mx_tensor(weight):
    """MX weights in any kernel layout back in Quark's (:class:`MXTensor`); anything else unchanged."""
    return weight.to_mx() if isinstance(weight, KERNEL_LAYOUTS) else weight
