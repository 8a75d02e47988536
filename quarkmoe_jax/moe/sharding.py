"""How one MoE layer is split over a ``jax.sharding.Mesh`` (docs/distributed.md): :class:`MoESharding`
(expert, tensor and data parallelism, the exchange), the mesh helper :func:`moe_mesh`, vLLM's expert
placements (:func:`placement_expert_map`) and the exchange's byte model (:func:`exchange_bytes`).

The type alone, imported by the forward (:mod:`quarkmoe_jax.moe.sharded`), the parameter layout
(:mod:`quarkmoe_jax.moe.shard_layout`) and the per-shard loader, so none of them imports another's module.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

from quarkmoe_jax.contracts import MoEShape
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE, round_up
from quarkmoe_jax.moe.shard_axes import ShardAxes

__all__ = ["MoESharding", "moe_mesh", "PLACEMENTS", "EXCHANGES", "placement_expert_map", "exchange_bytes"]

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
