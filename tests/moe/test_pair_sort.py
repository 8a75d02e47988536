"""Dispatch (sort by local expert, pad groups to row tiles) against a plain numpy construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.kernels.base import Load, expected_load
from quarkmoe_jax.moe.pair_sort import max_row_tiles, sort_pairs, tile_rows


@pytest.mark.parametrize(
    "tokens, top_k, experts, block_m", [(1, 2, 8, 16), (13, 4, 6, 4), (40, 2, 3, 8), (0, 2, 4, 16)]
)
def test_tiles_hold_each_experts_pairs_in_order(key, tokens, top_k, experts, block_m):
    ids = jax.random.randint(key, (tokens, top_k), -1, experts)  # -1: a pair whose expert is not local
    valid = jnp.arange(tokens) < max(tokens - 2, 0)  # the last two tokens are padding
    expert_map = jnp.concatenate([jnp.arange(experts), jnp.array([-1])])  # global id -1 -> index -1 -> not local
    pairs = sort_pairs(ids, valid, expert_map, experts)
    tiled = tile_rows(pairs, block_m)

    flat_ids = np.asarray(ids).reshape(-1)
    flat_valid = np.repeat(np.asarray(valid), top_k) & (flat_ids >= 0)
    num_tiles = max_row_tiles(tokens * top_k, experts, block_m)
    want_tiles, want_rows = [], np.full(num_tiles * block_m, -1)
    for e in range(experts):
        members = [p for p in range(flat_ids.size) if flat_valid[p] and flat_ids[p] == e]  # stable order
        for start in range(0, len(members), block_m):
            tile = len(want_tiles)
            want_tiles.append(e)
            chunk = members[start : start + block_m]
            want_rows[tile * block_m : tile * block_m + len(chunk)] = chunk
    want_tiles += [-1] * (num_tiles - len(want_tiles))

    np.testing.assert_array_equal(np.asarray(tiled.tile_expert), want_tiles)
    order = np.append(np.asarray(pairs.order), -1)  # row_sorted == P marks a padding row
    np.testing.assert_array_equal(order[np.asarray(tiled.row_sorted)], want_rows)


def test_an_expert_parallel_shard_picks_tiles_for_its_share_of_the_pairs():
    """A one-expert shard of Mixtral on EP 8 at 16 tokens sees 32 pairs but expects 4 for its expert: decode
    tiles, as the whole layer uses (it once took the 32-row "mid" tiles: 2.4x slower on an H100, MXFP4)."""
    assert expected_load(num_pairs=32, num_local=8, num_global=8) == Load(8, 4.0)  # the whole layer
    assert expected_load(num_pairs=32, num_local=1, num_global=8) == Load(1, 4.0)  # one EP 8 shard
    assert expected_load(32, 1, 8).regime == expected_load(32, 8, 8).regime == "decode"
    assert expected_load(num_pairs=8192, num_local=1, num_global=8) == Load(1, 1024.0)  # prefill stays prefill
    assert expected_load(num_pairs=128, num_local=32, num_global=256) == Load(16, 1.0)  # DeepSeek-V3 EP 8, T = 16
    assert expected_load(num_pairs=0, num_local=4, num_global=4) == Load(1, 0.0)  # no tokens
