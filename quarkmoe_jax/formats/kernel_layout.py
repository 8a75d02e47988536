"""The byte layout the Pallas kernels read MX weights in, and the exact conversion to and from Quark's.

Quark packs MX codes along the contraction axis K in element order: FP4 puts elements ``2j`` / ``2j+1`` in
the low / high nibble of byte ``j``; FP6 packs four codes into three bytes. A GPU kernel that decodes a
``[N, chunk]`` weight tile wants each nibble plane to be a *contiguous* run of K, so that every decoded
plane multiplies one contiguous slice of activations and no interleave is needed. the chunk layout
stores exactly the same bits re-laid that way, chunk by chunk along K, as a :class:`QArray` with layout
``"chunk"`` (``layout_params = (chunk,)``, or ``(chunk, parts)`` for a tensor-parallel w2, below):

* **FP4** (``values``: nibbles ``[..., N, K/2]``): in a chunk of ``c`` elements, byte ``j`` holds element ``j`` in its
  low nibble and element ``j + c/2`` in its high nibble.
* **FP6** (``values`` as FP4's + ``extra``: high bits ``[..., N, K/4]``): the low 4 bits of every code are laid
  out as FP4's nibbles; the top 2 bits go to a second plane where byte ``j`` of a chunk holds the top bits
  of elements ``j``, ``j + c/4``, ``j + c/2``, ``j + 3c/4`` at bit offsets 0, 2, 4, 6. Same 0.75 byte per
  element as Quark's packing.
* **Scales** are unchanged: uint8 E8M0 ``[..., N, K/32]``.

Chunks are ``chunk`` elements long (a power of two, default 128); the last ``K mod chunk`` elements form
smaller power-of-two chunks (64, then 32), so any K that is a multiple of 32 is covered. The kernel's K
loop walks the same chunks. :func:`to_kernel_layout` / :meth:`QArray.to_checkpoint_layout` convert both ways and
round-trip bit for bit (tested), so a kernel-layout tensor holds exactly the checkpoint's values.

A w2 split along K over ``tp`` tensor shards is laid out shard by shard: K is ``parts`` equal pieces, each
chunked on its own (``layout_params = (chunk, parts)``), so the global array converts back correctly even
where a shard's K is not a multiple of ``chunk``. A kernel reads one piece at a time: inside ``shard_map``,
:func:`one_part` gives a shard's piece its own ``(chunk,)`` type; :func:`to_kernel_layout` re-lays a
multi-part array whole.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE, mx_format, pack_codes, unpack_codes
from quarkmoe_jax.formats.qarray import LayoutCodec, QArray, QType, register_layout

__all__ = [
    "DEFAULT_CHUNK",
    "CHUNK_LAYOUT",
    "to_kernel_layout",
    "chunk_sizes",
    "chunk_of",
    "k_parts",
    "split_into_parts",
    "one_part",
    "chunk_layout_qarray",
]

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


CHUNK_LAYOUT = "chunk"


def chunk_of(weights: QArray) -> int:
    """The chunk length of a chunk-layout :class:`QArray`."""
    return weights.qtype.layout_params[0]


def k_parts(weights: QArray) -> int:
    """How many equal pieces of K a chunk-layout :class:`QArray` is chunked in (1 but for a tensor-parallel
    w2; module docstring)."""
    params = weights.qtype.layout_params
    return params[1] if len(params) > 1 else 1


def split_into_parts(weights: QArray, parts: int) -> QArray:
    """The type of a global chunk-layout array made of ``parts`` single-part pieces along K (each shard's
    :func:`to_kernel_layout` of its own K)."""
    if weights.layout != CHUNK_LAYOUT or k_parts(weights) != 1:
        raise ValueError(f"split_into_parts takes single-part chunk-layout weights, got {weights.qtype}")
    if parts == 1:
        return weights
    return dataclasses.replace(weights, qtype=weights.qtype.with_layout(CHUNK_LAYOUT, (chunk_of(weights), parts)))


def one_part(weights):
    """One shard's piece of a multi-part chunk-layout array, typed as the single-part array it is (inside
    ``shard_map``, where each shard holds one piece); anything else is returned as it is."""
    if isinstance(weights, QArray) and weights.layout == CHUNK_LAYOUT and k_parts(weights) != 1:
        return dataclasses.replace(weights, qtype=weights.qtype.with_layout(CHUNK_LAYOUT, (chunk_of(weights),)))
    return weights


def _shape(weights: QArray) -> tuple[int, ...]:
    return tuple(weights.values.shape[:-1]) + (2 * weights.values.shape[-1],)


def _codes(weights: QArray):
    """uint8 element codes ``[..., N, K]`` in element order."""
    parts = k_parts(weights)
    if parts > 1:
        piece = one_part(weights)
        nibbles = jnp.split(weights.values, parts, axis=-1)
        high = [None] * parts if weights.extra is None else jnp.split(weights.extra, parts, axis=-1)
        pieces = [dataclasses.replace(piece, values=v, extra=h) for v, h in zip(nibbles, high, strict=True)]
        return jnp.concatenate([_codes(p) for p in pieces], axis=-1)
    sizes = chunk_sizes(_shape(weights)[-1], chunk_of(weights))
    nibble_chunks = _split_chunks(weights.values, [c // 2 for c in sizes])
    high_chunks = _split_chunks(weights.extra, [c // 4 for c in sizes]) if weights.extra is not None else None
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


def _to_checkpoint(weights: QArray) -> QArray:
    """Back to Quark's layout, bit for bit."""
    return QArray(pack_codes(_codes(weights), weights.fmt), weights.scales, weights.fmt)


def _take(weights: QArray, index) -> QArray:
    extra = None if weights.extra is None else weights.extra[index]
    return dataclasses.replace(weights, values=weights.values[index], scales=weights.scales[index], extra=extra)


register_layout(CHUNK_LAYOUT, LayoutCodec(_to_checkpoint, _shape, _take))


def chunk_layout_qarray(nibbles, high_bits, scales, fmt, chunk: int = DEFAULT_CHUNK) -> QArray:
    """A chunk-layout :class:`QArray` from its planes (nibbles ``[..., N, K/2]``, FP6 high bits ``[..., N,
    K/4]`` or ``None``, E8M0 ``[..., N, K/32]``), e.g. random bytes for a benchmark."""
    fmt = mx_format(fmt)
    if (high_bits is None) != (fmt.bits == 4):
        raise ValueError(f"{fmt.name} chunk-layout weights {'need' if high_bits is None else 'take no'} high bits")
    return QArray(nibbles, scales, QType(fmt.name, "block32", CHUNK_LAYOUT, (chunk,)), high_bits)


def to_kernel_layout(weights: QArray, chunk: int = DEFAULT_CHUNK) -> QArray:
    """Re-lay MX weights ``[..., N, K]`` in the chunk layout (exact; see the module docstring).

    Returns a :class:`QArray` with layout ``"chunk"``: ``values`` the nibble planes ``[..., N, K/2]``,
    ``extra`` FP6's high-bit plane ``[..., N, K/4]`` (``None`` for FP4), ``scales`` as in the checkpoint.
    """
    if not isinstance(weights, QArray) or weights.kind != "mx":
        raise TypeError(f"to_kernel_layout takes MX weights (a QArray), got {weights!r:.80}")
    if weights.layout == CHUNK_LAYOUT and chunk_of(weights) == chunk and k_parts(weights) == 1:
        return weights
    weights = weights.to_checkpoint_layout()
    if weights.fmt.bits not in (4, 6):
        raise ValueError(f"the chunk layout takes MXFP4 / MXFP6, got {weights.fmt.name}")
    sizes = chunk_sizes(weights.shape[-1], chunk)
    if weights.fmt.bits == 6 and min(sizes) < 64:
        raise ValueError(
            f"the FP6 kernel layout needs K to be a multiple of 64 (its smallest chunk feeds 16-wide dots); "
            f"got K = {weights.shape[-1]}"
        )
    codes = unpack_codes(weights.values, weights.fmt).astype(jnp.uint8)
    chunks = _split_chunks(codes, sizes)
    nibbles = jnp.concatenate([_nibble_plane(ch & 0xF, c) for ch, c in zip(chunks, sizes, strict=True)], axis=-1)
    high = None
    if weights.fmt.bits == 6:
        high = jnp.concatenate([_high_plane(ch >> 4, c) for ch, c in zip(chunks, sizes, strict=True)], axis=-1)
    return QArray(nibbles, weights.scales, weights.qtype.with_layout(CHUNK_LAYOUT, (chunk,)), high)
