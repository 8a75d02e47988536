"""The MoE experts op split over a ``jax.sharding.Mesh``: expert, tensor and data parallelism (docs/distributed.md).

:class:`~quarkmoe_jax.moe.sharding.MoESharding` (:mod:`quarkmoe_jax.moe.sharding`, with the placements and
the exchange's byte model) says how a layer is split; :func:`sharded_moe_experts` runs any backend's forward
on every shard inside ``shard_map``, behind the op's entry (:func:`quarkmoe_jax.moe.buckets.bucketed`: input
checks, token buckets). The parameter layout is in :mod:`quarkmoe_jax.moe.shard_layout`; per-shard loading
from a checkpoint in :mod:`quarkmoe_jax.checkpoint.sharded_loading`.

* **Expert parallelism (EP)**: the experts are split over the mesh's ``expert`` axis, with vLLM's linear or
  round-robin placement (:func:`~quarkmoe_jax.moe.sharding.placement_expert_map`); a shard holds
  ``ceil(E / ep)`` expert slots (the last slot of a shard with fewer experts is an unused zero expert).
* **Tensor parallelism (TP)**: the intermediate dimension ``I`` is split over the ``tensor`` axis in
  32-aligned slices (whole MX scale blocks; ``I`` is padded with zero channels up to ``tp`` slices): each
  shard holds its ``[gate; up]`` rows of w13 (vLLM's narrowing) and the matching columns of w2; GEMM2's
  partial sums are added across the axis.
* **Data parallelism**: the tokens are split over the ``data`` axes; each data group holds every expert.

Each shard runs the same backend (``emulation``, ``pallas``, ``triton`` or ``auto``) on its local experts
inside ``shard_map``. Tokens enter and leave split over ``(data..., expert)``. Two exchanges:

* ``"all_gather"``: an EP shard gathers its data group's tokens, runs its experts on every pair routed to
  them (other pairs contribute zero), and a reduce-scatter sums the partial outputs back onto the tokens'
  shards. Moves ``(ep - 1) / ep`` of the group's tokens in and out, whatever the routing.
* ``"all_to_all"``: each shard sends a token only to the EP shards owning one of its experts, in buffers of
  ``capacity`` tokens per destination, and gets the partial outputs back the same way. Fewer bytes when the
  routing is spread (a token reaches ``1 - (1 - 1/ep)^k`` of the shards on average); if any buffer would
  overflow, that call runs the all-gather exchange instead (one flag reduced over the mesh), so no token is
  ever dropped.

Same result as one device: dynamic activation scales are reduced across the shards that split what a
scale covers (:class:`~quarkmoe_jax.moe.shard_axes.ShardAxes`), static input scales are the maximum over
all experts (vLLM takes it over each EP rank's local experts only), the w2 bias is added once (on tensor
rank 0), and partial outputs are added in float32 before the single rounding to the activation dtype.
EP keeps the per-pair rounding of the single-device forward (bit-identical in practice); TP adds unrounded
partial pair outputs (within float32 summation order of the single-device result, before its final
rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.contracts import MoEQuantConfig, MoEShape
from quarkmoe_jax.formats.kernel_layout import one_part
from quarkmoe_jax.formats.mx import round_up
from quarkmoe_jax.moe import op
from quarkmoe_jax.moe.buckets import bucketed
from quarkmoe_jax.moe.shard_layout import param_specs
from quarkmoe_jax.moe.sharding import MoESharding

__all__ = ["sharded_moe_experts"]


# ------------------------------------------------------------------------------------------- the forward


def sharded_moe_experts(
    x,
    topk_weights,
    topk_ids,
    params: dict[str, Any],
    quant_config: MoEQuantConfig,
    shape: MoEShape,
    sharding: MoESharding,
    *,
    activation: str = "silu",
    swiglu_limit: float | None = None,
    apply_router_weight_on_input: bool = False,
    valid_tokens=None,
    backend: str = "auto",
):
    """The MoE experts forward over ``sharding``'s mesh.

    Args:
      x: ``[T, H]`` float32 / bfloat16 / float16 hidden states (any sharding; split over the token axes
        inside).
      topk_weights: ``[T, k]`` float32 router weights; topk_ids: ``[T, k]`` int32 global expert ids.
      params: the sharded layout (:func:`~quarkmoe_jax.moe.shard_layout.shard_params` or the per-shard
        loader).
      quant_config, shape: the layer's scheme and **global** logical sizes.
      sharding: the :class:`MoESharding`.
      valid_tokens: optional ``[T]`` bool; False rows are padding (they contribute nothing and enter no
        dynamic scale).
      backend: what every shard runs ("auto", "emulation", "pallas", "triton").

    Returns:
      ``[T, H]`` in ``x``'s dtype, split over the token axes.
    """
    return _sharded_entry(
        x,
        topk_weights,
        topk_ids,
        valid_tokens,
        params,
        num_experts=shape.num_experts,
        quant_config=quant_config,
        shape=shape,
        sharding=sharding,
        activation=activation,
        swiglu_limit=swiglu_limit,
        apply_router_weight_on_input=apply_router_weight_on_input,
        backend=backend,
    )


def _sharded_core(x, topk_weights, topk_ids, valid_tokens, params, *, sharding: MoESharding, **kwargs):
    """Pads the tokens to a multiple of the token shards (and tensor shards) as padding rows, runs
    :func:`_shard_mapped`, and drops the padding again."""
    t = x.shape[0]
    multiple = sharding.token_shards * sharding.tp
    pad = round_up(t, multiple) - t

    def rows(a):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))

    out = _shard_mapped(
        rows(x), rows(topk_weights), rows(topk_ids), rows(valid_tokens), params, sharding=sharding, **kwargs
    )
    return out[:t]


def _keep_rows(out, t: int):
    """The first ``t`` rows of an eager call's output, still split over the token axes (``host_rows`` would
    gather them onto one device)."""
    return out[:t]


_sharded_entry = bucketed(
    _sharded_core,
    (
        "quant_config",
        "shape",
        "sharding",
        "activation",
        "swiglu_limit",
        "apply_router_weight_on_input",
        "backend",
    ),
    trim=_keep_rows,
)


def _shard_mapped(x, topk_weights, topk_ids, valid, params, *, quant_config, shape, sharding, backend, **kwargs):
    """The forward on token counts that split evenly: every shard's experts inside ``shard_map``, with the
    all-gather or the all-to-all exchange (module docstring)."""
    s = sharding
    specs = param_specs(params, s)
    tokens = P(s.token_axes or None)
    local_shape = dataclasses.replace(shape, num_experts=params["w13"].shape[0] // s.ep)
    maps = s.expert_maps(shape.num_experts)
    expert_maps = jnp.asarray(maps)
    owners = jnp.asarray(np.argmax(maps >= 0, axis=0).astype(np.int32))  # EP shard of each global expert
    axes = s.shard_axes()

    def run_experts(x_l, w_l, ids_l, valid_l, params_l):
        """This shard's experts on the given rows: float32 partial outputs ``[rows, H]``."""
        ep_rank = lax.axis_index(s.expert_axis) if s.ep > 1 else 0
        params_l = {name: one_part(value) for name, value in params_l.items()}  # a w2 chunked per shard
        if s.tp > 1 and params_l.get("w2_bias") is not None:
            keep = (lax.axis_index(s.tensor_axis) == 0).astype(jnp.float32)
            params_l = {**params_l, "w2_bias": params_l["w2_bias"] * keep}
        partial = op.moe_experts(
            x_l,
            w_l,
            ids_l,
            params_l,
            quant_config,
            local_shape,
            expert_map=expert_maps[ep_rank],
            num_global_experts=shape.num_experts,
            valid_tokens=valid_l,
            shard_axes=axes,
            pair_dtype=jnp.float32 if s.tp > 1 else None,
            out_dtype=jnp.float32,
            backend=backend,
            **kwargs,
        )
        return partial

    def gather_exchange(x_l, w_l, ids_l, valid_l, params_l):
        if s.ep > 1:
            gathered = [lax.all_gather(a, s.expert_axis, axis=0, tiled=True) for a in (x_l, w_l, ids_l, valid_l)]
        else:
            gathered = [x_l, w_l, ids_l, valid_l]
        partial = run_experts(*gathered, params_l)
        if s.ep > 1 and s.tp > 1:
            out = lax.psum_scatter(partial, (s.expert_axis, s.tensor_axis), scatter_dimension=0, tiled=True)
            return lax.all_gather(out, s.tensor_axis, axis=0, tiled=True)
        if s.ep > 1:
            return lax.psum_scatter(partial, s.expert_axis, scatter_dimension=0, tiled=True)
        return lax.psum(partial, s.tensor_axis) if s.tp > 1 else partial

    ranks = jnp.arange(s.ep, dtype=jnp.int32)

    def destinations(ids_l, valid_l):
        """``[ep, T]`` bool: token t has an expert on EP shard r."""
        return (owners[ids_l][None, :, :] == ranks[:, None, None]).any(axis=2) & valid_l[None, :]

    def all_to_all_exchange(x_l, w_l, ids_l, valid_l, params_l, capacity):
        wanted = destinations(ids_l, valid_l)
        slot = jnp.cumsum(wanted, axis=1, dtype=jnp.int32) - 1
        sent = wanted & (slot < capacity)
        target = jnp.where(sent, slot, capacity)  # capacity: out of range, dropped by the scatter

        def send(a, fill):
            buffer = jnp.full((s.ep, capacity, *a.shape[1:]), fill, a.dtype)
            buffer = buffer.at[ranks[:, None], target].set(jnp.broadcast_to(a, (s.ep, *a.shape)), mode="drop")
            flat = buffer.reshape(s.ep * capacity, *a.shape[1:])
            return lax.all_to_all(flat, s.expert_axis, 0, 0, tiled=True)

        partial = run_experts(send(x_l, 0), send(w_l, 0), send(ids_l, 0), send(valid_l, False), params_l)
        if s.tp > 1:
            partial = lax.psum(partial, s.tensor_axis)
        back = lax.all_to_all(partial, s.expert_axis, 0, 0, tiled=True).reshape(s.ep, capacity, -1)
        picked = back[ranks[:, None], jnp.minimum(slot, capacity - 1)]  # [ep, T, H]
        return jnp.where(sent[:, :, None], picked, 0.0).sum(axis=0)

    def local(x_l, w_l, ids_l, valid_l, params_l):
        args = (x_l, w_l, ids_l, valid_l, params_l)
        if s.chosen_exchange(x_l.shape[0], ids_l.shape[1]) == "all_gather":
            out = gather_exchange(*args)
        else:
            capacity = s.capacity(x_l.shape[0], ids_l.shape[1])
            if capacity >= x_l.shape[0]:
                out = all_to_all_exchange(*args, capacity)
            else:
                overflow = (destinations(ids_l, valid_l).sum(axis=1) > capacity).any().astype(jnp.int32)
                overflow = lax.pmax(overflow, tuple(s.mesh.axis_names))
                out = lax.cond(
                    overflow > 0,
                    lambda a: gather_exchange(*a),
                    lambda a: all_to_all_exchange(*a, capacity),
                    args,
                )
        return out.astype(x_l.dtype)

    run = jax.shard_map(
        local,
        mesh=s.mesh,
        in_specs=(tokens, tokens, tokens, tokens, specs),
        out_specs=tokens,
        check_vma=False,
    )
    return run(x, topk_weights, topk_ids, valid, params)
