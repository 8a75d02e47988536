"""The paged attention kernel (Pallas interpreter on CPU, compiled on a GPU) against the XLA attention oracle.

One ragged step mixes what the engine sends: a prefill chunk that starts mid-sequence and crosses blocks, a
decode token deep in its sequence, a one-token sequence, a block-sized prefill and padding tokens, over block
tables in scattered order. Tilings vary what the kernel splits (tokens per tile, heads per tile below the group,
blocks per iteration, splits over a tile's blocks); the attention varies windows, sinks and latent keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.kernels.pallas import paged_attention as kernel
from quarkmoe_jax.models import paged as paged_module
from quarkmoe_jax.models.paged import PagedAttention, PagedBatch, resolve_attention_backend

ON_GPU = jax.devices()[0].platform == "gpu"
BLOCK_SIZE, NUM_BLOCKS = 16, 24
# (sequence row, first position, tokens): a chunk from 20 crossing blocks 1 -> 2, a decode token at 40,
# a one-token sequence, a whole block from 0
SPANS = ((0, 20, 13), (1, 40, 1), (2, 0, 1), (3, 0, 16))
NUM_TOKENS = 40  # 31 real tokens + 9 padding


def ragged_batch(rng) -> PagedBatch:
    tables = np.stack([rng.permutation(NUM_BLOCKS)[:4] for _ in SPANS]).astype(np.int32)
    seq, pos = [], []
    for row, first, count in SPANS:
        seq += [row] * count
        pos += list(range(first, first + count))
    pad = NUM_TOKENS - len(seq)
    slots = [tables[s, p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for s, p in zip(seq, pos, strict=True)]
    return PagedBatch(
        jnp.asarray(seq + [0] * pad, jnp.int32),
        jnp.asarray(pos + [0] * pad, jnp.int32),
        jnp.asarray(slots + [NUM_BLOCKS * BLOCK_SIZE] * pad, jnp.int32),
        jnp.asarray(tables),
        jnp.asarray(np.cumsum([c for *_, c in SPANS]) - 1, jnp.int32),
        jnp.asarray([True] * len(seq) + [False] * pad),
    )


def random_cache(rng, dims: dict[str, tuple[int, ...]], dtype, magnitude=1.0):
    return {
        name: jnp.asarray(rng.standard_normal((NUM_BLOCKS, BLOCK_SIZE) + shape) * magnitude, dtype)
        for name, shape in dims.items()
    }


def run_both(batch, q, cache, keys, value, tiles, **attention):
    """(kernel, oracle) outputs, the oracle through the XLA backend of PagedAttention."""
    oracle = jax.jit(lambda q, c: PagedAttention(batch, "xla").attend(q, c, keys, value, **attention))(q, cache)
    with_heads = {n: c if c.ndim == 4 else c[:, :, None, :] for n, c in cache.items()}

    @jax.jit
    def run(q, caches):
        key_caches = [caches[n] for n in keys]
        value_cache = None if value is None else caches[value]
        return kernel.paged_attention(
            q,
            key_caches,
            value_cache,
            batch.block_tables,
            batch.token_seq,
            batch.positions,
            batch.valid,
            tiles=tiles,
            interpret=not ON_GPU,
            **attention,
        )

    return np.asarray(run(q, with_heads), np.float32), np.asarray(oracle, np.float32)


TILINGS = {
    "one token a tile, two blocks an iteration": kernel.AttentionTiles(block_q=1, heads_per_tile=4, pages_per_step=2),
    "8 tokens a tile, 2 of 4 heads, 3 splits": kernel.AttentionTiles(
        block_q=8, heads_per_tile=2, pages_per_step=1, splits=3
    ),
}


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, True), (16, False)])
def test_grouped_query_attention_equals_the_oracle(tiling, window, with_sinks):
    rng = np.random.default_rng(7)
    batch = ragged_batch(rng)
    hq, hkv, d = 8, 2, 16
    cache = random_cache(rng, {"k": (hkv, d), "v": (hkv, 32)}, jnp.float32)
    q = jnp.asarray(rng.standard_normal((NUM_TOKENS, hq, d)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(hq) * 2, jnp.float32) if with_sinks else None
    out, oracle = run_both(batch, q, cache, ("k",), "v", TILINGS[tiling], scale=0.25, window=window, sinks=sinks)
    real = np.asarray(batch.valid)
    np.testing.assert_allclose(out[real], oracle[real], rtol=2e-5, atol=2e-6)
    assert not out[~real].any()  # padding tokens: 0


@pytest.mark.parametrize("splits", [1, 2])
def test_latent_attention_two_key_parts_and_the_latent_as_value(splits):
    rng = np.random.default_rng(8)
    batch = ragged_batch(rng)
    cache = random_cache(rng, {"latent": (32,), "k_rot": (16,)}, jnp.float32)
    q = jnp.asarray(rng.standard_normal((NUM_TOKENS, 4, 48)), jnp.float32)
    tiles = kernel.AttentionTiles(block_q=4, heads_per_tile=4, pages_per_step=2, splits=splits)
    out, oracle = run_both(batch, q, cache, ("latent", "k_rot"), None, tiles, scale=0.3)
    real = np.asarray(batch.valid)
    np.testing.assert_allclose(out[real], oracle[real], rtol=2e-5, atol=2e-6)


def test_bfloat16_saturating_scores_and_dominant_sinks():
    """bfloat16 caches with scores up to ~1e3 (softmax one-hot), sinks far above and far below the scores."""
    rng = np.random.default_rng(9)
    batch = ragged_batch(rng)
    cache = random_cache(rng, {"k": (2, 16), "v": (2, 16)}, jnp.bfloat16, magnitude=8.0)
    q = jnp.asarray(rng.standard_normal((NUM_TOKENS, 4, 16)) * 8, jnp.bfloat16)
    sinks = jnp.asarray([1e4, -1e4, 0.0, 30.0], jnp.float32)
    tiles = kernel.AttentionTiles(block_q=4, heads_per_tile=2, pages_per_step=2, splits=2)
    out, oracle = run_both(batch, q, cache, ("k",), "v", tiles, scale=1.0, window=None, sinks=sinks)
    real = np.asarray(batch.valid)
    assert np.isfinite(out).all()
    # the second product runs on bfloat16 probabilities (as the oracle's): a few bfloat16 ulps of |v| <= ~40
    np.testing.assert_allclose(out[real], oracle[real], atol=0.35, rtol=0.02)
    np.testing.assert_array_equal(out[real][:, 0], 0)  # a sink of 1e4 takes the whole softmax


def test_default_tiles_split_a_small_decode_grid_and_not_a_prefill():
    decode = kernel.default_tiles(8, 1, num_kv_heads=8, group=8, block_size=16, max_blocks=64)
    assert decode.splits > 1 and decode.block_q * decode.heads_per_tile == 64
    prefill = kernel.default_tiles(2048, 1, num_kv_heads=8, group=8, block_size=16, max_blocks=128)
    assert prefill.splits == 1
    latent = kernel.default_tiles(8, 8, num_kv_heads=1, group=128, block_size=64, max_blocks=64)
    assert latent.heads_per_tile == 64 and latent.block_q == 1 and latent.pages_per_step == 1


def test_backend_resolution():
    assert resolve_attention_backend("xla", (8,), 8, 4) == "xla"
    assert resolve_attention_backend("auto", (8,), 8, 4) == "xla"  # dims the kernel cannot take
    assert resolve_attention_backend("auto", (64,), 64, 16) == ("pallas" if ON_GPU else "xla")
    assert resolve_attention_backend("pallas", (512, 64), 512, 16) == "pallas"
    with pytest.raises(InputError, match="key part 1's head dim a power of two >= 16, got 8"):
        resolve_attention_backend("pallas", (32, 8), 32, 16)
    with pytest.raises(InputError, match="block_size a power of two >= 16, got 24"):
        resolve_attention_backend("pallas", (64,), 64, 24)
    with pytest.raises(InputError, match="attention_backend must be 'auto' or one of"):
        resolve_attention_backend("cudnn", (64,), 64, 16)


def test_auto_runs_xla_for_latent_decode_steps_where_the_kernel_measured_slower(monkeypatch):
    """On a GPU, auto takes the kernel for grouped-query attention at every step size, and for latent attention
    only where XLA's gather would read more than 256 MiB (the kernel ran 2.1-2.8x slower at decode, H100)."""
    monkeypatch.setattr(paged_module, "_on_gpu", lambda: True)
    latent = ((512, 64), 512, 16)
    assert resolve_attention_backend("auto", *latent) == "pallas"  # no step size given: what the shapes allow
    assert resolve_attention_backend("auto", *latent, num_tokens=64, context=2048) == "xla"  # 151 MB
    assert resolve_attention_backend("auto", *latent, num_tokens=512, context=2048) == "pallas"  # 1.2 GB
    assert resolve_attention_backend("pallas", *latent, num_tokens=8, context=2048) == "pallas"  # asked for
    assert resolve_attention_backend("auto", (64,), 64, 16, num_tokens=8, context=2048) == "pallas"
