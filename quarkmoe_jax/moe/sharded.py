"""The MoE experts op split over a ``jax.sharding.Mesh``: expert, tensor and data parallelism (docs/distributed.md).

:class:`MoESharding` says how a layer is split; :func:`sharded_moe_experts` runs any backend's forward on
every shard inside ``shard_map``, behind the op's entry (:func:`quarkmoe_jax.moe.entry.bucketed`: input
checks, token buckets); :func:`exchange_bytes` models what it sends. The parameter layout is in
:mod:`quarkmoe_jax.moe.shard_layout`; per-shard loading from a checkpoint in
:mod:`quarkmoe_jax.checkpoint.sharded_loading`.

* **Expert parallelism (EP)**: the experts are split over the mesh's ``expert`` axis, with vLLM's linear or
  round-robin placement (:func:`placement_expert_map`); a shard holds ``ceil(E / ep)`` expert slots
  (the last slot of a shard with fewer experts is an unused zero expert).
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
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.contracts import MoEQuantConfig, MoEShape
from quarkmoe_jax.formats.kernel_layout import one_part
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE, round_up
from quarkmoe_jax.moe import op
from quarkmoe_jax.moe.entry import bucketed
from quarkmoe_jax.moe.shard_axes import ShardAxes
from quarkmoe_jax.moe.shard_layout import param_specs

__all__ = [
    "MoESharding",
    "moe_mesh",
    "PLACEMENTS",
    "EXCHANGES",
    "placement_expert_map",
    "sharded_moe_experts",
    "exchange_bytes",
]

PLACEMENTS = ("linear", "round_robin")
EXCHANGES = ("auto", "all_gather", "all_to_all")
TP_ALIGN = MX_BLOCK_SIZE


def placement_expert_map(placement: str, num_experts: int, ep_size: int, ep_rank: int) -> np.ndarray:
    """``[E]`` int32: global expert -> local slot on EP rank ``ep_rank``, -1 elsewhere, for vLLM's placements:
    "linear" (contiguous ranges, the first ``E % ep`` ranks one extra) or "round_robin" (rank ``r`` holds
    ``r, r + ep, r + 2 ep, ...``)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    experts = np.arange(num_experts)
    local = np.array_split(experts, ep_size)[ep_rank] if placement == "linear" else experts[ep_rank::ep_size]
    expert_map = np.full(num_experts, -1, np.int32)
    expert_map[local] = np.arange(local.size, dtype=np.int32)
    return expert_map


def moe_mesh(*, data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, expert, tensor)`` mesh over the first ``data * expert * tensor`` devices.

    Tensor-parallel neighbours are adjacent devices (on one host: the closest NVLink peers)."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * expert * tensor
    if min(data, expert, tensor) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, expert={expert}, tensor={tensor}")
    if need > len(devices):
        raise ValueError(f"a {data}x{expert}x{tensor} mesh needs {need} devices, found {len(devices)}")
    return Mesh(np.array(devices[:need]).reshape(data, expert, tensor), ("data", "expert", "tensor"))


@dataclasses.dataclass(frozen=True)
class MoESharding:
    """How one MoE layer is split over a mesh (static; hashable).

    Attributes:
      mesh: the device mesh (axes of type Auto, as :func:`moe_mesh` makes).
      data_axes: mesh axes splitting the tokens between data-parallel groups (absent axes are skipped).
      expert_axis: the mesh axis splitting the experts, or None (also when the mesh has no "expert" axis).
      tensor_axis: the mesh axis splitting the intermediate dimension, or None (also when the mesh has no
        "tensor" axis).
      placement: "linear" (contiguous ranges, the first ``E % ep`` shards one extra) or "round_robin".
      exchange: "all_gather", "all_to_all" (module docstring) or "auto": all-to-all where it sends fewer
        bytes (no tensor parallelism and a capacity below the shard's token count), else all-gather
        (measured choice: docs/distributed.md).
      capacity_factor: all-to-all buffer size per destination, relative to the tokens a shard is expected to
        send there; None = room for all of the shard's tokens (never falls back, no saving).
    """

    mesh: Mesh
    data_axes: tuple[str, ...] = ("data",)
    expert_axis: str | None = "expert"
    tensor_axis: str | None = "tensor"
    placement: str = "linear"
    exchange: str = "auto"
    capacity_factor: float | None = 1.5

    def __post_init__(self):
        names = self.mesh.axis_names
        object.__setattr__(self, "data_axes", tuple(a for a in self.data_axes if a in names))
        for field, default in (("expert_axis", "expert"), ("tensor_axis", "tensor")):
            axis = getattr(self, field)
            if axis == default and axis not in names:  # a mesh without that axis: no such parallelism
                object.__setattr__(self, field, None)
            elif axis is not None and axis not in names:
                raise ValueError(f"MoESharding.{field}={axis!r} is not an axis of the mesh {names}")
        used = [*self.data_axes, self.expert_axis, self.tensor_axis]
        used = [a for a in used if a is not None]
        if len(set(used)) != len(used):
            raise ValueError(f"MoESharding uses a mesh axis twice: {used}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; expected one of {PLACEMENTS}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {self.exchange!r}; expected one of {EXCHANGES}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        explicit = [a for a, t in zip(names, self.mesh.axis_types, strict=True) if "Explicit" in str(t)]
        if explicit:
            raise ValueError(f"MoESharding needs mesh axes of type Auto; {explicit} are Explicit (use moe_mesh)")

    def _size(self, axis) -> int:
        return 1 if axis is None else self.mesh.shape[axis]

    @property
    def ep(self) -> int:
        return self._size(self.expert_axis)

    @property
    def tp(self) -> int:
        return self._size(self.tensor_axis)

    @property
    def dp(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.data_axes)

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Mesh axes the tokens are split over on entry and exit."""
        return self.data_axes + ((self.expert_axis,) if self.expert_axis else ())

    @property
    def token_shards(self) -> int:
        return self.dp * self.ep

    def shard_axes(self) -> ShardAxes:
        return ShardAxes(
            data=self.data_axes,
            expert=(self.expert_axis,) if self.ep > 1 else (),
            tensor=(self.tensor_axis,) if self.tp > 1 else (),
        )

    def for_shared_experts(self) -> MoESharding:
        """The sharding of a dense (shared) expert: tensor-parallel, the expert axis acting as data."""
        return dataclasses.replace(self, data_axes=self.token_axes, expert_axis=None, exchange="all_gather")

    # -- placement and sizes ------------------------------------------------------------------------

    def experts_per_shard(self, num_experts: int) -> int:
        return -(-num_experts // self.ep)

    def expert_slots(self, num_experts: int) -> int:
        """Expert slots of the sharded arrays: ``ep`` shards of ``ceil(E / ep)``."""
        return self.ep * self.experts_per_shard(num_experts)

    def expert_map(self, num_experts: int, ep_rank: int) -> np.ndarray:
        """``[E]`` int32: global expert -> local slot on EP shard ``ep_rank``, -1 elsewhere (vLLM's map)."""
        if self.ep == 1:
            return np.arange(num_experts, dtype=np.int32)
        return placement_expert_map(self.placement, num_experts, self.ep, ep_rank)

    def expert_maps(self, num_experts: int) -> np.ndarray:
        """``[ep, E]`` int32: every EP shard's expert map."""
        return np.stack([self.expert_map(num_experts, r) for r in range(self.ep)])

    def slot_order(self, num_experts: int) -> np.ndarray:
        """``[ep * E_local]`` global expert in each slot of the sharded arrays (shard-major); ``num_experts``
        marks an unused slot."""
        per = self.experts_per_shard(num_experts)
        order = np.full(self.expert_slots(num_experts), num_experts, np.int64)
        for rank, expert_map in enumerate(self.expert_maps(num_experts)):
            for g in np.flatnonzero(expert_map >= 0):
                order[rank * per + expert_map[g]] = g
        return order

    def intermediate_per_shard(self, intermediate_size: int) -> int:
        """Channels of ``I`` per tensor shard: ``ceil(I / tp)`` rounded up to 32 (one shard: ``I``)."""
        if self.tp == 1:
            return intermediate_size
        return round_up(-(-intermediate_size // self.tp), TP_ALIGN)

    def local_shape(self, shape: MoEShape) -> MoEShape:
        """One shard's experts: ``E_local`` slots and ``I`` per shard (a scheme's own padding of ``I`` to
        32 does not change the per-shard size)."""
        return dataclasses.replace(
            shape,
            num_experts=self.experts_per_shard(shape.num_experts),
            intermediate_size=self.intermediate_per_shard(shape.intermediate_size),
        )

    def chosen_exchange(self, tokens_per_shard: int, top_k: int) -> str:
        """The exchange a call with this many tokens per shard runs ("auto" resolved)."""
        if self.ep == 1:
            return "all_gather"  # nothing to exchange: each shard holds every expert
        if self.exchange != "auto":
            return self.exchange
        if self.tp == 1 and self.capacity(tokens_per_shard, top_k) < tokens_per_shard:
            return "all_to_all"
        return "all_gather"

    def capacity(self, tokens_per_shard: int, top_k: int) -> int:
        """All-to-all buffer rows per destination shard."""
        if self.capacity_factor is None or self.ep == 1:
            return tokens_per_shard
        reach = 1.0 - (1.0 - 1.0 / self.ep) ** top_k
        rows = math.ceil(self.capacity_factor * tokens_per_shard * reach)
        return max(1, min(tokens_per_shard, -(-rows // 8) * 8))


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


def exchange_bytes(
    num_tokens: int, hidden_size: int, top_k: int, sharding: MoESharding, dtype_bytes: int = 2
) -> dict[str, dict[str, float]]:
    """Bytes one device sends per forward, by exchange: ``{"all_gather" | "all_to_all": {"dispatch",
    "combine", "total"}}`` (a model for the benchmark's table, not a measurement).

    Dispatch sends hidden states (``dtype_bytes`` each) plus the token's k ids and weights; combine sends
    float32 partial outputs (reduce-scatter, or all-to-all back, plus the tensor-parallel reduction). The
    all-to-all sends whole ``capacity`` buffers (:meth:`MoESharding.capacity`).
    """
    ep, tp = sharding.ep, sharding.tp
    per_shard = num_tokens / sharding.token_shards
    group = per_shard * ep
    row_in = hidden_size * dtype_bytes + 8 * top_k + 1
    row_out = hidden_size * 4
    n = ep * tp
    gather = {
        "dispatch": (ep - 1) * per_shard * row_in,
        "combine": (n - 1) / n * group * row_out + (tp - 1) * group / n * row_out,
    }
    capacity = sharding.capacity(math.ceil(per_shard), top_k)
    a2a = {
        "dispatch": (ep - 1) * capacity * row_in,
        "combine": (ep - 1) * capacity * row_out + 2 * (tp - 1) / tp * ep * capacity * row_out,
    }
    for d in (gather, a2a):
        d["total"] = d["dispatch"] + d["combine"]
    return {
        "all_gather": gather,
        "all_to_all": a2a,
        "auto": a2a if sharding.chosen_exchange(math.ceil(per_shard), top_k) == "all_to_all" else gather,
    }
