"""Expert- and tensor-parallel MoE over a ``jax.sharding.Mesh`` (docs/distributed.md).

* **Expert parallelism (EP)**: the experts are split over the mesh's ``expert`` axis, with vLLM's linear or
  round-robin placement (:func:`~quarkmoe_jax.checkpoint.loader.linear_expert_map`); a shard holds
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

import copy
import dataclasses
import functools
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.checkpoint.loader import (
    IntermediateSlice,
    LoadedExperts,
    linear_expert_map,
    load_experts,
    load_moe_block,
    plan_experts,
    read_selected,
    round_robin_expert_map,
)
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointReader
from quarkmoe_jax.formats import MXTensor
from quarkmoe_jax.formats.kernel_layout import as_mx_tensor, to_kernel_layout
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE
from quarkmoe_jax.moe import op
from quarkmoe_jax.moe.entry import token_bucket, validate_moe_inputs
from quarkmoe_jax.moe.shard_axes import ShardAxes
from quarkmoe_jax.schemes import MoEQuantConfig, MoEScheme, MoEShape

__all__ = [
    "MoESharding",
    "moe_mesh",
    "PLACEMENTS",
    "EXCHANGES",
    "shard_params",
    "param_specs",
    "sharded_moe_experts",
    "kernel_layout_per_shard",
    "exchange_bytes",
    "load_sharded_experts",
    "load_sharded_moe_block",
]

PLACEMENTS = ("linear", "round_robin")
EXCHANGES = ("auto", "all_gather", "all_to_all")
TP_ALIGN = MX_BLOCK_SIZE
_NEUTRAL_E8M0 = 127


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

    def expert_map(self, num_experts: int, ep_rank: int) -> np.ndarray:
        """``[E]`` int32: global expert -> local slot on EP shard ``ep_rank``, -1 elsewhere (vLLM's map)."""
        if self.ep == 1:
            return np.arange(num_experts, dtype=np.int32)
        make = linear_expert_map if self.placement == "linear" else round_robin_expert_map
        return make(num_experts, self.ep, ep_rank)

    def expert_maps(self, num_experts: int) -> np.ndarray:
        """``[ep, E]`` int32: every EP shard's expert map."""
        return np.stack([self.expert_map(num_experts, r) for r in range(self.ep)])

    def slot_order(self, num_experts: int) -> np.ndarray:
        """``[ep * E_local]`` global expert in each slot of the sharded arrays (shard-major); ``num_experts``
        marks an unused slot."""
        per = self.experts_per_shard(num_experts)
        order = np.full(self.ep * per, num_experts, np.int64)
        for rank, expert_map in enumerate(self.expert_maps(num_experts)):
            for g in np.flatnonzero(expert_map >= 0):
                order[rank * per + expert_map[g]] = g
        return order

    def intermediate_per_shard(self, intermediate_size: int) -> int:
        """Channels of ``I`` per tensor shard: ``ceil(I / tp)`` rounded up to 32 (one shard: ``I``)."""
        if self.tp == 1:
            return intermediate_size
        per_shard = -(-intermediate_size // self.tp)
        return -(-per_shard // TP_ALIGN) * TP_ALIGN

    def intermediate_slice(self, intermediate_size: int, tp_rank: int, mx_bits=None) -> IntermediateSlice:
        size = self.intermediate_per_shard(intermediate_size)
        return IntermediateSlice(tp_rank * size, size, intermediate_size, mx_bits)

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


# ------------------------------------------------------------------------------------- parameter layout


def _leaf_spec(name: str, ndim: int, per_channel: bool, s: MoESharding) -> P:
    e, t = s.expert_axis if s.ep > 1 else None, s.tensor_axis if s.tp > 1 else None
    if name == "w13":
        return P(e, t, None)
    if name == "w2":
        return P(e, None, t)
    if name in ("w13_weight_scale", "w13_bias"):
        if ndim == 2:
            return P(e, t if per_channel or name == "w13_bias" else None)
        return P(e)
    if name in ("w2_weight_scale", "w2_bias"):
        return P(e, None) if ndim == 2 else P(e)
    if name in ("w13_input_scale", "w2_input_scale"):
        return P() if ndim == 0 else P(e)
    raise ValueError(f"unknown MoE parameter {name!r}")


def param_specs(params: dict[str, Any], sharding: MoESharding, num_rows13: int) -> dict[str, Any]:
    """The ``PartitionSpec`` of every parameter leaf in the sharded layout (MX leaves share their tensor's).

    ``num_rows13``: w13's rows per shard (``S * I_local``), to tell per-channel from per-shard scales."""
    specs = {}
    for name, value in params.items():
        ndim = len(value.shape)
        per_channel = name == "w13_weight_scale" and ndim == 2 and value.shape[1] % num_rows13 == 0
        spec = _leaf_spec(name, ndim, per_channel, sharding)
        specs[name] = jax.tree.map(lambda _, spec=spec: spec, value)
    return specs


def _rows_by_tensor_shard(a, shards: int, interleaved: bool, i_stored: int, i_local: int, tp: int, fill):
    """w13-like ``[E, S*I, ...]`` -> ``[E, tp*S*I_local, ...]``: each tensor shard's ``[gate; up]`` rows
    contiguous (interleaved gpt-oss rows are already in channel order), ``I`` padded with ``fill``."""
    e, rest = a.shape[0], a.shape[2:]
    if interleaved:
        a = a.reshape(e, i_stored, 2, *rest)
        a = _pad_axis(a, 1, tp * i_local, fill)
        return a.reshape(e, tp * i_local * 2, *rest)
    a = a.reshape(e, shards, i_stored, *rest)
    a = _pad_axis(a, 2, tp * i_local, fill)
    a = a.reshape(e, shards, tp, i_local, *rest)
    a = jnp.swapaxes(a, 1, 2)
    return a.reshape(e, tp * shards * i_local, *rest)


def _pad_axis(a, axis: int, size: int, fill):
    missing = size - a.shape[axis]
    if missing == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, missing)
    return jnp.pad(a, widths, constant_values=fill)


def _experts_by_shard(a, order: np.ndarray, fill):
    """Leading expert axis -> the shard-major slot order (unused slots filled with ``fill``)."""
    padded = jnp.concatenate([a, jnp.full((1, *a.shape[1:]), fill, a.dtype)], axis=0)
    return jnp.take(padded, jnp.asarray(order), axis=0)


def shard_params(params: dict[str, Any], shape: MoEShape, sharding: MoESharding) -> dict[str, Any]:
    """Single-device parameters (as loaded: ``w13 [E, S*I, H]``, ``w2 [E, H, I]``, scales, biases) -> the
    sharded layout, placed on the mesh.

    The sharded arrays hold the experts shard-major (:meth:`MoESharding.slot_order`) and w13's rows tensor-
    shard-major; each device's block is exactly the parameters :func:`load_sharded_experts` reads for it.
    Prefer that per-shard loader for models that do not fit one device.
    """
    params = {k: as_mx_tensor(v) for k, v in params.items()}
    w13, w2 = params["w13"], params["w2"]
    i_stored = w2.shape[2]
    shards = w13.shape[1] // i_stored
    i_local = sharding.intermediate_per_shard(i_stored)
    tp = sharding.tp
    order = sharding.slot_order(w13.shape[0])
    mx_bits = w13.fmt.bits if isinstance(w13, MXTensor) else None
    out = {}
    for name, value in params.items():
        if isinstance(value, MXTensor):
            packed, scales = value.packed, value.scales
            if name == "w13":
                packed = _rows_by_tensor_shard(packed, shards, shape.interleaved, i_stored, i_local, tp, 0)
                scales = _rows_by_tensor_shard(scales, shards, shape.interleaved, i_stored, i_local, tp, 127)
            else:
                packed = _pad_axis(packed, 2, tp * i_local * mx_bits // 8, 0)
                scales = _pad_axis(scales, 2, tp * i_local // MX_BLOCK_SIZE, _NEUTRAL_E8M0)
            packed = _experts_by_shard(packed, order, 0)
            scales = _experts_by_shard(scales, order, _NEUTRAL_E8M0)
            out[name] = MXTensor(packed, scales, value.fmt)
            continue
        value = jnp.asarray(value)
        fill = 1 if "scale" in name else 0
        if name == "w13" or (
            name in ("w13_weight_scale", "w13_bias") and value.ndim == 2 and value.shape[1] == w13.shape[1]
        ):
            value = _rows_by_tensor_shard(value, shards, shape.interleaved, i_stored, i_local, tp, fill)
        elif name == "w2":
            value = _pad_axis(value, 2, tp * i_local, 0)
        if value.ndim >= 1:
            value = _experts_by_shard(value, order, fill)
        out[name] = value
    specs = param_specs(out, sharding, shards * i_local)
    return jax.tree.map(lambda v, spec: jax.device_put(v, NamedSharding(sharding.mesh, spec)), out, specs)


def kernel_layout_per_shard(params: dict[str, Any], sharding: MoESharding) -> dict[str, Any]:
    """Re-lay sharded MX weights for the kernels, shard by shard (w2's K is split, so the layout's K chunks
    must be each shard's own). FP6 tensors whose per-shard K the kernels cannot take stay as they are."""
    out = dict(params)
    for name in ("w13", "w2"):
        value = params[name]
        if not isinstance(value, MXTensor):
            continue
        local_k = value.shape[2] // (sharding.tp if name == "w2" else 1)
        probe = MXTensor(
            jnp.zeros((1, local_k * value.fmt.bits // 8), jnp.uint8),
            jnp.zeros((1, local_k // MX_BLOCK_SIZE), jnp.uint8),
            value.fmt,
        )
        try:
            to_kernel_layout(probe)
        except ValueError:
            continue
        spec = _leaf_spec(name, 3, False, sharding)
        relay = jax.shard_map(to_kernel_layout, mesh=sharding.mesh, in_specs=(spec,), out_specs=spec)
        out[name] = jax.jit(relay)(value)
    return out


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
    backend: str = "auto",
):
    """The MoE experts forward over ``sharding``'s mesh.

    Args:
      x: ``[T, H]`` float32 / bfloat16 / float16 hidden states (any sharding; split over the token axes
        inside).
      topk_weights: ``[T, k]`` float32 router weights; topk_ids: ``[T, k]`` int32 global expert ids.
      params: the sharded layout (:func:`shard_params` or the per-shard loader).
      quant_config, shape: the layer's scheme and **global** logical sizes.
      sharding: the :class:`MoESharding`.
      backend: what every shard runs ("auto", "emulation", "pallas", "triton").

    Returns:
      ``[T, H]`` in ``x``'s dtype, split over the token axes.
    """
    x, topk_weights, topk_ids = jnp.asarray(x), jnp.asarray(topk_weights, jnp.float32), jnp.asarray(topk_ids)
    validate_moe_inputs(x, topk_weights, topk_ids, shape.hidden_size, shape.num_experts, apply_router_weight_on_input)
    t = x.shape[0]
    if t == 0:
        return jnp.zeros((0, shape.hidden_size), x.dtype)
    multiple = sharding.token_shards * sharding.tp
    padded = -(-t // multiple) * multiple
    if not isinstance(x, jax.core.Tracer):  # eager call: compile once per token bucket
        padded = -(-token_bucket(t) // multiple) * multiple
    pad = padded - t
    static = dict(
        quant_config=quant_config,
        shape=shape,
        sharding=sharding,
        activation=activation,
        swiglu_limit=swiglu_limit,
        apply_router_weight_on_input=apply_router_weight_on_input,
        backend=backend,
    )
    out = _sharded_forward(
        jnp.pad(x, ((0, pad), (0, 0))),
        jnp.pad(topk_weights, ((0, pad), (0, 0))),
        jnp.pad(topk_ids.astype(jnp.int32), ((0, pad), (0, 0))),
        jnp.arange(padded) < t,
        params,
        **static,
    )
    return out[:t]


@functools.partial(
    jax.jit,
    static_argnames=(
        "quant_config",
        "shape",
        "sharding",
        "activation",
        "swiglu_limit",
        "apply_router_weight_on_input",
        "backend",
    ),
)
def _sharded_forward(x, topk_weights, topk_ids, valid, params, *, quant_config, shape, sharding, backend, **kwargs):
    s = sharding
    num_rows13 = params["w13"].shape[1] // s.tp
    specs = param_specs(params, s, num_rows13)
    tokens = P(s.token_axes or None)
    local_shape = dataclasses.replace(shape, num_experts=params["w13"].shape[0] // s.ep)
    maps = s.expert_maps(shape.num_experts)
    expert_maps = jnp.asarray(maps)
    owners = jnp.asarray(np.argmax(maps >= 0, axis=0).astype(np.int32))  # EP shard of each global expert
    axes = s.shard_axes()

    def run_experts(x_l, w_l, ids_l, valid_l, params_l):
        """This shard's experts on the given rows: float32 partial outputs ``[rows, H]``."""
        ep_rank = lax.axis_index(s.expert_axis) if s.ep > 1 else 0
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


# ---------------------------------------------------------------------------------------- per-shard loading


def load_sharded_experts(
    reader: CheckpointReader,
    prefix: str,
    scheme: MoEScheme,
    shape: MoEShape,
    sharding: MoESharding,
    *,
    num_global_experts: int,
    indexed: bool = True,
    progress: bool | None = None,
) -> LoadedExperts:
    """Load the experts under ``prefix`` straight into the sharded layout, each shard reading only its own
    experts and its own slice of ``I`` (w1 / w3 rows, w2 columns) from the checkpoint.

    ``scheme`` is the layer's scheme (a fresh copy runs the lifecycle for every distinct shard); ``shape``
    holds the global sizes. Shards that differ only in their data-parallel coordinate share one load.
    Static input scales under vLLM semantics are the maximum over **all** experts (each shard reads every
    expert's scalar input scales), so the result does not depend on the placement.

    Returns :class:`LoadedExperts` whose params are global ``jax.Array`` s in the sharded layout (the same
    arrays :func:`shard_params` would build from a whole load).
    """
    mesh = sharding.mesh
    mx_format = getattr(scheme, "weight_format", None)
    local_shape = sharding.local_shape(shape)
    per_shard: dict[tuple[int, int], dict[str, Any]] = {}
    device_coords = {}
    names = mesh.axis_names
    for index in np.ndindex(*mesh.devices.shape):
        coords = dict(zip(names, index, strict=True))
        ep_rank = coords[sharding.expert_axis] if sharding.ep > 1 else 0
        tp_rank = coords[sharding.tensor_axis] if sharding.tp > 1 else 0
        device_coords[mesh.devices[index]] = (ep_rank, tp_rank)
    for device, (ep_rank, tp_rank) in device_coords.items():
        if (ep_rank, tp_rank) in per_shard:
            continue
        expert_map = sharding.expert_map(num_global_experts, ep_rank) if indexed else None
        if expert_map is not None and sharding.ep == 1:
            expert_map = None
        intermediate_slice = None
        if sharding.tp > 1:
            bits = mx_format.bits if mx_format is not None else None
            intermediate_slice = sharding.intermediate_slice(shape.intermediate_size, tp_rank, bits)
        with jax.default_device(device):
            loaded = load_experts(
                reader,
                prefix,
                copy.deepcopy(scheme),
                local_shape,
                num_global_experts=num_global_experts,
                expert_map=expert_map,
                indexed=indexed,
                progress=progress,
                intermediate_slice=intermediate_slice,
            )
        per_shard[(ep_rank, tp_rank)] = loaded.params
    first = next(iter(per_shard.values()))
    if first.get("w13_input_scale") is not None and jnp.ndim(first["w13_input_scale"]) == 0 and sharding.ep > 1:
        maxima = _input_scale_maxima(reader, prefix, copy.deepcopy(scheme), shape, num_global_experts)
        for params in per_shard.values():
            params.update({key: jnp.asarray(value, jnp.float32) for key, value in maxima.items()})
    num_rows13 = first["w13"].shape[1]
    specs = param_specs(first, sharding, num_rows13)
    params = {}
    for name, spec_tree in specs.items():
        leaves_by_shard = {coord: jax.tree.leaves(p[name]) for coord, p in per_shard.items()}
        spec_leaves, treedef = jax.tree.flatten(spec_tree, is_leaf=lambda v: isinstance(v, P))
        assembled = []
        for i, spec in enumerate(spec_leaves):
            local = leaves_by_shard[next(iter(leaves_by_shard))][i]
            global_shape = list(local.shape)
            for dim, axis in enumerate(spec):
                if axis is not None:
                    global_shape[dim] *= mesh.shape[axis]
            arrays = [jax.device_put(leaves_by_shard[coord][i], device) for device, coord in device_coords.items()]
            assembled.append(
                jax.make_array_from_single_device_arrays(tuple(global_shape), NamedSharding(mesh, spec), arrays)
            )
        params[name] = jax.tree.unflatten(treedef, assembled)
    return LoadedExperts(prefix, scheme, shape, params, None)


def _input_scale_maxima(reader, prefix, scheme, shape, num_global_experts) -> dict[str, float]:
    """vLLM's static input scale of each GEMM: the maximum over every expert's (scalar) input scale."""
    _, plan = plan_experts(reader, prefix, scheme, shape, num_global_experts=num_global_experts)
    maxima: dict[str, float] = {}
    for entry, select, _, shard, suffix in plan:
        if suffix != "input_scale":
            continue
        key = "w2_input_scale" if shard == "w2" else "w13_input_scale"
        value = float(read_selected(reader, entry.name, select).astype(np.float32).reshape(-1)[0])
        maxima[key] = max(maxima.get(key, value), value)
    return maxima


def load_sharded_moe_block(
    path: str | pathlib.Path,
    layer: int,
    sharding: MoESharding,
    *,
    semantics: str = "vllm",
    progress=None,
    float_dtype=None,
):
    """:func:`~quarkmoe_jax.checkpoint.loader.load_moe_block` with the routed experts loaded per shard
    (:func:`load_sharded_experts`) and the shared expert(s) tensor-parallel (replicated over the other
    axes). The router stays whole (replicated)."""

    def routed(reader, prefix, scheme, shape, num_global_experts):
        return load_sharded_experts(
            reader, prefix, scheme, shape, sharding, num_global_experts=num_global_experts, progress=progress
        )

    def shared(reader, prefix, scheme, shape):
        return load_sharded_experts(
            reader, prefix, scheme, shape, sharding.for_shared_experts(), num_global_experts=1, indexed=False
        )

    return load_moe_block(
        path, layer, semantics=semantics, experts_loader=routed, shared_loader=shared, float_dtype=float_dtype
    )
