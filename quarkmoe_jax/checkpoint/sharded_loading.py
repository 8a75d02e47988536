"""Load a MoE layer straight into the sharded layout of a :class:`~quarkmoe_jax.moe.sharding.MoESharding`.

Each distinct ``(expert rank, tensor rank)`` of the mesh runs the scheme's lifecycle on its own buffers
(:func:`~quarkmoe_jax.checkpoint.loader.load_experts` with the shard's expert map and
:class:`~quarkmoe_jax.checkpoint.loader.IntermediateSlice`), reading only its experts' tensors and of those
only its slice of ``I``; devices that differ only in their data coordinate share one load; each process loads
the shards of its own devices (multi-host). The shards'
arrays are assembled into global ``jax.Array`` s (:func:`jax.make_array_from_single_device_arrays`) laid out
as :func:`~quarkmoe_jax.moe.shard_layout.param_specs` says: the arrays
:func:`~quarkmoe_jax.moe.shard_layout.shard_params` builds from a whole load.

* :func:`load_sharded_moe_block`: a whole block (router replicated, routed experts per shard, shared
  expert(s) tensor-parallel).
* :func:`load_sharded_experts`: one set of experts under a tensor-name prefix.
* :func:`load_sharded_dense_mlp`: a model's dense MLP, tensor-parallel as a shared expert.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.checkpoint.loader import (
    IntermediateSlice,
    LoadedExperts,
    LoadedMoEBlock,
    dense_mlp_setup,
    load_experts,
    load_moe_block,
    plan_experts,
    read_selected,
)
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointReader
from quarkmoe_jax.contracts import MoEShape
from quarkmoe_jax.moe.shard_layout import param_specs, scales_for_tensor_split
from quarkmoe_jax.moe.sharding import MoESharding
from quarkmoe_jax.schemes import MoEScheme

__all__ = ["load_sharded_experts", "load_sharded_moe_block", "load_sharded_dense_mlp"]


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
    arrays :func:`~quarkmoe_jax.moe.shard_layout.shard_params` would build from a whole load).
    """
    mesh = sharding.mesh
    mx_format = getattr(scheme, "weight_format", None)
    local_shape = sharding.local_shape(shape)
    per_shard: dict[tuple[int, int], dict[str, Any]] = {}
    device_coords = {}
    names = mesh.axis_names
    for index in np.ndindex(*mesh.devices.shape):
        if mesh.devices[index].process_index != jax.process_index():
            continue  # another host's device (multi-host): that process loads it
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
            size = local_shape.intermediate_size
            bits = mx_format.bits if mx_format is not None else None
            intermediate_slice = IntermediateSlice(tp_rank * size, size, shape.intermediate_size, bits)
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
        params = dict(loaded.params)
        params["w13"] = scales_for_tensor_split(params["w13"], sharding.tp)
        per_shard[(ep_rank, tp_rank)] = params
    first = next(iter(per_shard.values()))
    if first.get("w13_input_scale") is not None and jnp.ndim(first["w13_input_scale"]) == 0 and sharding.ep > 1:
        maxima = _input_scale_maxima(reader, prefix, copy.deepcopy(scheme), shape, num_global_experts)
        for params in per_shard.values():
            params.update({key: jnp.asarray(value, jnp.float32) for key, value in maxima.items()})
    specs = param_specs(first, sharding)
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
    expert_map=None,
    progress=None,
    float_dtype=None,
) -> LoadedMoEBlock:
    """:func:`~quarkmoe_jax.checkpoint.loader.load_moe_block` with the routed experts loaded per shard
    (:func:`load_sharded_experts`) and the shared expert(s) tensor-parallel (replicated over the other
    axes). The router stays whole (replicated). ``expert_map`` must be None: the sharding places the
    experts (the argument is there so that both loaders take the same call)."""
    if expert_map is not None:
        raise ValueError("pass expert_map or sharding, not both (sharding places the experts itself)")

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


def load_sharded_dense_mlp(
    reader: CheckpointReader,
    prefix: str,
    hidden_size: int,
    intermediate_size: int,
    quark,
    sharding: MoESharding,
    semantics: str = "vllm",
    float_dtype=None,
) -> LoadedExperts:
    """:func:`~quarkmoe_jax.checkpoint.loader.load_dense_mlp` loaded per shard: tensor-parallel over
    ``sharding``'s tensor axis (its slice of ``I`` per shard), replicated over the others (``sharding`` is a
    shared expert's: :meth:`MoESharding.for_shared_experts`)."""
    prefix, scheme, shape = dense_mlp_setup(
        reader, prefix, hidden_size, intermediate_size, quark, semantics, float_dtype
    )
    return load_sharded_experts(reader, prefix, scheme, shape, sharding, num_global_experts=1, indexed=False)
