"""The parameter layout of a sharded MoE layer (:class:`~quarkmoe_jax.moe.sharded.MoESharding`).

The sharded parameters are ordinary global ``jax.Array`` s: experts shard-major (each EP shard's
``ceil(E / ep)`` slots, :meth:`~quarkmoe_jax.moe.sharded.MoESharding.slot_order`), w13's rows tensor-shard-major
(each tensor shard's ``[gate; up]`` rows contiguous; gpt-oss's interleaved rows already are), ``I`` padded
with zero channels to ``tp`` 32-aligned slices, w2's columns (packed bytes and E8M0 blocks) split the same
way. :func:`param_specs` gives every leaf's ``PartitionSpec``; :func:`shard_params` builds the layout from a
single-device load; :func:`kernel_layout_per_shard` re-lays MX weights for the kernels, shard by shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.contracts import MoEShape
from quarkmoe_jax.formats import MXTensor
from quarkmoe_jax.formats.kernel_layout import as_mx_tensor, to_kernel_layout
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE

if TYPE_CHECKING:
    from quarkmoe_jax.moe.sharded import MoESharding

__all__ = ["param_specs", "shard_params", "kernel_layout_per_shard"]

_NEUTRAL_E8M0 = 127


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
    shard-major; each device's block is exactly the parameters
    :func:`~quarkmoe_jax.checkpoint.sharded_loading.load_sharded_experts` reads for it. Prefer that per-shard
    loader for models that do not fit one device.
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
                scales = _rows_by_tensor_shard(scales, shards, shape.interleaved, i_stored, i_local, tp, _NEUTRAL_E8M0)
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
