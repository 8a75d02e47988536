"""How a checkpoint would spread over ``devices`` accelerators, from ``config.json`` and the safetensors headers
alone (no tensor data is read): the bytes on the busiest device for every expert x tensor parallel layout, the
KV cache each device holds per token, the room left for it and whether the layout fits (``quarkmoe plan``;
docs/distributed.md, "Planning a multi-device run").

Every tensor is put in one :data:`CATEGORIES` entry by its name and split as the sharded layer
(docs/distributed.md) and vLLM split it:

* routed experts: over the ``expert`` axis by vLLM's ``linear`` placement (the busiest shard holds
  ``ceil(E / ep)`` experts) and over the ``tensor`` axis by ``I``, in slices of ``ceil(I / tp)`` rounded up to
  32 (the per-shard loader's :class:`~quarkmoe_jax.checkpoint.loader.IntermediateSlice`, zero padding
  counted); per-tensor values, w2's per-channel scales and its bias stay whole;
* shared experts and the dense MLPs of non-MoE layers: the same ``I`` slices over ``tensor``, replicated over
  ``expert``;
* attention: query heads split over ``tensor`` (``q_proj`` / ``q_b_proj`` / ``kv_b_proj`` rows, ``o_proj``
  columns, gpt-oss's sinks), key / value heads too, replicated once there are fewer of them than devices (vLLM's
  ``QKVParallelLinear``); DeepSeek's latent down-projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and every
  norm replicated;
* embeddings and the LM head: vocab-parallel, the vocabulary padded to a multiple of 64 (vLLM's
  ``VocabParallelEmbedding``) then cut in ``tp`` parts;
* everything else (norms, routers, the correction bias, the shared expert gate) replicated;
* tensors of decoder layers past ``num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layer):
  ``unused``, on no device.

Bytes are the checkpoint's (its dtypes, as the headers state them): what loading converts (float weights to
the model's dtype, kernel layouts) is not modelled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import pathlib
from collections.abc import Callable

import ml_dtypes
import numpy as np

from quarkmoe_jax.checkpoint.architectures import (
    DEFAULT_CONTEXT,
    PROJECTIONS,
    SUFFIXES,
    MoEArchitecture,
    check_layers_present,
    dense_mlp,
    family_of,
    layer_of,
    parse_projection_tensor,
    split_tensor_name,
)
from quarkmoe_jax.checkpoint.loader import IntermediateSlice, read_hf_config
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader
from quarkmoe_jax.formats import MX_FORMATS, round_up
from quarkmoe_jax.moe.sharding import TP_ALIGN, placement_expert_map

__all__ = ["CATEGORIES", "VOCAB_PADDING", "Layout", "Plan", "plan_checkpoint", "split_problem"]

CATEGORIES = (
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "attention",
    "embeddings",
    "lm_head",
    "replicated",
    "unused",
)
"""The parts of a checkpoint, in the order they are reported."""
VOCAB_PADDING = 64
"""The vocabulary is padded to a multiple of this before it is split (vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``)."""

_EMBEDDINGS = "model.embed_tokens."
_LM_HEAD = "lm_head."
_ATTENTION = ".self_attn."
#: attention tensors split over the tensor axis: by query heads along the output rows (column-parallel), by
#: key / value heads along the rows, by query heads along the input columns (row-parallel), per query head.
_COLUMN_BY_HEADS = ("q_proj", "q_b_proj", "kv_b_proj")
_COLUMN_BY_KV_HEADS = ("k_proj", "v_proj")
_ROW_BY_HEADS = ("o_proj",)
_PER_HEAD = ("sinks",)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to spread the model over the devices: ``expert`` x ``tensor`` = the device count (data 1).

    Attributes:
      expert: devices along the ``expert`` axis (EP).
      tensor: devices along the ``tensor`` axis (TP).
      weight_bytes: bytes of checkpoint tensors on the busiest device (padding included).
      category_bytes: ``weight_bytes`` by :data:`CATEGORIES` entry.
      kv_bytes_per_token: KV cache bytes one token of one sequence takes on each device (all layers).
      room_bytes: ``device memory x memory_fraction - weight_bytes`` (negative: the weights do not fit); None
        without a device memory.
      room_tokens: tokens of KV cache that room holds (0 when negative); None without a device memory.
      fits: the weights fit and at least one whole context of KV cache does, and the layout can run
        (``problem`` is None); None without a device memory.
      problem: why vLLM could not run this layout (heads or vocabulary that do not split evenly), else None.
    """

    expert: int
    tensor: int
    weight_bytes: int
    category_bytes: dict[str, int]
    kv_bytes_per_token: int
    room_bytes: int | None
    room_tokens: int | None
    fits: bool | None
    problem: str | None

    @property
    def name(self) -> str:
        return f"EP {self.expert} x TP {self.tensor}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`plan_checkpoint` found.

    Attributes:
      path: the checkpoint.
      model_type, num_layers, moe_layers (their count), num_experts: from config.json.
      num_tensors: tensors in the headers.
      total_bytes: the data bytes of every tensor, the sum of ``category_bytes``.
      category_bytes: the whole checkpoint's bytes by :data:`CATEGORIES` entry.
      devices, device_memory_bytes, memory_fraction: as asked; ``usable_bytes`` = their product (floored), None
        without a device memory.
      context, context_source: the positions one sequence may hold, and where that number comes from.
      kv_dtype: the KV cache's dtype.
      layouts: one :class:`Layout` per ``expert x tensor`` split of the devices, from all expert parallel
        (``EP devices x TP 1``) to all tensor parallel.
    """

    path: str
    model_type: str
    num_layers: int
    moe_layers: int
    num_experts: int
    num_tensors: int
    total_bytes: int
    category_bytes: dict[str, int]
    devices: int
    device_memory_bytes: int | None
    memory_fraction: float
    usable_bytes: int | None
    context: int
    context_source: str
    kv_dtype: str
    layouts: tuple[Layout, ...]

    def for_memory(self, device_memory_bytes: int | None, memory_fraction: float | None = None) -> Plan:
        """This plan for devices of ``device_memory_bytes`` bytes each (None: bytes only, no room or fit), with
        ``memory_fraction`` of it (default: this plan's) for weights and KV cache: room, tokens and fit
        recomputed, nothing read again."""
        memory, fraction = _memory(
            device_memory_bytes, self.memory_fraction if memory_fraction is None else memory_fraction
        )
        usable = None if memory is None else math.floor(memory * fraction)
        layouts = []
        for layout in self.layouts:
            room = tokens = fits = None
            if usable is not None:
                room = usable - layout.weight_bytes
                tokens = max(room, 0) // layout.kv_bytes_per_token if layout.kv_bytes_per_token else 0
                fits = layout.problem is None and room >= 0 and tokens >= self.context
            layouts.append(dataclasses.replace(layout, room_bytes=room, room_tokens=tokens, fits=fits))
        return dataclasses.replace(
            self,
            device_memory_bytes=memory,
            memory_fraction=fraction,
            usable_bytes=usable,
            layouts=tuple(layouts),
        )

    def layout(self, expert: int, tensor: int) -> Layout:
        """The layout ``EP expert x TP tensor``."""
        for layout in self.layouts:
            if (layout.expert, layout.tensor) == (expert, tensor):
                return layout
        raise KeyError(f"no layout EP {expert} x TP {tensor} of {self.devices} devices")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _memory(device_memory_bytes, memory_fraction) -> tuple[int | None, float]:
    if device_memory_bytes is not None:
        device_memory_bytes = _positive_int(device_memory_bytes, "device_memory_bytes")
    if (
        isinstance(memory_fraction, bool)
        or not isinstance(memory_fraction, numbers.Real)
        or not 0 < memory_fraction <= 1
    ):
        raise ValueError(f"memory_fraction must be a number in (0, 1], got {memory_fraction!r}")
    return device_memory_bytes, float(memory_fraction)


def _kv_dtype(kv_dtype) -> np.dtype:
    """A float dtype from a name (``"bfloat16"``, ``"float8_e4m3fn"``, ``"float16"``, ...) or a dtype."""
    try:
        dtype = np.dtype(getattr(ml_dtypes, kv_dtype, kv_dtype) if isinstance(kv_dtype, str) else kv_dtype)
        ml_dtypes.finfo(dtype)  # a float type
    except (TypeError, ValueError):
        raise ValueError(
            f"kv_dtype must name a float dtype (e.g. bfloat16, float16, float32), got {kv_dtype!r}"
        ) from None
    return dtype


@dataclasses.dataclass(frozen=True)
class _Attention:
    """The attention sizes config.json gives (read as :class:`~quarkmoe_jax.models.DecoderConfig` reads them)."""

    heads: int
    kv_heads: int
    head_dim: int
    latent: int | None  # latent attention: kv_lora_rank + qk_rope_head_dim values per layer and position
    max_positions: int | None

    @classmethod
    def from_config(cls, config: dict, arch: MoEArchitecture) -> _Attention:
        family = family_of(config)
        c = family.reader(config)
        heads = c.integer("num_attention_heads")
        latent = None
        if family.attention == "mla":
            kv_heads, head_dim = heads, c.integer("qk_nope_head_dim") + c.integer("qk_rope_head_dim")
            latent = c.integer("kv_lora_rank") + c.integer("qk_rope_head_dim")
        else:
            kv_heads = c.integer("num_key_value_heads", heads, maximum=heads)
            head_dim = c.integer("head_dim", arch.hidden_size // heads)
            if head_dim < 1:
                raise CheckpointError(
                    f"config.json: hidden_size = {arch.hidden_size} over num_attention_heads = {heads} leaves no "
                    "head_dim (set head_dim)"
                )
        return cls(heads, kv_heads, head_dim, latent, c.integer("max_position_embeddings", None))

    def heads_here(self, tp: int) -> int:
        return -(-self.heads // tp)

    def kv_heads_here(self, tp: int) -> int:
        """Key / value heads per device: split, or one (replicated) once there are fewer than devices."""
        return max(1, -(-self.kv_heads // tp))

    def kv_values_per_token(self, num_layers: int, tp: int) -> int:
        """KV cache values one position takes on one device: keys and values of its KV heads per layer (the
        latent cache of latent attention, replicated over the tensor axis)."""
        if self.latent is not None:
            return num_layers * self.latent
        return num_layers * 2 * self.kv_heads_here(tp) * self.head_dim


def split_problem(tp: int, heads: int, kv_heads: int, vocab_rows: int | None, latent: bool) -> str | None:
    """Why vLLM cannot split a model over ``tp`` tensor shards (None: it can): query heads that do not divide by
    ``tp``; key / value heads (not of latent attention) that neither divide by ``tp`` nor divide it; a
    vocabulary padded to :data:`VOCAB_PADDING` that does not divide by ``tp``. What ``quarkmoe plan`` marks and
    ``from_pretrained(mesh=)`` refuses."""
    if heads % tp:
        return f"{heads} attention heads do not split over TP {tp}"
    if not latent and (kv_heads % tp if kv_heads >= tp else tp % kv_heads):
        return f"{kv_heads} KV heads do not split over (or replicate evenly to) TP {tp}"
    padded = None if vocab_rows is None else round_up(vocab_rows, VOCAB_PADDING)
    if padded is not None and padded % tp:
        return f"the vocabulary ({vocab_rows}, padded to {padded}) does not split over TP {tp}"
    return None


def _nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _cut(dtype: np.dtype, shape: tuple[int, ...], axis: int, parts: int, parts_here: int) -> int:
    """Bytes of ``shape`` with ``axis`` cut to the share ``parts_here / parts`` of its length (rounded up)."""
    if not shape:
        return dtype.itemsize
    shape = list(shape)
    shape[axis] = -(-shape[axis] * parts_here // parts)
    return _nbytes(dtype, tuple(shape))


@functools.lru_cache(maxsize=4096)
def _sliced_bytes(
    shard: str, suffix: str, dtype: np.dtype, shape: tuple[int, ...], total: int, mx_bits, tp: int
) -> int:
    """Bytes of one expert's checkpoint tensor on a tensor shard of ``ceil(total / tp)`` channels of ``I``
    rounded up to 32: the per-shard loader's own narrowing (vLLM's) of a stand-in with the header's dtype and
    shape (zero-stride: no data), padding included."""
    if tp == 1:
        return _nbytes(dtype, shape)
    size = round_up(-(-total // tp), TP_ALIGN)
    stand_in = np.broadcast_to(np.zeros((), dtype), shape)
    return int(IntermediateSlice(0, size, total, mx_bits).narrow(stand_in, shard, suffix).size) * dtype.itemsize


_MX_BITS = sorted({fmt.bits for fmt in MX_FORMATS.values()})


@dataclasses.dataclass
class _Tensors:
    """The checkpoint's tensors, classified: header bytes by category; ``split[category]`` one function of the
    tensor parallel size per non-routed tensor (its bytes on a device). The routed experts' tensors: the
    distinct one-expert slices ``slices`` (:func:`_sliced_bytes`'s arguments but ``tp``), and per tensor its
    expert (-1: a tensor of all experts, one slice per expert) and its slice's index."""

    category_bytes: dict[str, int]
    split: dict[str, list[Callable[[int], int]]]
    slices: dict[tuple, int]
    routed: list[tuple[int, int]]
    vocab_rows: int | None
    count: int

    def routed_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(experts, slice indices)``, int64 ``[routed tensors]`` each."""
        table = np.array(self.routed, np.int64).reshape(-1, 2)
        return table[:, 0], table[:, 1]


def _classify(reader: CheckpointReader, config: dict, arch: MoEArchitecture, attention: _Attention) -> _Tensors:
    names = arch.names
    moe_layers = set(arch.moe_layers)
    dense_size = None
    tensors = _Tensors({c: 0 for c in CATEGORIES}, {c: [] for c in CATEGORIES}, {}, [], None, 0)
    experts_seen: dict[int, set[int | None]] = {}

    def mx_bits(name: str, linear_weight: str, contraction: int):
        """The MX element width of a w2 projection (None if its scales are not E8M0), for the ``I`` slices."""
        scale = f"{split_tensor_name(linear_weight)[0]}.weight_scale"
        if scale not in reader or reader.info(scale)[0] != np.uint8:
            return None
        if linear_weight not in reader:
            raise CheckpointError(f"{reader.path}: {name} has E8M0 scales but no {linear_weight!r}")
        columns = reader.info(linear_weight)[1][-1:] or (0,)
        for bits in _MX_BITS:
            if contraction * bits // 8 == columns[0]:
                return bits
        raise CheckpointError(
            f"{reader.path}: {linear_weight}: {columns[0]} packed columns are no MX packing of {contraction} "
            f"intermediate channels ({', '.join(f'{b} bits: {contraction * b // 8}' for b in _MX_BITS)})"
        )

    def expert_slice(tensor, dtype, shape, total: int) -> Callable[[int], int]:
        bits = None
        if tensor.shard == "w2" and tensor.suffix in ("weight", "weight_scale"):
            weight = tensor.name if tensor.suffix == "weight" else f"{split_tensor_name(tensor.name)[0]}.weight"
            bits = mx_bits(tensor.name, weight, total)
        return functools.partial(_sliced_bytes, tensor.shard, tensor.suffix, dtype, shape, total, bits)

    groups: dict[int, tuple[tuple[str, str, bool], ...]] = {}

    def expert_group(name: str, layer: int) -> tuple[str, bool] | None:
        """``(prefix, shared)`` of the routed or shared experts of layer ``layer`` that ``name`` lies under."""
        if layer not in groups:
            blocks = names.blocks(layer)
            found = [(names.experts(b), False) for b in blocks]
            found += [(names.shared_experts(b), True) for b in blocks] if names.shared else []
            groups[layer] = tuple((prefix + ".", prefix, shared) for prefix, shared in found)
        return next(((prefix, shared) for dotted, prefix, shared in groups[layer] if name.startswith(dotted)), None)

    for name in reader:
        dtype, shape = reader.info(name)
        nbytes = _nbytes(dtype, shape)
        tensors.count += 1
        layer = layer_of(name)
        category, per_device = "replicated", functools.partial(_whole, nbytes)
        if layer is not None and layer >= arch.num_layers:
            category, per_device = "unused", _nothing
        elif layer is not None and (group := expert_group(name, layer)) is not None:
            prefix, shared = group
            parsed = parse_projection_tensor(name, prefix, indexed=not shared)
            if parsed is None:
                raise CheckpointError(
                    f"{reader.path}: unexpected tensor {name!r} under {prefix!r}; expected "
                    f"{prefix}.[<expert>.]<projection>.<suffix> with projection in {sorted(PROJECTIONS)} and suffix "
                    f"in {list(SUFFIXES)}"
                )
            if layer not in moe_layers:
                raise CheckpointError(
                    f"{reader.path}: {name}: an expert tensor in layer {layer}, which config.json makes a dense "
                    "(non-MoE) layer"
                )
            if shared:
                category = "shared_experts"
                per_device = expert_slice(parsed, dtype, shape, arch.shared_intermediate_size)
            else:
                tensors.category_bytes["routed_experts"] += nbytes
                expert, size = _routed(reader, parsed, dtype, shape, arch, expert_slice)
                experts_seen.setdefault(layer, set()).add(expert)
                index = tensors.slices.setdefault(size.args, len(tensors.slices))
                tensors.routed.append((-1 if expert is None else expert, index))
                continue
        elif (
            layer is not None
            and layer not in moe_layers
            and (dense := parse_projection_tensor(name, dense_mlp(layer), indexed=False))
        ):
            if dense_size is None:
                dense_size = family_of(config).reader(config).integer("intermediate_size")
            category, per_device = "dense_mlp", expert_slice(dense, dtype, shape, dense_size)
        elif layer is not None and _ATTENTION in name:
            category, per_device = "attention", _attention_split(name, dtype, shape, attention)
        elif name.startswith((_EMBEDDINGS, _LM_HEAD)):
            category = "embeddings" if name.startswith(_EMBEDDINGS) else "lm_head"
            if shape:
                per_device = functools.partial(_vocab_split, dtype, shape)
                if name == f"{_EMBEDDINGS}weight":
                    tensors.vocab_rows = shape[0]
        tensors.category_bytes[category] += nbytes
        tensors.split[category].append(per_device)
    for layer in sorted(moe_layers):
        seen = experts_seen.get(layer, set())
        if None in seen:  # tensors of all experts at once
            continue
        if not seen:
            raise CheckpointError(
                f"{reader.path}: MoE layer {layer} has no routed expert tensors (expected "
                f"{names.experts(names.block(layer))}.<expert>.<projection>.<suffix> or all-expert tensors)"
            )
        absent = [e for e in range(arch.num_experts) if e not in seen]
        if absent:
            raise CheckpointError(
                f"{reader.path}: MoE layer {layer} holds tensors of {len(seen)} of the config's {arch.num_experts} "
                f"experts; none of expert(s) {absent[:8]}"
            )
    return tensors


def _whole(nbytes: int, tp: int) -> int:
    return nbytes


def _nothing(tp: int) -> int:
    return 0


def _routed(reader, parsed, dtype, shape, arch: MoEArchitecture, expert_slice):
    """``(expert, bytes of one expert's slice as a function of tp)``; expert None: a tensor holding every
    expert (leading expert axis), its one-expert slice."""
    if parsed.expert is not None:
        if parsed.expert >= arch.num_experts:
            raise CheckpointError(
                f"{reader.path}: {parsed.name}: expert index {parsed.expert} out of range for the config's "
                f"{arch.num_experts} experts"
            )
        return parsed.expert, expert_slice(parsed, dtype, shape, arch.intermediate_size)
    if not shape or shape[0] != arch.num_experts:
        raise CheckpointError(
            f"{reader.path}: {parsed.name}: expected a leading expert axis of {arch.num_experts} (the config's "
            f"expert count), found shape {tuple(shape)}"
        )
    one = tuple(shape[1:])
    if parsed.transposed and len(one) == 2:  # transformers' [in, out]: the same bytes as [out, in]
        one = one[::-1]
    return None, expert_slice(parsed, dtype, one, arch.intermediate_size)


def _attention_split(name: str, dtype: np.dtype, shape: tuple[int, ...], attention: _Attention):
    projection = name.split(_ATTENTION, 1)[1].split(".", 1)[0]
    heads, kv = attention.heads, attention.kv_heads
    if projection in _COLUMN_BY_HEADS + _PER_HEAD and shape:
        return lambda tp: _cut(dtype, shape, 0, heads, attention.heads_here(tp))
    if projection in _COLUMN_BY_KV_HEADS and shape:
        return lambda tp: _cut(dtype, shape, 0, kv, attention.kv_heads_here(tp))
    if projection in _ROW_BY_HEADS and len(shape) >= 2:  # weight and MX scales: input columns; bias whole
        return lambda tp: _cut(dtype, shape, len(shape) - 1, heads, attention.heads_here(tp))
    return functools.partial(_whole, _nbytes(dtype, shape))


def _vocab_split(dtype: np.dtype, shape: tuple[int, ...], tp: int) -> int:
    padded = round_up(shape[0], VOCAB_PADDING)
    return _nbytes(dtype, (-(-padded // tp), *shape[1:]))


def plan_checkpoint(
    path: str | os.PathLike,
    devices: int,
    device_memory_bytes: int | None = None,
    *,
    max_model_len: int | None = None,
    kv_dtype="bfloat16",
    memory_fraction: float = 0.9,
) -> Plan:
    """Plan a checkpoint over ``devices`` devices from config.json and the safetensors headers (no tensor data
    is read; the module docstring says how each part splits).

    Args:
      path: the checkpoint folder (config.json + safetensors shards).
      devices: the device count; every ``expert x tensor = devices`` layout is planned (data parallel 1).
      device_memory_bytes: one device's memory in bytes; None plans bytes only (no room, no fit).
      max_model_len: positions one sequence must be able to hold (default: the config's
        ``max_position_embeddings``, else :data:`DEFAULT_CONTEXT`).
      kv_dtype: the KV cache's dtype (a name such as ``"bfloat16"`` or a numpy / ml_dtypes dtype).
      memory_fraction: the share of a device's memory for weights and KV cache, in (0, 1] (the rest is for
        activations and the runtime, as vLLM's ``gpu_memory_utilization``).

    Returns:
      :class:`Plan`: bytes in bytes, KV cache per token in bytes, room in bytes and tokens.

    Raises:
      ValueError: an argument out of range (naming it).
      CheckpointError: a config.json or header the reader refuses, a config.json that claims layers or experts
        the headers lack (naming the file and the tensor).
    """
    devices = _positive_int(devices, "devices")
    device_memory_bytes, memory_fraction = _memory(device_memory_bytes, memory_fraction)
    if max_model_len is not None:
        max_model_len = _positive_int(max_model_len, "max_model_len")
    kv = _kv_dtype(kv_dtype)
    config = read_hf_config(path)
    arch = MoEArchitecture.from_hf_config(config)
    attention = _Attention.from_config(config, arch)
    if max_model_len is not None:
        context, source = max_model_len, "max_model_len"
    elif attention.max_positions is not None:
        context, source = attention.max_positions, "max_position_embeddings in config.json"
    else:
        context, source = DEFAULT_CONTEXT, "config.json gives no max_position_embeddings"
    with CheckpointReader(path) as reader:
        check_layers_present(reader, arch.num_layers)
        tensors = _classify(reader, config, arch, attention)
    routed = tensors.routed_arrays()
    layouts = []
    for tp in (t for t in range(1, devices + 1) if devices % t == 0):
        ep = devices // tp
        by_category = {c: sum(f(tp) for f in tensors.split[c]) for c in CATEGORIES}
        by_category["routed_experts"] = _busiest_expert_shard(tensors, routed, arch.num_experts, ep, tp)
        weights = sum(by_category.values())
        kv_per_token = attention.kv_values_per_token(arch.num_layers, tp) * kv.itemsize
        latent = attention.latent is not None
        problem = split_problem(tp, attention.heads, attention.kv_heads, tensors.vocab_rows, latent)
        layouts.append(Layout(ep, tp, weights, by_category, kv_per_token, None, None, None, problem))
    bytes_only = Plan(
        path=str(pathlib.Path(path)),
        model_type=arch.model_type,
        num_layers=arch.num_layers,
        moe_layers=len(arch.moe_layers),
        num_experts=arch.num_experts,
        num_tensors=tensors.count,
        total_bytes=sum(tensors.category_bytes.values()),
        category_bytes=tensors.category_bytes,
        devices=devices,
        device_memory_bytes=None,
        memory_fraction=memory_fraction,
        usable_bytes=None,
        context=context,
        context_source=source,
        kv_dtype=kv.name,
        layouts=tuple(layouts),
    )
    return bytes_only.for_memory(device_memory_bytes, memory_fraction)


def _busiest_expert_shard(tensors: _Tensors, routed, num_experts: int, ep: int, tp: int) -> int:
    """The routed experts' bytes on the busiest expert shard: vLLM's linear placement, each shard's experts'
    ``I`` slices (every tensor shard of an expert shard holds as many bytes: the slices are padded alike).
    ``routed``: :meth:`_Tensors.routed_arrays`."""
    experts, indices = routed
    sizes = np.array([_sliced_bytes(*args, tp) for args in tensors.slices], np.int64)
    one = experts >= 0
    per_expert = np.zeros(num_experts, np.int64)
    np.add.at(per_expert, experts[one], sizes[indices[one]])
    per_expert += sizes[indices[~one]].sum()  # tensors of all experts: one slice each
    return max(int(per_expert[placement_expert_map("linear", num_experts, ep, rank) >= 0].sum()) for rank in range(ep))
