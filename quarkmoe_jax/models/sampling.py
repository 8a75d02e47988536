"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling, per row.

One function serves :meth:`~quarkmoe_jax.models.QuarkMoEForCausalLM.generate` (one key, one setting for the
batch) and the serving engine (a key and a setting per request, so a request's tokens depend on its own seed
only, whatever else is in the batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sample_tokens", "token_logprobs"]


def sample_tokens(logits, key, temperature, top_p, top_k=0, *, greedy: bool = False, per_row_keys: bool = False):
    """int32 ``[B]`` tokens from float32 ``logits [B, V]``.

    Args:
      logits: float32 ``[B, V]``.
      key: one PRNG key for the batch, or (``per_row_keys``) ``[B]`` keys, one per row.
      temperature: float32 scalar or ``[B]``; a row with 0 takes the argmax. Otherwise the logits are divided by
        it (relative to the best logit, so a tiny temperature gives -inf, never inf - inf = NaN).
      top_p: float32 scalar or ``[B]`` in ``(0, 1]``: keep the smallest set of best tokens whose probability
        reaches it (the best token is always kept, so a ``top_p`` that rounds to 0 is greedy).
      top_k: int32 scalar or ``[B]``; > 0 keeps the ``top_k`` best tokens before ``top_p`` (0: all).
      greedy: static: every row takes the argmax (nothing else is computed).

    Returns:
      int32 ``[B]``.
    """
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    rows, vocab = logits.shape
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (rows,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (rows,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (rows,))
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    scale = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = (sorted_logits - sorted_logits[:, :1]) / scale
    rank = jnp.arange(vocab)[None, :]
    scaled = jnp.where((top_k[:, None] <= 0) | (rank < top_k[:, None]), scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
    kept = jnp.where((before < top_p[:, None]) | (rank == 0), scaled, -jnp.inf)
    if per_row_keys:
        choice = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, kept)
    else:
        choice = jax.random.categorical(key, kept, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, best)


def token_logprobs(logits, tokens, top: int):
    """The model's log-probabilities (``log_softmax`` of the raw logits, before temperature, top-k or top-p:
    vLLM's default "raw" logprobs) of the chosen tokens and of each row's ``top`` best tokens.

    Args:
      logits: float32 ``[B, V]``; tokens: int32 ``[B]``; top: static, ``0 < top <= V``.

    Returns:
      ``(chosen float32 [B], top_ids int32 [B, top], top_logprobs float32 [B, top])``, the best first.
    """
    normalizer = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normalizer
    best, ids = jax.lax.top_k(logits, top)
    return chosen, ids.astype(jnp.int32), best - normalizer[:, None]
