"""The parameter layout of a sharded MoE layer (:class:`~quarkmoe_jax.moe.sharding.MoESharding`).

The sharded parameters are ordinary global ``jax.Array`` s: experts shard-major (each EP shard's
``ceil(E / ep)`` slots, :meth:`~quarkmoe_jax.moe.sharding.MoESharding.slot_order`), w13's rows tensor-shard-major
(each tensor shard's ``[gate; up]`` rows contiguous; gpt-oss's interleaved rows already are), ``I`` padded
with zero channels to ``tp`` 32-aligned slices, w2's columns (packed bytes and E8M0 blocks) split the same
way. :func:`param_specs` gives every leaf's ``PartitionSpec``; :func:`shard_params` builds the layout from a
single-device load; :func:`kernel_layout_per_shard` re-lays MX weights for the kernels, shard by shard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.contracts import MoEShape
from quarkmoe_jax.formats import QArray, scaled_qarray
from quarkmoe_jax.formats.elements import E8M0_ONE
from quarkmoe_jax.formats.kernel_layout import split_into_parts, to_kernel_layout
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE
from quarkmoe_jax.moe.sharding import MoESharding

__all__ = ["param_specs", "shard_params", "kernel_layout_per_shard", "scales_for_tensor_split"]


def _leaf_spec(name: str, ndim: int, s: MoESharding) -> P:
    """The spec of a parameter that is not an expert weight (biases, input scales)."""
    e, t = s.expert_axis if s.ep > 1 else None, s.tensor_axis if s.tp > 1 else None
    if name == "w13_bias":
        return P(e, t)
    if name == "w2_bias":
        return P(e, None)
    if name in ("w13_input_scale", "w2_input_scale"):
        return P() if ndim == 0 else P(e)
    raise ValueError(f"unknown MoE parameter {name!r}")


def _weight_spec(name: str, s: MoESharding) -> P:
    """The spec of w13 ``[E, S*I, H]`` (rows split) or w2 ``[E, H, I]`` (columns split)."""
    e, t = s.expert_axis if s.ep > 1 else None, s.tensor_axis if s.tp > 1 else None
    return P(e, t, None) if name == "w13" else P(e, None, t)


def _weight_specs(name: str, weight: QArray, s: MoESharding) -> QArray:
    """``weight``'s leaves' specs, as a QArray of specs: MX scales follow their codes; 8-bit scales by their
    granularity (per channel: w13's split rows; per tensor / shard: one per expert)."""
    spec = _weight_spec(name, s)
    e, rows = spec[0], spec[1]
    if weight.scales is None or weight.kind == "mx":
        scales = None if weight.scales is None else spec
    elif weight.qtype.granularity == "channel":
        scales = P(e, rows)
    elif weight.qtype.granularity == "shard":
        scales = P(e, None)
    else:
        scales = P(e)
    return dataclasses.replace(weight, values=spec, scales=scales, extra=None if weight.extra is None else spec)


def param_specs(params: dict[str, Any], sharding: MoESharding) -> dict[str, Any]:
    """The ``PartitionSpec`` of every parameter leaf in the sharded layout: a QArray of specs for w13 / w2
    (:func:`_weight_specs`), a spec for the others."""
    specs = {}
    for name, value in params.items():
        if name in ("w13", "w2"):
            specs[name] = _weight_specs(name, value, sharding)
        else:
            specs[name] = _leaf_spec(name, len(value.shape), sharding)
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


def scales_for_tensor_split(weight: QArray, tp: int) -> QArray:
    """Quark's per-shard w13 scales (granularity "shard": one per w1 / w3, each covering ``N / S`` consecutive
    rows) as per-row ("channel") scales when tensor parallelism (``tp > 1``) re-orders w13's rows tensor-shard-
    major: the same value on every row, so every product is unchanged, and a granularity that stays true for
    the global array. Anything else is returned as it is."""
    if tp == 1 or weight.kind not in ("int8", "fp8") or weight.qtype.granularity != "shard":
        return weight
    return scaled_qarray(weight.values, weight.row_scales(), "channel")


def shard_params(params: dict[str, Any], shape: MoEShape, sharding: MoESharding) -> dict[str, Any]:
    """Single-device parameters (as loaded: ``w13 [E, S*I, H]``, ``w2 [E, H, I]``, scales, biases) -> the
    sharded layout, placed on the mesh.

    The sharded arrays hold the experts shard-major (:meth:`MoESharding.slot_order`) and w13's rows tensor-
    shard-major; each device's block is exactly the parameters
    :func:`~quarkmoe_jax.checkpoint.sharded_loading.load_sharded_experts` reads for it. Prefer that per-shard
    loader for models that do not fit one device.
    """
    params = {k: v.to_checkpoint_layout() if isinstance(v, QArray) else v for k, v in params.items()}
    w13, w2 = params["w13"], params["w2"]
    i_stored = w2.shape[2]
    shards = w13.shape[1] // i_stored
    i_local = sharding.intermediate_per_shard(i_stored)
    tp = sharding.tp
    order = sharding.slot_order(w13.shape[0])

    def rows13(a, fill, stored=i_stored):
        return _rows_by_tensor_shard(a, shards, shape.interleaved, stored, i_local, tp, fill)

    out = {}
    for name, value in params.items():
        if name in ("w13", "w2"):
            out[name] = _shard_weight(name, value, rows13, tp * i_local, order, tp)
            continue
        value = jnp.asarray(value)
        fill = 1 if "scale" in name else 0
        if name == "w13_bias":
            value = rows13(value, fill)
        if value.ndim >= 1:
            value = _experts_by_shard(value, order, fill)
        out[name] = value
    specs = param_specs(out, sharding)
    return jax.tree.map(lambda v, spec: jax.device_put(v, NamedSharding(sharding.mesh, spec)), out, specs)


def _shard_weight(name: str, weight: QArray, rows13, i_total: int, order: np.ndarray, tp: int) -> QArray:
    """One expert weight in the sharded layout: w13's rows (and per-channel scales) tensor-shard-major, w2's
    ``I`` padded to ``i_total`` (MX: its packed bytes and E8M0 blocks), experts shard-major. Padding: zero
    codes, E8M0 code 127, scale 1. Quark's per-shard w13 scales become per-row scales when ``tp > 1``, each
    padded row carrying its shard's scale, as the per-shard loader builds them
    (:func:`scales_for_tensor_split`)."""
    values, scales, qtype = weight.values, weight.scales, weight.qtype
    mx = weight.kind == "mx"
    scale_fill = E8M0_ONE if mx else 1
    if name == "w13":
        values = rows13(values, 0)
        if mx or qtype.granularity == "channel":
            scales = rows13(scales, scale_fill)
        elif qtype.granularity == "shard" and tp > 1:  # [E, S] -> one per padded row, then split
            scales = rows13(jnp.repeat(scales, i_total, axis=1), scale_fill, stored=i_total)
            qtype = dataclasses.replace(qtype, granularity="channel")
    elif mx:
        values = _pad_axis(values, 2, i_total * weight.fmt.bits // 8, 0)
        scales = _pad_axis(scales, 2, i_total // MX_BLOCK_SIZE, E8M0_ONE)
    else:
        values = _pad_axis(values, 2, i_total, 0)
    values = _experts_by_shard(values, order, 0)
    if scales is not None:
        scales = _experts_by_shard(scales, order, scale_fill)
    return dataclasses.replace(weight, values=values, scales=scales, qtype=qtype)


def kernel_layout_per_shard(params: dict[str, Any], sharding: MoESharding) -> dict[str, Any]:
    """Re-lay sharded MX weights for the kernels, shard by shard (w2's K is split, so the layout's K chunks
    must be each shard's own: w2 comes back as ``tp`` parts, ``kernel_layout.split_into_parts``). FP6
    tensors whose per-shard K the kernels cannot take stay as they are."""
    out = dict(params)
    for name in ("w13", "w2"):
        value = params[name]
        if value.kind != "mx":
            continue
        local_k = value.shape[2] // (sharding.tp if name == "w2" else 1)
        probe = QArray(
            jnp.zeros((1, local_k * value.fmt.bits // 8), jnp.uint8),
            jnp.zeros((1, local_k // MX_BLOCK_SIZE), jnp.uint8),
            value.fmt,
        )
        try:
            to_kernel_layout(probe)
        except ValueError:
            continue
        spec = _weight_spec(name, sharding)
        relay = jax.shard_map(to_kernel_layout, mesh=sharding.mesh, in_specs=(spec,), out_specs=spec)
        out[name] = split_into_parts(jax.jit(relay)(value), sharding.tp if name == "w2" else 1)
    return out
