"""Load one MoE layer of a Quark checkpoint: config -> scheme -> expert tensors -> processed parameters.

The loader reads lazily, tensor by tensor, into host buffers created by the scheme, and hands the module
device arrays only after every tensor was found and checked: a malformed checkpoint raises
:class:`CheckpointError` (naming the tensor, the expected and the found) and nothing is half-loaded.

Accepted expert tensor layouts under ``<block>.experts`` (``<suffix>`` is ``weight``, ``weight_scale``,
``input_scale``, ``weight_zero_point``, ``input_zero_point`` or ``bias``):

* per expert and projection: ``experts.{e}.{gate_proj|up_proj|down_proj|w1|w3|w2}.<suffix>``;
* per expert, gate and up fused: ``experts.{e}.{gate_up_proj|w13}.<suffix>`` (rows ``[gate; up]``, or
  interleaved for gpt-oss);
* all experts in one tensor: ``experts.{gate_up_proj|w13|down_proj|w2|...}.<suffix>`` with a leading
  expert axis;
* transformers' own gpt-oss tensors ``experts.{gate_up_proj|down_proj}`` ``[E, in, out]`` (read transposed)
  and ``experts.{gate_up_proj|down_proj}_bias``.

Every tensor name is made and parsed by :mod:`quarkmoe_jax.checkpoint.architectures`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from quarkmoe_jax.checkpoint.architectures import (
    CORRECTION_BIAS,
    HF_PROJECTIONS,
    PROJECTION_SPELLINGS,
    PROJECTIONS,
    SUFFIXES,
    MoEArchitecture,
    ProjectionTensor,
    linear_name,
    parse_projection_tensor,
    split_tensor_name,
    tensor_name,
)
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader, folder_file, read_json_file
from quarkmoe_jax.formats import E8M0_ONE
from quarkmoe_jax.moe.sharding import placement_expert_map
from quarkmoe_jax.quark_config import QuarkConfig, exclude_match_budget
from quarkmoe_jax.schemes import HeaderCheckBuffer, MoEScheme, MoEShape, get_moe_scheme

__all__ = [
    "LoadedExperts",
    "PerTensorDynamicScaleWarning",
    "LoadedMoEBlock",
    "load_moe_block",
    "load_experts",
    "plan_experts",
    "check_expert_headers",
    "read_hf_config",
    "check_checkpoint_headers",
    "inspect_checkpoint",
    "linear_expert_map",
    "round_robin_expert_map",
    "check_expert_map",
    "IntermediateSlice",
    "read_selected",
    "load_dense_mlp",
]

_PROGRESS_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass
class LoadedExperts:
    """One set of experts after ``process_weights_after_loading``.

    ``params`` holds the expert weights ``w13`` / ``w2`` as :class:`~quarkmoe_jax.formats.QArray` s (their
    scales inside), biases and static input scales as arrays;
    ``scheme`` is the scheme that made them (its ``quant_config()`` drives the forward).
    """

    prefix: str
    scheme: MoEScheme
    shape: MoEShape
    params: dict[str, Any]
    expert_map: np.ndarray | None = None


@dataclasses.dataclass
class LoadedMoEBlock:
    """A whole MoE block: routed experts, router, optional shared expert(s)."""

    architecture: MoEArchitecture
    layer: int
    prefix: str
    experts: LoadedExperts
    router_weight: np.ndarray
    router_bias: np.ndarray | None = None
    correction_bias: np.ndarray | None = None
    shared: LoadedExperts | None = None
    shared_gate_weight: np.ndarray | None = None


def read_hf_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder (or of the folder holding a ``.safetensors`` file), as a
    dict: a regular file of at most ``MAX_JSON_BYTES`` holding one JSON object."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    folder = path if path.is_dir() else path.parent
    config_path = folder_file(folder, "config.json")  # inside the folder, as the shards must be
    if config_path is None:
        raise CheckpointError(f"{folder / 'config.json'}: missing (a Hugging Face checkpoint needs config.json)")
    config = read_json_file(config_path, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object of settings, found {type(config).__name__}")
    return config


# ------------------------------------------------------------------------------------------ expert maps


def linear_expert_map(num_experts: int, ep_size: int, ep_rank: int) -> np.ndarray:
    """vLLM's linear placement: contiguous ranges, the first ``E % ep`` ranks get one extra expert."""
    return placement_expert_map("linear", num_experts, ep_size, ep_rank)


def round_robin_expert_map(num_experts: int, ep_size: int, ep_rank: int) -> np.ndarray:
    """vLLM's round-robin placement: rank r holds experts r, r + ep, r + 2·ep, …"""
    return placement_expert_map("round_robin", num_experts, ep_size, ep_rank)


def check_expert_map(expert_map, num_experts: int) -> np.ndarray:
    """Validate an ``expert_map [E_global]`` (global id -> local id, -1 = not here)."""
    expert_map = np.asarray(expert_map)
    if expert_map.shape != (num_experts,) or expert_map.dtype.kind not in "iu":
        raise CheckpointError(
            f"expert_map must be an integer array of shape ({num_experts},), found {expert_map.dtype}{expert_map.shape}"
        )
    local = np.sort(expert_map[expert_map >= 0])
    if (expert_map < -1).any() or not np.array_equal(local, np.arange(local.size)):
        raise CheckpointError(
            f"expert_map must map each global expert to -1 or a distinct local id 0..n-1, found {expert_map.tolist()}"
        )
    if local.size == 0:
        raise CheckpointError("expert_map places no expert on this device")
    return expert_map.astype(np.int32)


# ---------------------------------------------------------------------------------- tensor-parallel slices


@dataclasses.dataclass(frozen=True)
class IntermediateSlice:
    """The intermediate channels ``[start, start + size)`` that one tensor-parallel shard holds.

    ``size`` is a multiple of 32 (whole MX scale blocks); channels at or past ``total`` (the checkpoint's
    ``I``) are padding: zero weights and biases, neutral scales (E8M0 127 = 1.0, float 1.0).
    ``mx_bits``: element width of packed MX weights (4, 6 or 8), None for INT8 / FP8 weights.
    """

    start: int
    size: int
    total: int
    mx_bits: int | None = None

    def narrow(self, tensor: np.ndarray, shard: str, suffix: str) -> np.ndarray:
        """The shard's part of one expert's checkpoint tensor (vLLM's TP narrowing): w1 / w3 rows, gpt-oss's
        interleaved fused rows in pairs, w2's packed contraction columns and MX scale blocks. Per-tensor
        values and w2's per-output-channel scales and bias are kept whole."""
        if suffix in ("input_scale", "input_zero_point") or tensor.ndim == 0:
            return tensor
        fill = 0
        if suffix == "weight_scale":
            fill = E8M0_ONE if tensor.dtype == np.uint8 else 1
        if shard in ("w1", "w3", "w13"):
            rows = 2 if shard == "w13" else 1
            if tensor.shape[0] != rows * self.total:
                return tensor  # per-tensor / per-shard values
            return _pad_slice(tensor, 0, rows * self.start, rows * self.size, fill)
        if suffix == "bias":
            return tensor
        if suffix == "weight":
            if tensor.ndim != 2:
                return tensor  # a malformed tensor: the scheme's shape check names it
            bits = self.mx_bits or 8
            return _pad_slice(tensor, 1, self.start * bits // 8, self.size * bits // 8, fill)
        if self.mx_bits is not None and tensor.ndim == 2:  # E8M0 blocks of 32 along I
            return _pad_slice(tensor, 1, self.start // 32, self.size // 32, fill)
        return tensor


def _pad_slice(tensor: np.ndarray, axis: int, start: int, size: int, fill) -> np.ndarray:
    """``tensor[start : start + size]`` along ``axis``, padded with ``fill`` past the tensor's end."""
    index = [slice(None)] * tensor.ndim
    index[axis] = slice(start, start + size)
    part = tensor[tuple(index)]
    missing = size - part.shape[axis]
    if missing == 0:
        return part
    pad_shape = list(part.shape)
    pad_shape[axis] = missing
    return np.concatenate([part, np.full(pad_shape, fill, tensor.dtype)], axis=axis)


# ---------------------------------------------------------------------------------------------- loading


def _parse_names(reader: CheckpointReader, prefix: str, indexed: bool) -> list[ProjectionTensor]:
    """Every tensor under ``prefix``, parsed; a name that is not a projection tensor is refused."""
    entries = []
    for name in reader:
        if not name.startswith(prefix + "."):
            continue
        entry = parse_projection_tensor(name, prefix, indexed)
        if entry is None:
            raise CheckpointError(
                f"unexpected tensor {name!r} under {prefix!r}; expected {prefix}.[<expert>.]<projection>.<suffix> "
                f"with projection in {sorted(PROJECTIONS)} and suffix in {list(SUFFIXES)}"
            )
        entries.append(entry)
    return entries


def _has_bias(reader: CheckpointReader, prefix: str, indexed: bool) -> bool:
    """Whether any projection under ``prefix`` has a ``bias`` tensor."""
    return any(
        entry is not None and entry.suffix == "bias"
        for entry in (parse_projection_tensor(name, prefix, indexed) for name in reader)
    )


def _check_expert_count(
    reader, entries: list[ProjectionTensor], prefix: str, num_experts: int, per_expert: list[tuple[str, str]]
) -> None:
    """Refuse an expert count (from config.json) that the tensors present cannot hold, before planning per
    expert (a crafted count of millions would take minutes there): missing per-expert tensors are named as
    the plan names them, an all-expert weight with a short leading axis by its shape. ``per_expert``: the
    ``(shard, suffix)`` tensors one expert needs."""
    for entry in entries:
        if entry.expert is None and entry.suffix == "weight":
            shape = reader.info(entry.name)[1]
            if not shape or shape[0] < num_experts:
                raise CheckpointError(
                    f"{entry.name}: expected a leading expert axis of {num_experts} (the config's expert count), "
                    f"found shape {tuple(shape)}"
                )
            return
    present = {e.expert for e in entries if e.expert is not None and e.expert < num_experts}
    if len(present) >= num_experts:
        return
    absent = []
    for g in range(num_experts):  # the first few absent experts: at most len(present) + 4 steps
        if g not in present:
            absent.append(g)
            if len(absent) == 4:
                break
    count = (num_experts - len(present)) * len(per_expert)
    examples = [tensor_name(linear_name(prefix, shard, g), suffix) for g in absent for shard, suffix in per_expert][:4]
    raise CheckpointError(
        f"{count} expert tensors missing under {prefix!r} ({num_experts - len(present)} of the config's "
        f"{num_experts} experts have none), e.g. {examples}"
    )


def _split_fused(tensor: np.ndarray, part: int, name: str) -> np.ndarray:
    """Half ``part`` (0 = gate, 1 = up) of a fused ``[gate; up]`` tensor along its first axis."""
    if tensor.ndim == 0 or tensor.size == 1:
        return tensor.reshape(())  # a per-tensor scale shared by both halves
    if tensor.shape[0] == 2 and tensor.ndim == 1:
        return tensor[part]  # per-tensor scales of the two shards
    if tensor.shape[0] % 2:
        raise CheckpointError(f"{name}: fused gate_up tensor has an odd first axis {tensor.shape[0]}")
    half = tensor.shape[0] // 2
    return tensor[part * half : (part + 1) * half]


def plan_experts(
    reader: CheckpointReader,
    prefix: str,
    scheme: MoEScheme,
    shape: MoEShape,
    *,
    num_global_experts: int,
    expert_map: np.ndarray | None = None,
    indexed: bool = True,
    intermediate_slice: IntermediateSlice | None = None,
):
    """Match the checkpoint's tensor names to the scheme's parameters without reading any data.

    Returns ``(param_specs, plan)``; raises :class:`CheckpointError` for missing, duplicate, out-of-range or
    unexpected tensors. Used by :func:`load_experts` and by ``quarkmoe inspect``.
    """
    entries = _parse_names(reader, prefix, indexed)
    if not entries:
        raise CheckpointError(f"no expert tensors found under {prefix!r}")
    by_key: dict[tuple[int | None, str, str], ProjectionTensor] = {}
    for entry in entries:
        if entry.expert is not None and entry.expert >= num_global_experts:
            raise CheckpointError(
                f"{entry.name}: expert index {entry.expert} out of range for {num_global_experts} experts"
            )
        key = (entry.expert, entry.shard, entry.suffix)
        if key in by_key:
            raise CheckpointError(f"duplicate tensors {by_key[key].name!r} and {entry.name!r}")
        by_key[key] = entry
    specs = scheme.create_weights(shape)
    shards = ("w13", "w2") if shape.interleaved else (("w1", "w3", "w2") if shape.gated else ("w1", "w2"))
    suffixes = list(scheme.required_suffixes())
    optional = ["weight_zero_point", "input_zero_point"]
    if shape.has_bias:
        suffixes.append("bias")
    if indexed:
        _check_expert_count(reader, entries, prefix, num_global_experts, [(a, b) for a in shards for b in suffixes])
    plan: list[tuple[ProjectionTensor, Callable[[np.ndarray], np.ndarray], int, str, str]] = []
    used: set[str] = set()
    missing: list[str] = []
    experts = range(num_global_experts) if indexed else [0]
    for g in experts:
        local = g if expert_map is None else int(expert_map[g])
        for shard in shards:
            for suffix in suffixes + optional:
                found = _find(by_key, g if indexed else None, shard, suffix, indexed)
                if found is None:
                    if suffix in suffixes:
                        missing.append(tensor_name(linear_name(prefix, shard, g if indexed else None), suffix))
                    continue
                entry, select = found
                used.add(entry.name)
                if local >= 0:
                    if intermediate_slice is not None:
                        select = functools.partial(_narrowed, select, intermediate_slice, shard, suffix)
                    plan.append((entry, select, local, shard, suffix))
    missing_bias = [m for m in missing if split_tensor_name(m)[1] == "bias"]
    if missing_bias:
        present = sorted(e.name for e in entries if e.suffix == "bias")
        raise CheckpointError(
            f"biases under {prefix!r} are incomplete: found {len(present)} (e.g. {present[:2]}) but "
            f"{len(missing_bias)} are missing (e.g. {missing_bias[:2]}); a layer has biases on every projection or none"
        )
    if missing:
        raise CheckpointError(
            f"{len(missing)} expert tensors missing under {prefix!r} for scheme {scheme.name}, e.g. "
            f"{missing[:4]} (projection names may be {PROJECTION_SPELLINGS})"
        )
    extra = sorted(e.name for e in entries if e.name not in used)
    if extra:
        raise CheckpointError(f"unexpected tensors under {prefix!r} for scheme {scheme.name}: {extra[:4]}")
    return specs, plan


def load_experts(
    reader: CheckpointReader,
    prefix: str,
    scheme: MoEScheme,
    shape: MoEShape,
    *,
    num_global_experts: int,
    expert_map: np.ndarray | None = None,
    indexed: bool = True,
    progress: bool | None = None,
    intermediate_slice: IntermediateSlice | None = None,
) -> LoadedExperts:
    """Read the experts under ``prefix`` into ``scheme``'s parameters.

    Args:
      reader: the checkpoint.
      prefix: e.g. ``model.layers.3.mlp.experts``.
      scheme: from :func:`get_moe_scheme`; its ``create_weights(shape)`` allocates the buffers.
      shape: local sizes (``shape.num_experts`` = local experts).
      num_global_experts: experts in the checkpoint.
      expert_map: ``[num_global_experts]`` global -> local id (-1 skips the expert); None = all.
      indexed: expert tensors carry an expert index (False for a dense MLP such as a shared expert).
      progress: show a tqdm bar (default: only for loads above 256 MiB).
      intermediate_slice: the tensor-parallel shard's channels (``shape.intermediate_size`` = its size);
        None = all.
    """
    specs, plan = plan_experts(
        reader,
        prefix,
        scheme,
        shape,
        num_global_experts=num_global_experts,
        expert_map=expert_map,
        indexed=indexed,
        intermediate_slice=intermediate_slice,
    )
    check_expert_headers(reader, specs, plan, scheme)  # every dtype and shape, before any buffer is allocated
    buffers = {k: spec.allocate() for k, spec in specs.items()}
    _run_plan(reader, plan, scheme, buffers, progress)
    params = scheme.process_weights_after_loading(buffers)
    return LoadedExperts(prefix, scheme, shape, params, expert_map)


def check_expert_headers(reader: CheckpointReader, specs, plan, scheme: MoEScheme) -> None:
    """What :func:`load_experts` checks of each planned tensor's dtype and shape, from the file headers alone:
    the scheme's ``load_weights`` sees a zero-stride stand-in of the header's dtype and shape (no data read,
    nothing allocated) and writes into a :class:`HeaderCheckBuffer` per parameter of ``specs`` (from
    :func:`plan_experts`). Checks of values (NaN scales, nonzero zero points, non-positive scales) need the
    data and are left to the load."""
    buffers = {key: HeaderCheckBuffer() for key in specs}
    scheme.values_checked = False
    try:
        for entry, select, local, shard, suffix in plan:
            dtype, shape = reader.info(entry.name)
            stand_in = np.broadcast_to(np.zeros((), dtype), shape)
            scheme.load_weights(buffers, suffix, select(stand_in), local, shard, entry.name)
    finally:
        scheme.values_checked = True


def _narrowed(select, intermediate_slice: IntermediateSlice, shard, suffix, tensor):
    return intermediate_slice.narrow(select(tensor), shard, suffix)


def _find(by_key, expert, shard, suffix, indexed):
    """Find the tensor for (expert, shard, suffix) in any accepted layout; returns (entry, selector)."""

    def from_all(entry, index_part):
        def select(t):
            if indexed and entry.expert is None:  # all-expert tensor: leading expert axis
                if t.ndim == 0 or t.shape[0] <= expert:
                    raise CheckpointError(f"{entry.name}: expected a leading expert axis, found shape {t.shape}")
                t = t[expert]
            if entry.transposed:
                if t.ndim != 2:
                    raise CheckpointError(f"{entry.name}: expected [experts, in, out], found shape {t.shape}")
                t = t.T
            return index_part(t, entry.name) if index_part else t

        return select

    for candidate_expert in (expert, None) if indexed else (None,):
        entry = by_key.get((candidate_expert, shard, suffix))
        if entry is not None:
            return entry, from_all(entry, None)
        if shard in ("w1", "w3"):
            fused = by_key.get((candidate_expert, "w13", suffix))
            if fused is not None:
                part = 0 if shard == "w1" else 1
                return fused, from_all(fused, lambda t, name, part=part: _split_fused(t, part, name))
    return None


def _run_plan(reader, plan, scheme, buffers, progress) -> None:
    total = sum(int(np.prod(reader.info(e.name)[1])) * reader.info(e.name)[0].itemsize for e, *_ in plan)
    bar = None
    if progress or (progress is None and total > _PROGRESS_BYTES):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading experts")
    try:
        for entry, select, local, shard, suffix in plan:
            tensor = read_selected(reader, entry.name, select)
            if bar is not None:
                bar.update(tensor.nbytes)
            scheme.load_weights(buffers, suffix, tensor, local, shard, entry.name)
    finally:
        if bar is not None:
            bar.close()


def read_selected(reader: CheckpointReader, name: str, select: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A copy of ``select(tensor)``, reading only the bytes the selection touches (a zero-copy view of the
    file is sliced, then copied). No view outlives the call, even when ``select`` raises, so the file can
    be closed."""
    try:
        return np.array(select(reader.view(name)))
    except BaseException as e:
        if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
            traceback.clear_frames(e.__traceback__.tb_next)  # the callees' locals hold views of the file
        raise


def _block_prefix(reader: CheckpointReader, arch: MoEArchitecture, layer: int) -> str:
    """The first of the layer's possible MoE blocks that holds expert tensors."""
    candidates = arch.names.blocks(layer)
    for block in candidates:
        experts = arch.names.experts(block) + "."
        if any(name.startswith(experts) for name in reader):
            return block
    raise CheckpointError(
        f"layer {layer}: no expert tensors under any of {[arch.names.experts(c) for c in candidates]}"
    )


def _check_float_header(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> None:
    dtype, found = reader.info(name)  # names a missing tensor
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise CheckpointError(f"{name}: expected a float tensor, found dtype {dtype}")
    if tuple(found) != shape:
        raise CheckpointError(f"{name}: shape {tuple(found)}, expected {shape}")


def _float(reader: CheckpointReader, name: str, shape: tuple[int, ...]) -> np.ndarray:
    _check_float_header(reader, name, shape)
    return reader[name].astype(np.float32)


def _router_tensors(reader: CheckpointReader, arch: MoEArchitecture, block: str) -> dict[str, tuple[int, ...]]:
    """The router's tensors of a block and their expected shapes (float)."""
    names = arch.names
    tensors = {names.router_tensor(block): (arch.num_experts, arch.hidden_size)}
    if names.router_tensor(block, "bias") in reader:
        tensors[names.router_tensor(block, "bias")] = (arch.num_experts,)
    if arch.has_correction_bias:
        tensors[names.router_tensor(block, CORRECTION_BIAS)] = (arch.num_experts,)
    if arch.has_shared_expert_gate:
        tensors[names.shared_gate_tensor(block)] = (1, arch.hidden_size)
    return tensors


class PerTensorDynamicScaleWarning(UserWarning):
    """A scheme computes one activation scale per tensor at run time (docs/moe.md, "Outliers")."""


_WARNED_PER_TENSOR: set[str] = set()


def _warn_per_tensor_dynamic(scheme: MoEScheme) -> None:
    """Warn once per scheme and process: one outlier token sets the scale of the whole batch."""
    config = scheme.quant_config()
    act = config.activation
    if act.kind in ("fp8", "int8") and act.dynamic and act.granularity == "tensor":
        key = f"{config.scheme}/{config.semantics}"
        if key not in _WARNED_PER_TENSOR:
            _WARNED_PER_TENSOR.add(key)
            warnings.warn(
                f"{config.scheme} ({config.semantics} semantics) quantizes activations with one dynamic scale per "
                "tensor: one token with a huge value sets the scale for the whole batch, and every other token's "
                "output can become 0 (docs/moe.md, 'Outliers and per-tensor dynamic scales')",
                PerTensorDynamicScaleWarning,
                stacklevel=4,
            )


def _layer_setup(
    reader, arch: MoEArchitecture, quark: QuarkConfig | None, layer: int, semantics: str, expert_map, float_dtype=None
):
    """Block prefix, experts prefix, scheme, local shape and checked expert map of one MoE layer (no data read)."""
    block = _block_prefix(reader, arch, layer)
    prefix = arch.names.experts(block)
    children = sorted({name.rsplit(".", 1)[0] for name in reader if name.startswith(prefix + ".")})
    layer_config = quark.resolve(prefix, "FusedMoE", child_names=children) if quark else None
    scheme = get_moe_scheme(layer_config, semantics, layer=prefix, float_dtype=float_dtype)
    _warn_per_tensor_dynamic(scheme)
    if expert_map is not None:
        expert_map = check_expert_map(expert_map, arch.num_experts)
    num_local = arch.num_experts if expert_map is None else int(expert_map.max()) + 1
    shape = MoEShape(
        num_local,
        arch.hidden_size,
        arch.intermediate_size,
        has_bias=_has_bias(reader, prefix, indexed=True),
        interleaved=arch.interleaved,
    )
    return block, prefix, scheme, shape, expert_map


@exclude_match_budget()  # one budget for every re: exclude pattern of the whole description
def inspect_checkpoint(path: str | pathlib.Path, *, semantics: str = "vllm") -> dict[str, Any]:
    """Describe a checkpoint without reading tensor data: architecture, and per MoE layer the scheme, the
    parameter bytes, the padding, or why it is refused. Used by ``quarkmoe inspect``."""
    hf_config = read_hf_config(path)
    arch = MoEArchitecture.from_hf_config(hf_config)
    quark = QuarkConfig.from_hf_config(hf_config) if "quantization_config" in hf_config else None
    described = dataclasses.asdict(arch)
    described.update(described.pop("routing"))  # one flat dict: sizes, routing and expert settings
    report: dict[str, Any] = {"architecture": described, "quantized": quark is not None, "layers": {}}
    with CheckpointReader(path) as reader:
        for layer in arch.moe_layers:
            entry: dict[str, Any] = {}
            try:
                block, prefix, scheme, shape, _ = _layer_setup(reader, arch, quark, layer, semantics, None)
                specs, plan = plan_experts(reader, prefix, scheme, shape, num_global_experts=arch.num_experts)
                check_expert_headers(reader, specs, plan, scheme)
                for name, expected in _router_tensors(reader, arch, block).items():
                    _check_float_header(reader, name, expected)
                if arch.has_shared_experts:
                    shared_prefix, shared_scheme, shared_shape = _shared_setup(reader, arch, block, quark, semantics)
                    shared_specs, shared_plan = plan_experts(
                        reader, shared_prefix, shared_scheme, shared_shape, num_global_experts=1, indexed=False
                    )
                    check_expert_headers(reader, shared_specs, shared_plan, shared_scheme)
                cfg = scheme.quant_config()
                entry.update(
                    prefix=prefix,
                    scheme=scheme.name,
                    vllm_method=scheme.vllm_method,
                    weight=dataclasses.asdict(cfg.weight),
                    activation=dataclasses.asdict(cfg.activation),
                    expert_bytes=int(sum(np.prod(p.shape) * p.dtype.itemsize for p in specs.values())),
                    hidden_size=[shape.hidden_size, scheme.padded_hidden],
                    intermediate_size=[shape.intermediate_size, scheme.padded_intermediate],
                )
                if arch.has_shared_experts:
                    entry["shared_experts"] = arch.names.shared_experts(block)
            except (CheckpointError, ValueError) as e:
                entry["refused"] = str(e)
            report["layers"][layer] = entry
    return report


def check_checkpoint_headers(path: str | pathlib.Path, *, semantics: str = "vllm") -> None:
    """Raise the first refusal :func:`inspect_checkpoint` finds (a tensor's name, dtype or shape that disagrees
    with config.json), as a :class:`CheckpointError` naming the layer; headers only, no tensor data read.
    ``quarkmoe quantize`` runs it on its float input before it writes anything."""
    report = inspect_checkpoint(path, semantics=semantics)
    for layer, entry in report["layers"].items():
        if "refused" in entry:
            raise CheckpointError(f"{path}: MoE layer {layer}: {entry['refused']}")


@exclude_match_budget()  # joins a caller's (a whole model's load) or opens one
def load_moe_block(
    path: str | pathlib.Path,
    layer: int,
    *,
    semantics: str = "vllm",
    expert_map=None,
    progress: bool | None = None,
    experts_loader: Callable | None = None,
    shared_loader: Callable | None = None,
    float_dtype=None,
) -> LoadedMoEBlock:
    """Load MoE block ``layer`` (router, routed experts, shared experts) from a checkpoint folder.

    ``experts_loader(reader, prefix, scheme, shape, num_global_experts)`` and ``shared_loader(reader,
    prefix, scheme, shape)`` replace :func:`load_experts` for the routed and the shared experts (the sharded
    loader of :mod:`quarkmoe_jax.checkpoint.sharded_loading` passes its per-shard loads); ``shape`` then
    holds global sizes.
    ``float_dtype``: the dtype of unquantized experts (default bfloat16).
    """
    hf_config = read_hf_config(path)
    arch = MoEArchitecture.from_hf_config(hf_config)
    arch.check_moe_layer(layer)
    quark = QuarkConfig.from_hf_config(hf_config) if "quantization_config" in hf_config else None
    with CheckpointReader(path) as reader:
        block, prefix, scheme, shape, expert_map = _layer_setup(
            reader, arch, quark, layer, semantics, expert_map, float_dtype
        )
        if experts_loader is not None:
            experts = experts_loader(reader, prefix, scheme, shape, arch.num_experts)
        else:
            experts = load_experts(
                reader,
                prefix,
                scheme,
                shape,
                num_global_experts=arch.num_experts,
                expert_map=expert_map,
                progress=progress,
            )
        router = {name: _float(reader, name, shape) for name, shape in _router_tensors(reader, arch, block).items()}
        names = arch.names
        loaded = LoadedMoEBlock(arch, layer, block, experts, router[names.router_tensor(block)])
        loaded.router_bias = router.get(names.router_tensor(block, "bias"))
        loaded.correction_bias = router.get(names.router_tensor(block, CORRECTION_BIAS))
        if arch.has_shared_experts:
            shared_prefix, shared_scheme, shared_shape = _shared_setup(
                reader, arch, block, quark, semantics, float_dtype
            )
            if shared_loader is not None:
                loaded.shared = shared_loader(reader, shared_prefix, shared_scheme, shared_shape)
            else:
                loaded.shared = load_experts(
                    reader, shared_prefix, shared_scheme, shared_shape, num_global_experts=1, indexed=False
                )
        if arch.has_shared_expert_gate:
            loaded.shared_gate_weight = router[names.shared_gate_tensor(block)]
    return loaded


def _shared_setup(
    reader, arch: MoEArchitecture, block: str, quark: QuarkConfig | None, semantics: str, float_dtype=None
):
    """Prefix, scheme and shape of a block's shared expert(s) (no data read)."""
    prefix = arch.names.shared_experts(block)
    return dense_mlp_setup(
        reader, prefix, arch.hidden_size, arch.shared_intermediate_size, quark, semantics, float_dtype
    )


def load_dense_mlp(
    reader: CheckpointReader,
    prefix: str,
    hidden_size: int,
    intermediate_size: int,
    quark: QuarkConfig | None,
    semantics: str = "vllm",
    float_dtype=None,
) -> LoadedExperts:
    """A dense gated MLP (``<prefix>.{gate_proj,up_proj,down_proj}``) as one expert: a shared expert, or
    the MLP of a model's non-MoE layers, quantized as the checkpoint's config says for those Linear layers."""
    prefix, scheme, shape = dense_mlp_setup(
        reader, prefix, hidden_size, intermediate_size, quark, semantics, float_dtype
    )
    return load_experts(reader, prefix, scheme, shape, num_global_experts=1, indexed=False)


def dense_mlp_setup(
    reader, prefix: str, hidden: int, intermediate: int, quark: QuarkConfig | None, semantics: str, float_dtype=None
):
    """Prefix, scheme and one-expert shape of the dense gated MLP under ``prefix`` (headers only)."""
    configs = []
    for shard in ("w1", "w3", "w2"):
        name = linear_name(prefix, HF_PROJECTIONS[shard])
        configs.append(quark.resolve(name, "Linear", child_names=[name]) if quark else None)
    if any(c != configs[0] for c in configs):
        raise CheckpointError(f"{prefix}: gate/up/down projections resolve to different quantization configs")
    scheme = get_moe_scheme(configs[0], semantics, layer=prefix, float_dtype=float_dtype)
    shape = MoEShape(1, hidden, intermediate, has_bias=_has_bias(reader, prefix, indexed=False))
    return prefix, scheme, shape
