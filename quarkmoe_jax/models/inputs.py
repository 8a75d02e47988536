"""What a caller gives a whole model, checked on the host before anything is allocated.

:class:`~quarkmoe_jax.models.model.QuarkMoEForCausalLM` (``model(...)``, ``init_cache``, ``generate``) and
``quarkmoe generate`` share these checks. Every refusal raises :class:`~quarkmoe_jax.errors.InputError` (a
:class:`~quarkmoe_jax.errors.QuarkMoEError`, so a ``ValueError``) naming the argument, what was expected and
what was found.

The context (:func:`context_of`) is the caller's ``max_model_len`` when set, else the config's
``max_position_embeddings``, else :data:`DEFAULT_CONTEXT` (what vLLM assumes for a config that states no
length). A prompt, a prompt plus ``max_new_tokens``, and ``start`` plus the tokens of a cached call must fit it.
A KV cache must also fit the device's memory (:func:`check_cache_size`), whatever the context.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.checkpoint.architectures import DEFAULT_CONTEXT
from quarkmoe_jax.errors import InputError
from quarkmoe_jax.moe.buckets import token_bucket

__all__ = [
    "DEFAULT_CONTEXT",
    "Context",
    "GenerationRequest",
    "context_of",
    "check_input_ids",
    "check_max_new_tokens",
    "check_sampling",
    "check_key",
    "check_eos",
    "check_seed",
    "check_cache",
    "check_start",
    "check_cache_size",
    "DeviceMemory",
    "device_memory",
    "cache_bytes",
    "positive_int",
    "is_int",
    "check_generation",
]


_FLOAT32_TINY, _FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
_INT64 = np.iinfo(np.int64)


class Context(NamedTuple):
    """The most positions a sequence may have, and where that number comes from (for the messages)."""

    length: int
    source: str

    def __str__(self) -> str:
        return f"the model's context of {self.length} positions ({self.source})"


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def positive_int(value, name: str) -> int:
    """``value`` as an ``int`` >= 1 (bool, float and str refused)."""
    if not is_int(value) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {_describe(value)}", field=name)
    return int(value)


def context_of(config, max_model_len: int | None = None) -> Context:
    """The context of a model with :class:`~quarkmoe_jax.models.DecoderConfig` ``config``: ``max_model_len``
    when given (it may be larger or smaller than the config's), else ``max_position_embeddings``, else
    :data:`DEFAULT_CONTEXT`."""
    if max_model_len is not None:
        return Context(positive_int(max_model_len, "max_model_len"), "max_model_len")
    configured = config.max_position_embeddings
    if is_int(configured) and configured > 0:
        return Context(int(configured), "max_position_embeddings in config.json; max_model_len changes it")
    return Context(DEFAULT_CONTEXT, "config.json gives no max_position_embeddings; max_model_len sets one")


def _check_ids_spec(shape, dtype, context: Context, name: str) -> None:
    if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise InputError(f"{name} must be an integer array [B, T], got {dtype} {tuple(shape)}", field=name)
    if shape[0] < 1 or shape[1] < 1:
        raise InputError(
            f"{name} must hold at least one sequence of at least one token, got shape {tuple(shape)}", field=name
        )
    if shape[1] > context.length:
        raise InputError(f"{name} has {shape[1]} tokens, more than {context}", field=name)


def check_input_ids(input_ids, vocab_size: int, context: Context, *, name: str = "input_ids"):
    """Token ids ``[B, T]`` (B, T >= 1, T within ``context``, every value in ``[0, vocab_size)``).

    Host data (NumPy, lists, concrete jax arrays) is returned as a host int32 array; a jax tracer (a call
    inside ``jit``) is checked for shape and dtype only (its values are not known) and returned as is.
    """
    if isinstance(input_ids, jax.core.Tracer):
        _check_ids_spec(input_ids.shape, input_ids.dtype, context, name)
        return input_ids
    try:
        ids = np.asarray(input_ids)
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"{name} must be an integer array [B, T] ({' '.join(str(e).split())})", field=name) from None
    if ids.dtype == object:
        raise InputError(
            f"{name} must be an integer array [B, T] of token ids in [0, {vocab_size}); it holds Python objects "
            "(an integer beyond 64 bits, or mixed types)",
            field=name,
        )
    _check_ids_spec(ids.shape, ids.dtype, context, name)
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab_size:
        raise InputError(f"{name} must be in [0, {vocab_size}), found values in [{low}, {high}]", field=name)
    return ids.astype(np.int32)


def check_max_new_tokens(max_new_tokens, prompt_length: int, context: Context) -> int:
    """``max_new_tokens`` as an ``int`` >= 0 with ``prompt_length + max_new_tokens`` within ``context``."""
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise InputError(
            f"max_new_tokens must be a non-negative integer, got {_describe(max_new_tokens)}", field="max_new_tokens"
        )
    total = prompt_length + int(max_new_tokens)
    if total > context.length:
        raise InputError(
            f"a prompt of {prompt_length} tokens + max_new_tokens {max_new_tokens} = {total} positions, more than "
            f"{context}",
            field="max_new_tokens",
        )
    return int(max_new_tokens)


def _finite_real(value, name: str) -> float:
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, jax.core.Tracer):
        if value.shape == () and value.dtype.kind in "iuf":
            value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {_describe(value)}", field=name)
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise InputError(f"{name} must be finite, got {_describe(value)}", field=name)
    return result


def check_sampling(temperature, top_p) -> tuple[float, float]:
    """``(temperature, top_p)`` as floats: temperature 0 (greedy) or a positive normal float32 (its reciprocal
    scales the logits in float32), top_p in ``(0, 1]``; NaN, infinities, bools and strings are refused."""
    temperature, top_p = _finite_real(temperature, "temperature"), _finite_real(top_p, "top_p")
    if temperature != 0 and not _FLOAT32_TINY <= temperature <= _FLOAT32_MAX:
        raise InputError(
            f"temperature must be 0 (greedy) or in [{_FLOAT32_TINY:.3g}, {_FLOAT32_MAX:.3g}] (sampling), "
            f"got {temperature!r}",
            field="temperature",
        )
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}", field="top_p")
    return temperature, top_p


def check_key(key, *, needed: bool):
    """One PRNG key: a typed key of shape ``()`` (``jax.random.key(seed)``) or a legacy uint32 ``[2]``
    (``jax.random.PRNGKey(seed)``, returned wrapped as the typed key of the same bits, so that both kinds run
    the same compiled steps); None only when not ``needed``."""
    if key is None:
        if needed:
            raise InputError("sampling (temperature > 0) needs an explicit PRNG key: key=jax.random.key(seed)")
        return None
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise InputError(f"key must be a jax PRNG key (jax.random.key(seed)), got {_describe(key)}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if key.dtype == np.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(key))
    raise InputError(
        "key must be one PRNG key: jax.random.key(seed) (a typed key of shape ()) or jax.random.PRNGKey(seed) "
        f"(uint32 [2]), got {key.dtype} {tuple(key.shape)}"
    )


def check_eos(eos_token_id, config, *, name: str = "eos_token_id") -> np.ndarray:
    """int32 ``[n]`` stop tokens: ``eos_token_id`` (a token id or a list of them, each in ``[0, vocab)``;
    ``[]``: none), or the config's when None (checked in range when the config was read). ``name``: the
    argument's name in messages."""
    vocab = config.vocab_size
    if eos_token_id is None:
        return np.asarray(config.eos_token_ids, np.int32)
    if is_int(eos_token_id):
        values = [eos_token_id]
    elif isinstance(eos_token_id, (list, tuple)) or (isinstance(eos_token_id, np.ndarray) and eos_token_id.ndim == 1):
        values = list(eos_token_id)
    else:
        raise InputError(f"{name} must be a token id or a list of token ids, got {_describe(eos_token_id)}", field=name)
    for value in values:
        if not is_int(value) or not 0 <= value < vocab:
            raise InputError(f"{name} must be token ids in [0, {vocab}), found {_describe(value)}", field=name)
    return np.asarray(values, np.int32)


def check_seed(seed) -> int:
    """A PRNG seed ``jax.random.key`` takes: an integer in int64's range."""
    if not is_int(seed) or not _INT64.min <= seed <= _INT64.max:
        raise InputError(f"seed must be an integer in [-2**63, 2**63 - 1], got {_describe(seed)}", field="seed")
    return int(seed)


def cache_bytes(config, batch: int, length: int, dtype) -> int:
    """Bytes of :meth:`~quarkmoe_jax.models.QuarkMoEForCausalLM.init_cache` ``(batch, length, dtype)``: per
    layer and position, keys and values ``2 * num_kv_heads * head_dim`` (latent attention: the latent and the
    rotary key, ``kv_lora_rank + qk_rope_head_dim``) values of ``dtype``."""
    if config.mla is not None:
        per_position = config.mla.kv_lora_rank + config.mla.qk_rope_head_dim
    else:
        per_position = 2 * config.num_kv_heads * config.head_dim
    return batch * length * config.num_layers * per_position * jnp.dtype(dtype).itemsize


class DeviceMemory(NamedTuple):
    """The default device's memory in bytes: ``total`` (an accelerator's allocator limit, else the host's
    physical memory), ``in_use`` (an accelerator's allocated bytes; None on the host), ``accelerator``."""

    total: int
    in_use: int | None
    accelerator: bool


def device_memory() -> DeviceMemory | None:
    """:class:`DeviceMemory` of the default device (None where nothing is known)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except (RuntimeError, NotImplementedError):
        stats = None
    if stats and stats.get("bytes_limit"):
        return DeviceMemory(int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)), True)
    try:
        return DeviceMemory(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None, False)
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_size(config, batch: int, length: int, dtype) -> None:
    """Refuse a KV cache of ``batch`` sequences of ``length`` positions that would not fit the device's memory."""
    needed, memory = cache_bytes(config, batch, length, dtype), device_memory()
    available = None if memory is None else memory.total
    if available is not None and needed > available:
        raise InputError(
            f"a KV cache of {batch} x {length} positions takes {needed / 2**30:.3g} GiB, more than the "
            f"{available / 2**30:.3g} GiB of memory of {jax.devices()[0].platform}"
        )


def check_cache(
    cache, batch: int, num_layers: int, expected: Callable[[int, int, Any], list[dict[str, jax.ShapeDtypeStruct]]]
) -> int:
    """The length S of ``cache``, which must be what ``init_cache(batch, S, dtype)`` returns: ``num_layers``
    dicts with its keys, shapes and float dtype (``expected(batch, S, dtype)``: their shapes and dtypes)."""
    usage = f"model.init_cache({batch}, length) for input_ids of {batch} sequences"
    if not isinstance(cache, (list, tuple)) or len(cache) != num_layers:
        size = f" of {len(cache)}" if isinstance(cache, (list, tuple)) else ""
        raise InputError(f"cache must be {usage}: a list of {num_layers} dicts, got {type(cache).__name__}{size}")
    first = cache[0]
    leaf = next(iter(first.values()), None) if isinstance(first, dict) else None
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype") and len(leaf.shape) >= 2) or not jnp.issubdtype(
        leaf.dtype, jnp.floating
    ):
        raise InputError(f"cache must be {usage}: cache[0] is not a dict of float arrays [B, S, ...]")
    length, dtype = leaf.shape[1], leaf.dtype
    for layer, (entry, want) in enumerate(zip(cache, expected(batch, length, dtype), strict=True)):
        if not isinstance(entry, dict) or set(entry) != set(want):
            found = sorted(entry, key=str) if isinstance(entry, dict) else type(entry).__name__
            raise InputError(f"cache must be {usage}: cache[{layer}] must have keys {sorted(want)}, got {found}")
        for name, spec in want.items():
            found = entry[name]
            shape, found_dtype = tuple(getattr(found, "shape", ())), getattr(found, "dtype", type(found).__name__)
            if shape != spec.shape or found_dtype != spec.dtype:
                raise InputError(
                    f"cache must be {usage}: cache[{layer}][{name!r}] is {found_dtype} {shape}, expected "
                    f"{spec.dtype} {spec.shape}"
                )
    return length


def check_start(start, num_tokens: int, cache_length: int, context: Context) -> None:
    """``start``: an integer scalar with ``0 <= start`` and ``start + num_tokens`` within the cache and the
    context. A traced ``start`` (inside ``jit``) is checked for type only: its value is not known."""
    if hasattr(start, "shape") and hasattr(start, "dtype"):
        if start.shape != () or not jnp.issubdtype(start.dtype, jnp.integer):
            raise InputError(f"start must be an integer scalar, got {start.dtype} {tuple(start.shape)}")
        if isinstance(start, jax.core.Tracer):
            return
        start = int(start)
    elif not is_int(start):
        raise InputError(f"start must be an integer (the position of input_ids[:, 0]), got {_describe(start)}")
    if start < 0:
        raise InputError(f"start must be >= 0, got {start}")
    end = start + num_tokens
    if end > cache_length:
        raise InputError(f"start {start} + {num_tokens} tokens = {end} positions, more than the cache's {cache_length}")
    if end > context.length:
        raise InputError(f"start {start} + {num_tokens} tokens = {end} positions, more than {context}")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """:meth:`~quarkmoe_jax.models.QuarkMoEForCausalLM.generate`'s arguments, checked.

    ``input_ids``: host int32 ``[B, T]``; ``eos_token_ids``: int32 ``[n]``; ``key``: None when greedy and none
    was given; ``prompt_bucket``: T's token bucket; ``cache_length``: the KV cache's positions,
    ``token_bucket(max(prompt_bucket, T + max_new_tokens))`` (checked to fit the device's memory).
    """

    input_ids: np.ndarray
    max_new_tokens: int
    temperature: float
    top_p: float
    key: jax.Array | None
    eos_token_ids: np.ndarray
    prompt_bucket: int
    cache_length: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_generation(
    config,
    input_ids,
    max_new_tokens,
    *,
    temperature=0.0,
    top_p=1.0,
    key=None,
    eos_token_id=None,
    max_model_len: int | None = None,
    dtype=None,
) -> GenerationRequest:
    """Every check of a generation (arguments as :meth:`QuarkMoEForCausalLM.generate` takes them) against
    :class:`~quarkmoe_jax.models.DecoderConfig` ``config``, before anything is allocated. ``dtype``: the KV
    cache's (default the config's)."""
    context = context_of(config, max_model_len)
    if isinstance(input_ids, jax.core.Tracer):
        raise InputError("generate runs outside jax.jit (it compiles its own steps): pass input_ids as host data")
    ids = check_input_ids(input_ids, config.vocab_size, context)
    batch, prompt_length = ids.shape
    new_tokens = check_max_new_tokens(max_new_tokens, prompt_length, context)
    temperature, top_p = check_sampling(temperature, top_p)
    key = check_key(key, needed=temperature > 0)
    eos = check_eos(eos_token_id, config)
    bucket = token_bucket(prompt_length)
    length = token_bucket(max(bucket, prompt_length + new_tokens))
    if new_tokens:
        check_cache_size(config, batch, length, config.dtype if dtype is None else dtype)
    return GenerationRequest(ids, new_tokens, temperature, top_p, key, eos, bucket, length)
