"""Paged attention in Pallas (Triton dialect): the step's queries attend to their sequences' keys read through
the block tables, over only the filled (and, with a sliding window, the visible) part of each sequence.

One kernel serves the engine's whole step: decode tokens and prefill chunks of many sequences together (a
ragged batch), grouped-query attention with gpt-oss's sinks and sliding windows, and DeepSeek's absorbed latent
attention (keys in two parts, the latent and the rotary key; the latent is also the value).

Layout. The cache of one layer holds, per name, ``[num_blocks, block_size, kv_heads, dim]`` (latent attention:
one "kv head"). The ``N`` query tokens are regrouped in XLA into **query tiles**: up to ``block_q`` consecutive
tokens of one sequence times ``heads_per_tile`` query heads of one kv head, ``rows = block_q * heads_per_tile``
rows of one MMA. Program ``(tile, kv_head, head_chunk, split)`` walks the cache blocks its rows may see
(``pages_per_step`` blocks per loop iteration, their loads issued before their maths) with an online softmax in
float32. ``splits > 1`` divides each tile's blocks over more programs (flash decoding: a batch-1 decode step
has too few tiles to fill the GPU); their partial sums are combined in XLA, where the sinks join.

Numerics: scores ``q . k`` accumulate in float32 and are scaled in float32; probabilities are cast to the
value's dtype for the second product, as :func:`quarkmoe_jax.models.layers.attention` (the oracle) does; a
row that sees no key gives 0. On CPU the kernel runs in the Pallas interpreter (tests, not speed).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["AttentionTiles", "unsupported_reason", "default_tiles", "paged_attention"]

_EXACT = lax.Precision.HIGHEST  # float32 operands as IEEE float32 (not TF32), as the oracle; bf16 unaffected

MIN_DOT = 16
"""Every dimension of a Triton dot (rows, keys per block, head dims) is a power of two of at least this."""


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    """Static tiling: ``block_q`` tokens and ``heads_per_tile`` heads per tile (rows: their product, padded to
    16), ``pages_per_step`` cache blocks per loop iteration, ``splits`` programs per tile over its blocks."""

    block_q: int = 8
    heads_per_tile: int = 8
    pages_per_step: int = 2
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def rows(self) -> int:
        return max(self.block_q * self.heads_per_tile, MIN_DOT)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def unsupported_reason(block_size: int, key_dims: tuple[int, ...], value_dim: int) -> str | None:
    """Why the kernel cannot run these shapes (None: it can): the cache's block size and every key part's and
    the value's head dimension must be powers of two of at least 16."""
    for what, n in [("block_size", block_size), ("value head dim", value_dim)] + [
        (f"key part {i}'s head dim", d) for i, d in enumerate(key_dims)
    ]:
        if not (_power_of_two(n) and n >= MIN_DOT):
            return f"the paged attention kernel needs {what} a power of two >= {MIN_DOT}, got {n}"
    return None


def default_tiles(
    num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, block_size: int, max_blocks: int, cores: int = 132
) -> AttentionTiles:
    """Tiles for a step of ``num_tokens`` tokens (a bucket) over ``num_seqs`` sequences: 64 rows per tile
    (fewer heads per tile than a group has when the group is larger), two cache blocks of 16 per iteration (one
    of 32 or more), and as many splits as it takes for the decode grid to give each of ``cores`` SMs two
    programs (at most one per iteration of the longest sequence)."""
    heads = min(_next_power_of_two(group), 64)
    block_q = max(64 // heads, 1)
    pages = max(32 // block_size, 1)
    tiles = math.ceil(num_tokens / block_q) if num_tokens > num_seqs else num_seqs
    programs = tiles * num_kv_heads * math.ceil(_next_power_of_two(group) / heads)
    iterations = math.ceil(max_blocks / pages)
    splits = max(1, min(math.ceil(2 * cores / programs), iterations, 16))
    return AttentionTiles(block_q=block_q, heads_per_tile=heads, pages_per_step=pages, splits=splits)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _kernel(
    *refs,
    num_key_parts: int,
    value_is_first_key: bool,
    has_sinks: bool,
    block_size: int,
    scale: float,
    window: int | None,
    tiles: AttentionTiles,
):
    refs = list(refs)
    tile_seq_ref, tile_lo_ref, tile_hi_ref, tables_ref, row_pos_ref = refs[:5]
    refs = refs[5:]
    q_refs, refs = refs[:num_key_parts], refs[num_key_parts:]
    k_refs, refs = refs[:num_key_parts], refs[num_key_parts:]
    v_ref = k_refs[0] if value_is_first_key else refs.pop(0)
    sink_ref = refs.pop(0) if has_sinks else None
    out_refs = refs

    tile, kv_head, chunk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    split = pl.program_id(3) if tiles.splits > 1 else 0
    rows, pages = tiles.rows, tiles.pages_per_step
    seq, lo, hi = tile_seq_ref[tile], tile_lo_ref[tile], tile_hi_ref[tile]  # keys [lo, hi) may be seen
    row_pos = row_pos_ref[tile, :]  # [rows]; -1: a padding row (sees nothing)
    qs = [q_ref[tile, kv_head, chunk, :, :] for q_ref in q_refs]  # [rows, Dk_i]

    step_keys = pages * block_size
    first, last = lo // step_keys, (hi + step_keys - 1) // step_keys  # loop iterations [first, last)
    per_split = (last - first + tiles.splits - 1) // tiles.splits
    begin = jnp.minimum(first + split * per_split, last)
    end = jnp.minimum(begin + per_split, last)

    value_dim = v_ref.shape[-1]

    def body(step, carry):
        acc, m, total = carry
        loaded = []
        for p in range(pages):  # every load of the iteration before its maths
            page = tables_ref[seq, step * pages + p]
            keys = [k_ref[page, :, kv_head, :] for k_ref in k_refs]  # [BS, Dk_i]
            value = keys[0] if value_is_first_key else v_ref[page, :, kv_head, :]
            loaded.append((keys, value))
        for p, (keys, value) in enumerate(loaded):
            scores = None
            for q, k in zip(qs, keys, strict=True):
                part = lax.dot_general(
                    q, k, (((1,), (1,)), ((), ())), precision=_EXACT, preferred_element_type=jnp.float32
                )
                scores = part if scores is None else scores + part
            scores = scores * jnp.float32(scale)
            key_pos = (step * pages + p) * block_size + lax.broadcasted_iota(jnp.int32, (rows, block_size), 1)
            seen = key_pos <= row_pos[:, None]
            if window is not None:
                seen &= key_pos > row_pos[:, None] - window
            scores = jnp.where(seen, scores, -jnp.inf)
            m_new = jnp.maximum(m, scores.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            probs = jnp.exp(scores - m_safe[:, None])
            alpha = jnp.exp(m - m_safe)
            total = total * alpha + probs.sum(axis=1)
            acc = acc * alpha[:, None] + lax.dot_general(
                probs.astype(value.dtype),
                value,
                (((1,), (0,)), ((), ())),
                precision=_EXACT,
                preferred_element_type=jnp.float32,
            )
            m = m_new
        return acc, m, total

    init = (
        jnp.zeros((rows, value_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, total = lax.fori_loop(begin, end, body, init)
    if tiles.splits > 1:
        acc_ref, m_ref, total_ref = out_refs
        acc_ref[tile, kv_head, chunk, split, :, :] = acc
        m_ref[tile, kv_head, chunk, split, :] = m
        total_ref[tile, kv_head, chunk, split, :] = total
        return
    (out_ref,) = out_refs
    if has_sinks:
        sink = sink_ref[kv_head, chunk, :]
        m_final = jnp.maximum(m, sink)
        m_safe = jnp.where(m_final == -jnp.inf, 0.0, m_final)
        alpha = jnp.exp(m - m_safe)
        acc, total = acc * alpha[:, None], total * alpha + jnp.exp(sink - m_safe)
    out_ref[tile, kv_head, chunk, :, :] = (acc / jnp.where(total == 0, 1.0, total)[:, None]).astype(out_ref.dtype)


class _QueryTiles:
    """The regrouping of a step's tokens into query tiles (all XLA, inside the caller's jit)."""

    def __init__(self, token_seq, positions, valid, num_seqs: int, block_q: int):
        n = token_seq.shape[0]
        index = jnp.arange(n, dtype=jnp.int32)
        previous = jnp.concatenate([jnp.full((1,), -1, jnp.int32), token_seq[:-1]])
        starts_span = valid & ((index == 0) | (token_seq != previous))
        span_start = lax.cummax(jnp.where(starts_span, index, 0))
        starts_tile = valid & ((index - span_start) % block_q == 0)
        self.count = n // block_q + num_seqs  # tiles: each sequence adds at most one partial tile
        tile_of = jnp.where(valid, jnp.cumsum(starts_tile) - 1, self.count)
        first = jnp.zeros(self.count, jnp.int32).at[jnp.where(starts_tile, tile_of, self.count)].set(index, mode="drop")
        size = jnp.zeros(self.count, jnp.int32).at[tile_of].add(1, mode="drop")
        offsets = jnp.arange(block_q, dtype=jnp.int32)
        self.tokens = jnp.minimum(first[:, None] + offsets, n - 1)  # [tiles, block_q]
        self.token_valid = offsets < size[:, None]
        self.seq = token_seq[first]
        self.first_pos = positions[first]
        self.last_pos = positions[first + jnp.maximum(size - 1, 0)]
        self.size = size


def paged_attention(
    q,
    key_caches,
    value_cache,
    block_tables,
    token_seq,
    positions,
    valid,
    *,
    scale: float,
    window: int | None = None,
    sinks=None,
    tiles: AttentionTiles | None = None,
    interpret: bool = False,
):
    """Attention of a step's ``N`` query tokens to their sequences' cached keys (already written this step).

    Args:
      q: ``[N, Hq, Dk]`` (``Dk`` the sum of the key parts' head dims, parts in order).
      key_caches: one or two ``[NB, BS, Hkv, Dk_i]`` (latent attention: the latent ``[NB, BS, 1, r]`` and the
        rotary key ``[NB, BS, 1, dr]``).
      value_cache: ``[NB, BS, Hkv, Dv]``, or None: the first key part is the value.
      block_tables: int32 ``[S, max_blocks]``; token_seq / positions: int32 ``[N]`` (tokens of one sequence
        contiguous, positions increasing); valid: bool ``[N]``.
      scale: the score scale; window: gpt-oss's sliding window (key ``j`` seen from ``i`` when
        ``i - window < j <= i``); sinks: float32 ``[Hq]`` sink logits (one more softmax column, no value).
      tiles: the static tiling (default: :func:`default_tiles`); interpret: the Pallas interpreter (CPU).

    Returns:
      ``[N, Hq, Dv]`` in ``q``'s dtype (padding tokens: 0).
    """
    n, hq, dk = q.shape
    num_blocks, block_size, hkv = key_caches[0].shape[:3]
    key_dims = tuple(k.shape[3] for k in key_caches)
    if sum(key_dims) != dk:
        raise ValueError(f"q's head dim {dk} is not the key parts' {key_dims}")
    values = key_caches[0] if value_cache is None else value_cache
    dv = values.shape[3]
    reason = unsupported_reason(block_size, key_dims, dv)
    if reason:
        raise ValueError(reason)
    group = hq // hkv
    num_seqs, max_blocks = block_tables.shape
    if tiles is None:
        tiles = default_tiles(n, num_seqs, hkv, group, block_size, max_blocks)
    heads = tiles.heads_per_tile
    chunks = math.ceil(group / heads)
    rows = tiles.rows

    qt = _QueryTiles(token_seq, positions, valid, num_seqs, tiles.block_q)
    lo = jnp.zeros_like(qt.first_pos) if window is None else jnp.maximum(qt.first_pos - window + 1, 0)
    hi = jnp.where(qt.size > 0, qt.last_pos + 1, 0)

    # [N, Hq, Dk] -> [tiles, Hkv, chunks, rows, Dk]: row r of a tile is token r // heads, head r % heads
    padded_group = chunks * heads
    grouped = q.reshape(n, hkv, group, dk)
    if padded_group != group:
        grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))
    tiled = grouped[qt.tokens]  # [tiles, block_q, Hkv, padded_group, Dk]
    tiled = tiled.reshape(qt.count, tiles.block_q, hkv, chunks, heads, dk).transpose(0, 2, 3, 1, 4, 5)
    tiled = tiled.reshape(qt.count, hkv, chunks, tiles.block_q * heads, dk)
    pad_rows = rows - tiles.block_q * heads
    if pad_rows:
        tiled = jnp.pad(tiled, ((0, 0), (0, 0), (0, 0), (0, pad_rows), (0, 0)))
    q_parts, offset = [], 0
    for d in key_dims:
        q_parts.append(tiled[..., offset : offset + d])
        offset += d
    row_pos = jnp.where(qt.token_valid, positions[qt.tokens], -1)  # [tiles, block_q]
    row_pos = jnp.repeat(row_pos, heads, axis=1)
    row_pos = jnp.pad(row_pos, ((0, 0), (0, pad_rows)), constant_values=-1)

    pages = tiles.pages_per_step
    width = math.ceil(max_blocks / pages) * pages
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, width - max_blocks)))
    args = [qt.seq, lo, hi, tables, row_pos, *q_parts, *key_caches]
    if value_cache is not None:
        args.append(value_cache)
    sink_rows = None
    if sinks is not None:
        sink_heads = jnp.pad(
            sinks.astype(jnp.float32).reshape(hkv, group),
            ((0, 0), (0, padded_group - group)),
            constant_values=-jnp.inf,
        ).reshape(hkv, chunks, 1, heads)
        sink_rows = jnp.broadcast_to(sink_heads, (hkv, chunks, tiles.block_q, heads)).reshape(hkv, chunks, -1)
        sink_rows = jnp.pad(sink_rows, ((0, 0), (0, 0), (0, pad_rows)), constant_values=-jnp.inf)
        if tiles.splits == 1:
            args.append(sink_rows)
    grid = (qt.count, hkv, chunks) + ((tiles.splits,) if tiles.splits > 1 else ())
    if tiles.splits > 1:
        partial = (qt.count, hkv, chunks, tiles.splits, rows)
        out_shape = [
            jax.ShapeDtypeStruct(partial + (dv,), jnp.float32),
            jax.ShapeDtypeStruct(partial, jnp.float32),
            jax.ShapeDtypeStruct(partial, jnp.float32),
        ]
    else:
        out_shape = [jax.ShapeDtypeStruct((qt.count, hkv, chunks, rows, dv), q.dtype)]
    kernel = functools.partial(
        _kernel,
        num_key_parts=len(key_caches),
        value_is_first_key=value_cache is None,
        has_sinks=sinks is not None and tiles.splits == 1,
        block_size=block_size,
        scale=float(scale),
        window=window,
        tiles=tiles,
    )
    result = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
    )(*args)
    if tiles.splits > 1:
        out = _combine(*result, sink_rows).astype(q.dtype)
    else:
        out = result[0]
    # [tiles, Hkv, chunks, rows, Dv] -> [N, Hq, Dv]
    out = out[..., : tiles.block_q * heads, :].reshape(qt.count, hkv, chunks, tiles.block_q, heads, dv)
    out = out.transpose(0, 3, 1, 2, 4, 5).reshape(qt.count, tiles.block_q, hkv, padded_group, dv)[:, :, :, :group]
    targets = jnp.where(qt.token_valid, qt.tokens, n)
    result = jnp.zeros((n, hkv, group, dv), q.dtype).at[targets].set(out, mode="drop")
    return result.reshape(n, hq, dv)


def _combine(acc, m, total, sink_rows):
    """The splits' partial sums ``acc [..., splits, rows, Dv]``, maxima and sums ``[..., splits, rows]`` -> the
    normalized output ``[..., rows, Dv]`` float32 (sinks ``[Hkv, chunks, rows]`` join the denominator)."""
    m_all = m.max(axis=3)
    if sink_rows is not None:
        m_all = jnp.maximum(m_all, sink_rows[None])
    m_safe = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    weights = jnp.exp(m - m_safe[:, :, :, None])
    total = (total * weights).sum(axis=3)
    if sink_rows is not None:
        total = total + jnp.exp(sink_rows[None] - m_safe)
    out = (acc * weights[..., None]).sum(axis=3)
    return out / jnp.where(total == 0, 1.0, total)[..., None]
