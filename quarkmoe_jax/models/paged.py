"""The paged KV cache: fixed-size blocks shared by every sequence, a block table per sequence.

One layer's cache is a dict of arrays ``[num_blocks, block_size, ...]`` (grouped-query attention: ``"k"`` /
``"v"`` ``[NB, BS, Hkv, D]``; latent attention: ``"latent" [NB, BS, r]`` and ``"k_rot" [NB, BS, dr]``), the same
names as the contiguous cache of :meth:`~quarkmoe_jax.models.QuarkMoEForCausalLM.init_cache`. Position ``p`` of a
sequence lives in block ``block_table[p // BS]`` at offset ``p % BS``, i.e. at slot ``block * BS + p % BS``.

A step runs ``N`` tokens of ``S`` sequences flattened into one row (:class:`PagedBatch`): prefill chunks and
decode tokens together. Each token's key and value are written at its slot, then each token attends to its
sequence's positions ``<= its own`` read through the block table (:class:`PagedAttention`), by one of the
attention backends (:func:`attention_backends`): ``"xla"``, a gather of each token's whole block table and the
model's own :func:`~quarkmoe_jax.models.layers.attention` (the CPU path and the oracle), or a kernel backend's
paged attention (``"pallas"``: :mod:`quarkmoe_jax.kernels.pallas.paged_attention`, which reads only the blocks
a token may see; compiled on a GPU, the Pallas interpreter elsewhere).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS
from quarkmoe_jax.models.layers import attention

__all__ = [
    "PagedBatch",
    "PagedAttention",
    "XLA_ATTENTION",
    "attention_backends",
    "resolve_attention_backend",
    "write_contiguous",
]

XLA_ATTENTION = "xla"
"""The oracle's name: a gather of each token's block table and the model's attention (any shape, any device)."""


def attention_backends() -> tuple[str, ...]:
    """The attention backends: :data:`XLA_ATTENTION` and every kernel backend with a paged attention kernel
    (:attr:`~quarkmoe_jax.kernels.base.KernelBackend.has_paged_attention`)."""
    kernels = [name for name, backend in KERNEL_BACKENDS.items() if backend.has_paged_attention]
    return (XLA_ATTENTION, *kernels)


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


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """One step's :class:`PagedBatch` and the attention backend that reads the cache for it (static)."""

    batch: PagedBatch
    backend: str = XLA_ATTENTION

    def write(self, cache: dict, new: dict) -> dict:
        """``new {name: [1, N, ...]}``: the step's entries, written at their slots (padding tokens write
        nothing); returns the updated cache ``{name: [NB, BS, ...]}``."""
        updated = {}
        for name, value in new.items():
            blocks, block_size = cache[name].shape[:2]
            flat = cache[name].reshape(blocks * block_size, *cache[name].shape[2:])
            flat = flat.at[self.batch.slots].set(value[0].astype(flat.dtype), mode="drop")
            updated[name] = flat.reshape(cache[name].shape)
        return updated

    def attend(self, q, cache: dict, keys: tuple[str, ...], value: str | None, *, scale, window=None, sinks=None):
        """Each token's attention to its sequence's cached positions ``<=`` its own (within ``window``).

        Args:
          q: ``[N, Hq, Dk]`` in the activation dtype, ``Dk`` the sum of the key entries' last dims.
          cache: the layer's (already written) cache; ``keys``: the names whose last dims, concatenated, are
            the key (``("k",)``; latent attention ``("latent", "k_rot")``); ``value``: the value's name, or None
            (the first key entry is the value). An entry without a head axis (``[NB, BS, d]``) is one kv head.
          scale, window, sinks: as :func:`~quarkmoe_jax.models.layers.attention`.

        Returns:
          ``[N, Hq, Dv]`` in ``q``'s dtype.
        """
        with_heads = {name: c if c.ndim == 4 else c[:, :, None, :] for name, c in cache.items()}
        key_caches = [with_heads[name].astype(q.dtype) for name in keys]
        value_cache = None if value is None else with_heads[value].astype(q.dtype)
        b = self.batch
        if self.backend != XLA_ATTENTION:
            return KERNEL_BACKENDS[self.backend].paged_attention(
                q,
                key_caches,
                value_cache,
                b.block_tables,
                b.token_seq,
                b.positions,
                b.valid,
                scale=scale,
                window=window,
                sinks=sinks,
                interpret=jax.devices()[0].platform != "gpu",
            )
        tables = b.block_tables[b.token_seq]  # [N, max_blocks]

        def read(c):  # [NB, BS, H, d] -> [N, max_blocks * BS, H, d]: each token's whole sequence
            gathered = c[tables]
            return gathered.reshape(gathered.shape[0], -1, *gathered.shape[3:])

        k = jnp.concatenate([read(c) for c in key_caches], axis=-1)
        v = k[..., : key_caches[0].shape[-1]] if value_cache is None else read(value_cache)
        k_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
        out = attention(q[:, None], k, v, b.positions[:, None], k_positions, scale=scale, window=window, sinks=sinks)
        return out[:, 0]


def resolve_attention_backend(
    requested: str,
    key_dims: tuple[int, ...],
    value_dim: int,
    block_size: int,
    num_tokens: int | None = None,
    context: int | None = None,
) -> str:
    """The attention backend a paged cache of ``block_size`` with these head dims runs: ``"auto"`` is the first
    kernel backend of :func:`attention_backends` that takes the shapes on a GPU (and, given a step's
    ``num_tokens`` over sequences of up to ``context`` positions, is preferred there:
    ``KernelBackend.paged_attention_preferred``), else :data:`XLA_ATTENTION`; a kernel backend named where it
    cannot take them is refused (:class:`~quarkmoe_jax.errors.InputError` with the reason)."""
    names = attention_backends()
    if requested != "auto" and requested not in names:
        raise InputError(f"attention_backend must be 'auto' or one of {list(names)}, got {requested!r}")
    if requested == XLA_ATTENTION:
        return requested
    if requested != "auto":
        reason = KERNEL_BACKENDS[requested].paged_attention_unsupported(block_size, key_dims, value_dim)
        if reason:
            raise InputError(f"attention_backend={requested!r}: {reason}")
        return requested
    if _on_gpu():
        for name in names[1:]:
            backend = KERNEL_BACKENDS[name]
            if backend.paged_attention_unsupported(block_size, key_dims, value_dim) is None and (
                num_tokens is None or backend.paged_attention_preferred(num_tokens, context, key_dims)
            ):
                return name
    return XLA_ATTENTION


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def write_contiguous(cache: dict | None, new: dict, start):
    """Write this step's entries into one layer's contiguous cache and return what the queries attend to.

    Args:
      cache: ``{name: [B, L, ...]}``, or None (no cache: the new entries are all there is).
      new: ``{name: [B, T, ...]}`` this step's entries; start: the position of token 0 (int or int32 scalar).

    Returns:
      ``(cache, read, key_positions)``: the updated cache and ``read = cache`` with ``key_positions`` int32
      ``[L]``; without a cache ``(None, new, None)`` (the caller's query positions are the keys').
    """
    if cache is None:
        return None, new, None
    updated = {}
    for name, value in new.items():
        origin = (0, start) + (0,) * (value.ndim - 2)
        updated[name] = lax.dynamic_update_slice(cache[name], value.astype(cache[name].dtype), origin)
    length = next(iter(updated.values())).shape[1]
    return updated, updated, jnp.arange(length, dtype=jnp.int32)
