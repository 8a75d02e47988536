"""The op's entry, shared by every backend: input checks and token bucketing around a forward core.

:func:`bucketed_backend` turns a forward core (a function of the padded arrays, like the oracle's
:func:`quarkmoe_jax.moe.emulation.moe_experts_unpadded`) into a backend entry point: it validates the inputs
(:func:`validate_moe_inputs`), pads the token count to a bucket (:data:`TOKEN_BUCKETS`) on the host and calls
the core under ``jit``, compiled once per bucket; inside an outer ``jit`` it calls the core directly.
:func:`bucketed` is the shared part, also around the sharded forward (:mod:`quarkmoe_jax.moe.sharded`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.contracts import MoEQuantConfig, MoEShape
from quarkmoe_jax.formats.mx import round_up
from quarkmoe_jax.moe.shard_axes import ShardAxes

__all__ = [
    "TOKEN_BUCKETS",
    "token_bucket",
    "host_rows",
    "validate_moe_inputs",
    "check_weights",
    "bucketed",
    "bucketed_backend",
]

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
"""Token counts the jitted forward compiles for; larger counts round up to a multiple of 8192."""


def host_rows(array, rows: int):
    """``array``'s first ``rows`` rows, zero-padded to ``rows``, as a device array made through host memory:
    a device op on each new token count would compile an XLA program for it (eager calls only)."""
    host = np.asarray(array)
    if host.shape[0] >= rows:
        return jax.device_put(host[:rows])
    return jax.device_put(np.pad(host, [(0, rows - host.shape[0])] + [(0, 0)] * (host.ndim - 1)))


def token_bucket(num_tokens: int) -> int:
    for bucket in TOKEN_BUCKETS:
        if num_tokens <= bucket:
            return bucket
    return round_up(num_tokens, TOKEN_BUCKETS[-1])


def validate_moe_inputs(x, topk_weights, topk_ids, hidden_size: int, num_experts: int, apply_on_input: bool) -> None:
    """Clear errors for bad forward inputs (shapes and dtypes are static, so this also works under jit)."""
    if x.ndim != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"x must be [T, {hidden_size}], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array (float32 / bfloat16 / float16), got {x.dtype}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T={x.shape[0]}, k], got shape {tuple(topk_ids.shape)}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise TypeError(f"topk_ids must be integers, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")
    if apply_on_input and topk_ids.shape[1] != 1:
        raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got k = {topk_ids.shape[1]}")
    if not isinstance(topk_ids, jax.core.Tracer):
        ids = np.asarray(topk_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
            raise ValueError(f"topk_ids must be in [0, {num_experts}), found values in [{ids.min()}, {ids.max()}]")


def check_weights(params, quant_config: MoEQuantConfig) -> None:
    """Refuse expert weights whose :class:`~quarkmoe_jax.formats.QType` disagrees with ``quant_config.weight``
    (:meth:`~quarkmoe_jax.contracts.WeightQuant.check_data`); other values are left to the backend's checks."""
    for name in ("w13", "w2"):
        qtype = getattr(params.get(name), "qtype", None)
        if qtype is not None:
            quant_config.weight.check_data(qtype, name)


def bucketed(core: Callable, static_argnames: tuple[str, ...], trim: Callable = host_rows) -> Callable:
    """The part of an entry point every forward shares: input checks and token buckets around ``core``.

    ``core(x, topk_weights, topk_ids, valid_tokens, params, **kwargs)`` computes on padded arrays; its
    keyword arguments include ``shape`` (a :class:`MoEShape`) and ``apply_router_weight_on_input``, and
    may include ``out_dtype``; ``static_argnames`` names those of them that are static under ``jit``.
    Returns ``call(x, topk_weights, topk_ids, valid_tokens, params, *, num_experts, **kwargs)``: it validates
    the inputs (``topk_ids`` in ``[0, num_experts)``), marks every row valid where ``valid_tokens`` is None,
    and calls ``core``: directly inside an outer ``jit``, else under ``jit`` on the rows padded (on the host)
    to :func:`token_bucket`, compiled once per bucket; ``trim(out, T)`` then keeps the first ``T`` rows
    (default :func:`host_rows`: no device op per token count). ``call.cache_size()``: compiled variants.
    """

    @functools.partial(jax.jit, static_argnames=static_argnames)
    def jitted(x, topk_weights, topk_ids, valid_tokens, params, **kwargs):
        return core(x, topk_weights, topk_ids, valid_tokens, params, **kwargs)

    def call(x, topk_weights, topk_ids, valid_tokens, params, *, num_experts: int, **kwargs):
        traced = any(isinstance(v, jax.core.Tracer) for v in (x, topk_weights, topk_ids, valid_tokens))
        if traced:
            x, topk_weights, topk_ids = jnp.asarray(x), jnp.asarray(topk_weights, jnp.float32), jnp.asarray(topk_ids)
        else:  # host copies: device ops on each new T would compile a program per token count
            x, topk_weights, topk_ids = np.asarray(x), np.asarray(topk_weights, np.float32), np.asarray(topk_ids)
        shape = kwargs["shape"]
        apply_on_input = kwargs["apply_router_weight_on_input"]
        validate_moe_inputs(x, topk_weights, topk_ids, shape.hidden_size, num_experts, apply_on_input)
        t = x.shape[0]
        if t == 0:
            return jnp.zeros((0, shape.hidden_size), kwargs.get("out_dtype") or x.dtype)
        if traced:
            valid = jnp.ones((t,), bool) if valid_tokens is None else jnp.asarray(valid_tokens, bool)
        else:
            valid = np.ones((t,), bool) if valid_tokens is None else np.asarray(valid_tokens, bool)
        if valid.shape != (t,):
            raise ValueError(f"valid_tokens must be [T={t}] bool, got shape {tuple(valid.shape)}")
        if traced:
            return core(x, topk_weights, topk_ids.astype(jnp.int32), valid, params, **kwargs)
        bucket = token_bucket(t)
        out = jitted(
            host_rows(x, bucket),
            host_rows(topk_weights, bucket),
            host_rows(topk_ids.astype(np.int32), bucket),
            host_rows(valid, bucket),
            params,
            **kwargs,
        )
        return out if bucket == t else trim(out, t)

    call.cache_size = jitted._cache_size
    return call


def bucketed_backend(core: Callable) -> Callable:
    """Wrap a forward core with :func:`moe_experts_unpadded`'s signature into a backend entry point.

    The entry point validates the inputs, pads T to :func:`token_bucket` and calls the core under ``jit``
    (compiled once per bucket, scheme and shape); inside an outer ``jit`` it calls the core directly
    (:func:`bucketed`).
    """
    static = (
        "quant_config",
        "shape",
        "activation",
        "swiglu_limit",
        "apply_router_weight_on_input",
        "shard_axes",
        "pair_dtype",
        "out_dtype",
    )
    call = bucketed(core, static)

    def entry(
        x,
        topk_weights,
        topk_ids,
        params: dict[str, Any],
        quant_config: MoEQuantConfig,
        shape: MoEShape,
        *,
        activation: str = "silu",
        swiglu_limit: float | None = None,
        expert_map=None,
        num_global_experts: int | None = None,
        apply_router_weight_on_input: bool = False,
        valid_tokens=None,
        shard_axes: ShardAxes | None = None,
        pair_dtype=None,
        out_dtype=None,
    ):
        check_weights(params, quant_config)
        if expert_map is not None and not isinstance(expert_map, jax.core.Tracer):
            expert_map = jax.device_put(np.asarray(expert_map, np.int32))
        return call(
            x,
            topk_weights,
            topk_ids,
            valid_tokens,
            params,
            num_experts=num_global_experts or shape.num_experts,
            expert_map=expert_map,
            quant_config=quant_config,
            shape=shape,
            activation=activation,
            swiglu_limit=swiglu_limit,
            apply_router_weight_on_input=apply_router_weight_on_input,
            shard_axes=shard_axes,
            pair_dtype=None if pair_dtype is None else jnp.dtype(pair_dtype),
            out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
        )

    entry.cache_size = call.cache_size  # compiled variants, for tests of the bucketing
    entry.__doc__ = (
        "MoE experts: ``x [T, H]``, ``topk_weights [T, k]`` fp32, ``topk_ids [T, k]`` (global ids) -> ``[T, H]`` "
        "in ``x``'s dtype. ``valid_tokens [T]`` bool (optional) marks padding rows: they contribute nothing and "
        "enter no dynamic scale. ``shard_axes`` / ``pair_dtype`` / ``out_dtype``: the sharded forward's options "
        "(:func:`combine_pairs`). " + (core.__doc__ or "")
    )
    return entry
