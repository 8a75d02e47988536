"""The paged KV cache: fixed-size blocks shared by every sequence, a block table per sequence.

One layer's cache is a dict of arrays ``[num_blocks, block_size, ...]`` (grouped-query attention: ``"k"`` /
``"v"`` ``[NB, BS, Hkv, D]``; latent attention: ``"latent" [NB, BS, r]`` and ``"k_rot" [NB, BS, dr]``), the same
names as the contiguous cache of :meth:`~quarkmoe_jax.models.QuarkMoEForCausalLM.init_cache`. Position ``p`` of a
sequence lives in block ``block_table[p // BS]`` at offset ``p % BS``, i.e. at slot ``block * BS + p % BS``.

A step runs ``N`` tokens of ``S`` sequences flattened into one row (:class:`PagedBatch`): prefill chunks and
decode tokens together. Each token's key and value are written at its slot, then each token attends to its
sequence's positions ``<= its own`` read through the block table (:func:`write_and_read`). The read here is
XLA's gather, the CPU path and the oracle of the GPU kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["PagedBatch", "write_and_read"]


class PagedBatch(NamedTuple):
    """Where the ``N`` tokens of one step go (all int32 unless stated; ``N``, ``S`` are bucket sizes).

    ``token_seq [N]``: each token's row of ``block_tables``; ``positions [N]``: each token's position in its
    sequence; ``slots [N]``: where its key and value are written (``block * block_size + offset``; padding
    tokens: ``num_blocks * block_size``, out of range, so nothing is written); ``block_tables [S, max_blocks]``
    (unused entries: any block id, what they hold is masked); ``last_token [S]``: the index in ``[0, N)`` of each
    sequence's last token this step (its logits are the step's output); ``valid`` bool ``[N]``: real tokens.
    """

    token_seq: jax.Array
    positions: jax.Array
    slots: jax.Array
    block_tables: jax.Array
    last_token: jax.Array
    valid: jax.Array


def write_and_read(cache: dict, new: dict, start, paged: PagedBatch | None):
    """Write this step's keys / values into one layer's cache and read back what the queries attend to.

    Args:
      cache: the layer's cache, or None (no cache: the new entries are all there is).
      new: ``{name: [B, T, ...]}`` this step's entries (paged: ``B = 1``, ``T = N``).
      start: the position of token 0 (contiguous cache; int or int32 scalar).
      paged: None for the contiguous cache ``{name: [B, L, ...]}``, else the step's :class:`PagedBatch` for a
        paged cache ``{name: [NB, BS, ...]}``.

    Returns:
      ``(cache, read, key_positions)``: the updated cache (None without one); ``read``: ``{name: [B, L, ...]}``
      for the contiguous cache (``[B, T, ...]`` without one), paged ``{name: [N, max_blocks * BS, ...]}``: each
      token's own sequence; ``key_positions`` int32 ``[L]`` (the read's positions; without a cache None: the
      caller's query positions).
    """
    if cache is None:
        return None, new, None
    if paged is None:
        updated = {}
        for name, value in new.items():
            origin = (0, start) + (0,) * (value.ndim - 2)
            updated[name] = lax.dynamic_update_slice(cache[name], value.astype(cache[name].dtype), origin)
        length = next(iter(updated.values())).shape[1]
        return updated, updated, jnp.arange(length, dtype=jnp.int32)
    updated, read = {}, {}
    tables = paged.block_tables[paged.token_seq]  # [N, max_blocks]
    for name, value in new.items():
        blocks, block_size = cache[name].shape[:2]
        flat = cache[name].reshape(blocks * block_size, *cache[name].shape[2:])
        flat = flat.at[paged.slots].set(value[0].astype(flat.dtype), mode="drop")
        updated[name] = flat.reshape(cache[name].shape)
        gathered = updated[name][tables]  # [N, max_blocks, BS, ...]
        read[name] = gathered.reshape(gathered.shape[0], -1, *gathered.shape[3:])
    length = tables.shape[1] * next(iter(cache.values())).shape[1]
    return updated, read, jnp.arange(length, dtype=jnp.int32)
