"""Dispatch of (token, k) pairs to local experts: the sort every backend shares, and the row-tile padding
the kernels need. Static shapes only (everything runs inside ``jit`` without a host sync)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["SortedPairs", "TiledRows", "sort_pairs", "tile_rows", "max_row_tiles"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortedPairs:
    """The ``P = T*k`` pairs sorted by local expert (stable), non-local / padding pairs last.

    Attributes (all ``[P]`` unless noted):
      order: int32 flat pair index ``t * k + j`` at each sorted position.
      rows_expert: int32 local expert of each sorted pair (clamped into range for the invalid ones).
      rows_valid: bool, the pair's expert is local and its token is real.
      rows_token: int32 token of each sorted pair.
      group_sizes: int32 ``[E_local]`` valid pairs per local expert.
    """

    order: jax.Array
    rows_expert: jax.Array
    rows_valid: jax.Array
    rows_token: jax.Array
    group_sizes: jax.Array


def sort_pairs(topk_ids, valid_tokens, expert_map, num_local: int) -> SortedPairs:
    """Sort ``topk_ids [T, k]`` (global ids) by local expert; ``valid_tokens [T]`` masks padding tokens;
    ``expert_map [E_global]`` maps global ids to local ones (-1: not on this device) or is None."""
    k = topk_ids.shape[1]
    local = topk_ids.astype(jnp.int32) if expert_map is None else jnp.asarray(expert_map)[topk_ids]
    local = jnp.where(valid_tokens[:, None], local, -1).reshape(-1)
    sort_key = jnp.where(local < 0, num_local, local)  # non-local pairs last, outside every group
    order = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
    sorted_key = sort_key[order]
    group_sizes = jnp.bincount(sort_key, length=num_local + 1)[:num_local].astype(jnp.int32)
    return SortedPairs(
        order=order,
        rows_expert=jnp.minimum(sorted_key, num_local - 1).astype(jnp.int32),
        rows_valid=sorted_key < num_local,
        rows_token=(order // k).astype(jnp.int32),
        group_sizes=group_sizes,
    )


def max_row_tiles(num_pairs: int, num_local: int, block_m: int) -> int:
    """Static bound on row tiles: every non-empty group wastes less than one tile."""
    return -(-num_pairs // block_m) + min(num_local, num_pairs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiledRows:
    """Sorted pairs placed in row tiles of ``block_m``, each tile holding one expert's rows.

    Attributes:
      tile_expert: int32 ``[num_tiles]`` local expert of each tile, -1 for unused tiles.
      pair_row: int32 ``[P]`` padded row of each *sorted* pair, ``M_pad`` for invalid pairs.
      row_sorted: int32 ``[M_pad]`` sorted-pair position feeding each padded row, ``P`` for padding rows.
    """

    tile_expert: jax.Array
    pair_row: jax.Array
    row_sorted: jax.Array


def tile_rows(pairs: SortedPairs, block_m: int) -> TiledRows:
    """Pad every expert's group of sorted pairs to a multiple of ``block_m`` rows."""
    num_pairs = pairs.order.shape[0]
    num_local = pairs.group_sizes.shape[0]
    num_tiles = max_row_tiles(num_pairs, num_local, block_m)
    m_pad = num_tiles * block_m
    sizes = pairs.group_sizes
    tiles_per_group = (sizes + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles_per_group)
    tile_start = tile_end - tiles_per_group
    group_start = jnp.cumsum(sizes) - sizes
    position = jnp.arange(num_pairs, dtype=jnp.int32)
    rank = position - group_start[pairs.rows_expert]
    pair_row = jnp.where(pairs.rows_valid, tile_start[pairs.rows_expert] * block_m + rank, m_pad).astype(jnp.int32)
    row_sorted = jnp.full((m_pad + 1,), num_pairs, jnp.int32).at[pair_row].set(position)[:m_pad]
    tile_index = jnp.arange(num_tiles, dtype=jnp.int32)
    # One fused comparison: the default binary search is a loop of ~log2(E) tiny kernels on a GPU (~20 us of
    # launches at gpt-oss decode, docs/performance.md).
    tile_expert = jnp.searchsorted(tile_end, tile_index, side="right", method="compare_all").astype(jnp.int32)
    tile_expert = jnp.where(tile_expert < num_local, tile_expert, -1)
    return TiledRows(tile_expert=tile_expert, pair_row=pair_row, row_sorted=row_sorted)
