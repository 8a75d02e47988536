"""Model families read from a Hugging Face ``config.json``: sizes, routing, attention kind, checkpoint tensor
names.

Supported ``model_type`` values: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``deepseek_v2``, ``deepseek_v3``,
``gpt_oss``. Each is one :class:`ModelFamily` in :data:`FAMILIES` (config reading with both transformers
spellings, the decoder's defaults, tensor names, routing, attention kind, the synthetic model's config); no
other module branches on a ``model_type``.

This module is the one place that knows how MoE tensors are named in a checkpoint; the loader, the exporter
and the synthetic checkpoints make and read every expert, router and shared-expert name through it. The
names of decoder layer ``L`` (``<block>`` is ``model.layers.L.<block name>``, see :class:`TensorNames`):

* routed experts: ``<block>.experts.<e>.<projection>.<suffix>``, or ``<block>.experts.<projection>.<suffix>``
  for one tensor holding all experts (leading expert axis);
* transformers' own layout (gpt-oss): ``<block>.experts.{gate_up_proj|down_proj}`` ``[E, in, out]``
  (input-major, read transposed) and ``<block>.experts.{gate_up_proj|down_proj}_bias``;
* shared expert(s): ``<block>.<shared>.<projection>.<suffix>`` (a dense gated MLP);
* router: ``<block>.<router>.{weight|bias|e_score_correction_bias}``; shared-expert gate:
  ``<block>.<shared_gate>.weight``;
* the dense MLP of a non-MoE layer: ``model.layers.L.mlp.<projection>.<suffix>``.

``<projection>`` is any spelling of :data:`PROJECTIONS` (Quark keeps the float checkpoint's), ``<suffix>`` one
of :data:`SUFFIXES`. Expert tensors are looked up under several blocks because Quark writes Mixtral under
``block_sparse_moe`` or ``mlp`` depending on the transformers version it ran with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError
from quarkmoe_jax.moe.routing import RoutingConfig

__all__ = [
    "DEFAULT_CONTEXT",
    "ModelFamily",
    "FAMILIES",
    "NO_SLIDING",
    "family_of",
    "ConfigReader",
    "MAX_LAYERS",
    "MAX_INT32",
    "MAX_ACTIVATION_SCALE",
    "MoEArchitecture",
    "SUPPORTED_MODEL_TYPES",
    "TensorNames",
    "ProjectionTensor",
    "PROJECTIONS",
    "HF_PROJECTIONS",
    "PROJECTION_SPELLINGS",
    "SUFFIXES",
    "CORRECTION_BIAS",
    "decoder_layer",
    "layer_of",
    "check_layers_present",
    "dense_mlp",
    "linear_name",
    "tensor_name",
    "split_tensor_name",
    "dense_tensor",
    "parse_projection_tensor",
]

DEFAULT_CONTEXT = 2048
"""The context of a model whose config has no ``max_position_embeddings`` and whose caller set no
``max_model_len`` (vLLM's assumption for such a config); the models and ``quarkmoe plan`` both take it."""

# ------------------------------------------------------------------------------------ checkpoint tensor names

#: checkpoint projection spelling -> shard ("w13" = fused gate+up).
PROJECTIONS = {
    "gate_proj": "w1",
    "w1": "w1",
    "up_proj": "w3",
    "w3": "w3",
    "down_proj": "w2",
    "w2": "w2",
    "gate_up_proj": "w13",
    "w13": "w13",
}
#: transformers' spelling of each shard: dense MLPs, shared experts, all-expert tensors, gpt-oss's experts.
HF_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "w13": "gate_up_proj"}
#: the accepted spellings, as error messages list them.
PROJECTION_SPELLINGS = "gate_proj/up_proj/down_proj, w1/w3/w2 or gate_up_proj"
#: the tensors of one projection, ``<projection>.<suffix>``.
SUFFIXES = ("weight", "weight_scale", "input_scale", "weight_zero_point", "input_zero_point", "bias")
#: DeepSeek-V3's selection bias, ``<router>.e_score_correction_bias [E]`` (``noaux_tc`` routing).
CORRECTION_BIAS = "e_score_correction_bias"

_DECODER_LAYER = "model.layers.{layer}"
_LAYER_PATTERN = re.escape(_DECODER_LAYER).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
_LAYER_OF = re.compile(rf"^{_LAYER_PATTERN}\.")
_MLP = "mlp"  # a decoder layer's MLP, dense or MoE
_EXPERTS = "experts"
#: transformers' own all-expert tensors: ``<projection>`` (weight, input-major) or ``<projection>_bias``.
_NATIVE = re.compile(rf"^(?P<projection>{HF_PROJECTIONS['w13']}|{HF_PROJECTIONS['w2']})(?P<bias>_bias)?$")
_INDEXED = re.compile(r"^(?:(?P<expert>\d+)\.)?(?P<projection>[A-Za-z0-9_]+)\.(?P<suffix>[A-Za-z_]+)$")
_NOT_INDEXED = re.compile(r"^(?P<projection>[A-Za-z0-9_]+)\.(?P<suffix>[A-Za-z_]+)$")


def decoder_layer(layer: int) -> str:
    """``model.layers.<layer>``: the prefix of every tensor of decoder layer ``layer``."""
    return _DECODER_LAYER.format(layer=layer)


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``model.layers.<layer>.…``), or None (embeddings, head)."""
    match = _LAYER_OF.match(name)
    return int(match["layer"]) if match else None


def check_layers_present(names: Iterable[str], num_layers: int) -> None:
    """Raise :class:`CheckpointError` unless every decoder layer ``0 .. num_layers - 1`` has a tensor among
    ``names`` (a config.json that claims more layers than the checkpoint holds is refused before any data is
    read; layers beyond the count, such as DeepSeek-V3's multi-token-prediction layer, are ignored)."""
    present = {layer_of(name) for name in names}
    missing = tuple(i for i in range(num_layers) if i not in present)
    if missing:
        raise CheckpointError(
            f"config.json: num_hidden_layers = {num_layers}, but the checkpoint holds no tensors of layer(s) "
            f"{_ranges(missing)}"
        )


def dense_mlp(layer: int) -> str:
    """``model.layers.<layer>.mlp``: the dense gated MLP of a decoder layer that is not a MoE layer."""
    return f"{decoder_layer(layer)}.{_MLP}"


def linear_name(prefix: str, projection: str, expert: int | None = None) -> str:
    """``<prefix>.[<expert>.]<projection>``: one Linear layer (the name Quark's config and ``exclude`` match)."""
    return f"{prefix}.{projection}" if expert is None else f"{prefix}.{expert}.{projection}"


def tensor_name(linear: str, suffix: str = "weight") -> str:
    """``<linear>.<suffix>``: one tensor of a Linear layer (``suffix``: one of :data:`SUFFIXES`)."""
    return f"{linear}.{suffix}"


def split_tensor_name(name: str) -> tuple[str, str]:
    """``(linear, suffix)`` of ``<linear>.<suffix>`` (the text after the last dot); ``(name, "")`` without a dot."""
    linear, dot, suffix = name.rpartition(".")
    return (linear, suffix) if dot else (name, "")


def dense_tensor(prefix: str, shard: str, suffix: str = "weight") -> str:
    """``<prefix>.{gate_proj|up_proj|down_proj}.<suffix>``: a tensor of the dense gated MLP (or shared expert)
    at ``prefix``; ``shard`` is ``w1`` (gate), ``w3`` (up) or ``w2`` (down)."""
    return tensor_name(linear_name(prefix, HF_PROJECTIONS[shard]), suffix)


@dataclasses.dataclass(frozen=True)
class ProjectionTensor:
    """One projection tensor of a set of experts (or of a dense MLP), parsed from its name.

    ``prefix`` is what the projection hangs off (``<block>.experts``, a shared expert's or a dense MLP's
    prefix); ``expert`` is None for a tensor holding all experts (leading expert axis) or the one expert of a
    dense MLP; ``projection`` is the name's spelling (a key of :data:`PROJECTIONS`); ``native`` marks
    transformers' own all-expert layout (``<projection>`` weights ``[E, in, out]``, ``<projection>_bias``).
    :meth:`TensorNames.parse` also sets ``layer`` and ``shared`` (a shared expert's tensor, not the routed
    experts').
    """

    name: str
    prefix: str
    expert: int | None
    projection: str
    suffix: str
    native: bool = False
    layer: int | None = None
    shared: bool = False

    @property
    def shard(self) -> str:
        """``w1``, ``w3``, ``w2`` or ``w13`` (fused gate and up)."""
        return PROJECTIONS[self.projection]

    @property
    def transposed(self) -> bool:
        """An input-major ``[E, in, out]`` weight (transformers' own layout), read transposed."""
        return self.native and self.suffix == "weight"

    @property
    def quark_name(self) -> str:
        """The name in the layout Quark exports: ``name`` itself, except for transformers' own layout
        (``experts.gate_up_proj`` -> ``experts.gate_up_proj.weight``, ``…_bias`` -> ``….bias``)."""
        return tensor_name(linear_name(self.prefix, self.projection, self.expert), self.suffix)


def parse_projection_tensor(name: str, prefix: str, indexed: bool = True) -> ProjectionTensor | None:
    """``name`` as a projection tensor under ``prefix``, or None when it is not one.

    ``indexed``: ``prefix`` holds experts (``<prefix>.[<expert>.]<projection>.<suffix>``, and transformers'
    ``<prefix>.{gate_up_proj|down_proj}[_bias]``); otherwise a dense MLP (``<prefix>.<projection>.<suffix>``).
    """
    if not name.startswith(prefix + "."):
        return None
    rest = name[len(prefix) + 1 :]
    native = _NATIVE.match(rest) if indexed else None
    if native:
        suffix = "bias" if native["bias"] else "weight"
        return ProjectionTensor(name, prefix, None, native["projection"], suffix, native=True)
    match = (_INDEXED if indexed else _NOT_INDEXED).match(rest)
    if not match or match["projection"] not in PROJECTIONS or match["suffix"] not in SUFFIXES:
        return None
    expert = match.groupdict().get("expert")
    return ProjectionTensor(name, prefix, None if expert is None else int(expert), match["projection"], match["suffix"])


@dataclasses.dataclass(frozen=True)
class TensorNames:
    """Where one architecture's MoE tensors are in a checkpoint (each :class:`ModelFamily` has one).

    Attributes:
      block_names: the MoE block's name inside a decoder layer, in lookup order; writers use the first.
      expert_projections: the spelling of w1 (gate), w3 (up) and w2 (down) in per-expert tensors (fused
        gate+up and all-expert tensors are spelled as transformers does, :data:`HF_PROJECTIONS`).
      router: the router's name in the block.
      shared: the shared expert(s)' name in the block; None if the architecture has none.
      shared_gate: the shared expert's sigmoid gate (``[1, H]``) in the block; None if it has none.
    """

    block_names: tuple[str, ...] = (_MLP,)
    expert_projections: tuple[str, str, str] = (HF_PROJECTIONS["w1"], HF_PROJECTIONS["w3"], HF_PROJECTIONS["w2"])
    router: str = "gate"
    shared: str | None = None
    shared_gate: str | None = None

    def blocks(self, layer: int) -> tuple[str, ...]:
        """Every place layer ``layer``'s MoE block may be, in lookup order (e.g. ``model.layers.3.mlp``)."""
        return tuple(f"{decoder_layer(layer)}.{name}" for name in self.block_names)

    def block(self, layer: int) -> str:
        """Where writers put layer ``layer``'s MoE block."""
        return self.blocks(layer)[0]

    def experts(self, block: str) -> str:
        """``<block>.experts``: the prefix of the routed experts' tensors."""
        return f"{block}.{_EXPERTS}"

    def shared_experts(self, block: str) -> str:
        """``<block>.<shared>``: the prefix of the shared expert(s)' tensors (a dense MLP)."""
        if self.shared is None:
            raise ValueError("this architecture has no shared experts")
        return f"{block}.{self.shared}"

    def expert_tensor(self, block: str, expert: int | None, shard: str, suffix: str = "weight") -> str:
        """The routed experts' tensor ``suffix`` of ``shard`` (w1, w3, w2, w13): expert ``expert``'s, or with
        ``expert`` None the one holding all experts (``[E, ...]``)."""
        if expert is None or shard == "w13":
            projection = HF_PROJECTIONS[shard]
        else:
            projection = self.expert_projections[("w1", "w3", "w2").index(shard)]
        return tensor_name(linear_name(self.experts(block), projection, expert), suffix)

    def router_tensor(self, block: str, suffix: str = "weight") -> str:
        """The router's ``weight [E, H]``, ``bias [E]`` or :data:`CORRECTION_BIAS` ``[E]``."""
        return tensor_name(f"{block}.{self.router}", suffix)

    def shared_gate_tensor(self, block: str) -> str:
        """The shared expert gate's ``weight [1, H]``."""
        if self.shared_gate is None:
            raise ValueError("this architecture has no shared expert gate")
        return tensor_name(f"{block}.{self.shared_gate}")

    def parse(self, name: str) -> ProjectionTensor | None:
        """``name`` as a routed or shared expert projection tensor of any MoE block, with its ``layer`` (the
        inverse of :meth:`expert_tensor` and of :func:`dense_tensor` under :meth:`shared_experts`); None for
        every other tensor."""
        match = self._group_pattern.match(name)
        if match is None:
            return None
        shared = match["group"] != _EXPERTS
        tensor = parse_projection_tensor(name, match["prefix"], indexed=not shared)
        return None if tensor is None else dataclasses.replace(tensor, layer=int(match["layer"]), shared=shared)

    def is_router(self, name: str) -> bool:
        """Whether ``name`` is the weight of a MoE block's router or shared expert gate (kept float)."""
        return self._router_pattern.match(name) is not None

    @functools.cached_property
    def _group_pattern(self) -> re.Pattern:
        groups = [_EXPERTS] + ([self.shared] if self.shared else [])
        return re.compile(rf"^(?P<prefix>{self._block_pattern}\.(?P<group>{_alternatives(groups)}))\.")

    @functools.cached_property
    def _router_pattern(self) -> re.Pattern:
        routers = [self.router] + ([self.shared_gate] if self.shared_gate else [])
        return re.compile(rf"^{self._block_pattern}\.(?:{_alternatives(routers)})\.weight$")

    @property
    def _block_pattern(self) -> str:
        return rf"{_LAYER_PATTERN}\.(?:{_alternatives(self.block_names)})"


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


# --------------------------------------------------------------------------------------------- architectures


def _routing_field(name: str) -> property:
    return property(lambda self: getattr(self.routing, name), doc=f"``routing.{name}``.")


@dataclasses.dataclass(frozen=True)
class MoEArchitecture:
    """What quarkmoe-jax needs to know about a model's MoE layers.

    Sizes: ``num_experts`` (global), ``hidden_size``, ``intermediate_size`` (per expert),
    ``shared_intermediate_size`` (all shared experts together; 0 = none). ``routing``: how router logits
    become top-k weights (its fields ``top_k``, ``scoring``, ``renormalize``, ``softmax_after_topk``,
    ``num_expert_group``, ``topk_group``, ``routed_scaling_factor`` read through as attributes here too);
    ``has_correction_bias``: the router has DeepSeek-V3's ``e_score_correction_bias``. Experts:
    ``activation`` ("silu" / "swigluoai"), ``interleaved`` (gpt-oss gate/up rows), ``has_bias``,
    ``swiglu_limit``. ``has_shared_experts`` / ``has_shared_expert_gate``: the blocks have shared expert(s) /
    a sigmoid gate on them. Tensor names: :attr:`names`.
    """

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    hidden_size: int
    num_experts: int
    intermediate_size: int
    routing: RoutingConfig
    has_correction_bias: bool = False
    activation: str = "silu"
    interleaved: bool = False
    has_bias: bool = False
    swiglu_limit: float | None = None
    shared_intermediate_size: int = 0
    has_shared_experts: bool = False
    has_shared_expert_gate: bool = False

    top_k = _routing_field("top_k")
    scoring = _routing_field("scoring")
    renormalize = _routing_field("renormalize")
    softmax_after_topk = _routing_field("softmax_after_topk")
    num_expert_group = _routing_field("num_expert_group")
    topk_group = _routing_field("topk_group")
    routed_scaling_factor = _routing_field("routed_scaling_factor")

    @property
    def family(self) -> ModelFamily:
        """The model family (:data:`FAMILIES`) this architecture belongs to."""
        return FAMILIES[self.model_type]

    @property
    def names(self) -> TensorNames:
        """The architecture's checkpoint tensor names."""
        return self.family.names

    def check_moe_layer(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise CheckpointError(
                f"layer {layer} is not a MoE layer of this {self.model_type} model; MoE layers: "
                f"{_ranges(self.moe_layers)}"
            )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> MoEArchitecture:
        return family_of(config).moe_architecture(config)


#: The most decoder layers a config.json may claim. Supported checkpoints have fewer than 100; work that grows with
#: the claimed count (per-layer tuples, the loader's per-layer checks) happens before any tensor is read, so the
#: count is bounded first and then checked against the tensors present (``models.loading``).
MAX_LAYERS = 1024
#: The largest size, count, position or token id a config.json may claim: ids and positions are int32 on device.
MAX_INT32 = 2**31 - 1
#: The normal float32 range: config values feed float32 maths.
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38
#: The largest multiplier of activations a config.json may set (YaRN's ``attention_factor`` and ``mscale``,
#: DeepSeek's ``routed_scaling_factor``; real checkpoints use 1 to 16): a larger one overflows the logits.
MAX_ACTIVATION_SCALE = 1000.0


class ConfigReader:
    """Typed, range-checked access to the fields of a config.json dict, as the model's Hugging Face config class
    reads them (``aliases``: ``{canonical: other spellings}``; two spellings that disagree are refused).

    Every refusal is one :class:`CheckpointError` naming the key as spelled in the file, the value found and
    what is allowed. A value the file does not hold is the caller's ``default`` (not checked: defaults are ours).
    ``prefix`` names a nested object in messages (``"rope_parameters."``).
    """

    def __init__(self, config: Mapping[str, Any], aliases: Mapping[str, tuple[str, ...]] | None = None, prefix=""):
        if not isinstance(config, Mapping):
            raise CheckpointError(f"config.json: {prefix.rstrip('.') or 'the file'} must be a JSON object")
        self.config, self.aliases, self.prefix = config, aliases or {}, prefix

    def _lookup(self, key: str) -> tuple[str, Any] | None:
        """``(spelling found, value)`` of field ``key`` under any of its spellings, or None."""
        found = [
            (name, self.config[name]) for name in (key, *self.aliases.get(key, ())) if self.config.get(name) is not None
        ]
        if not found:
            return None
        first_name, first_value = found[0]
        for name, value in found[1:]:
            if value != first_value:
                raise CheckpointError(
                    f"config.json: {self.prefix}{first_name} = {first_value!r} and {name} = {value!r} disagree; both "
                    f"spell the same field of model_type {self.config.get('model_type')!r} (keep one)"
                )
        return found[0]

    def _fail(self, name: str, value: Any, requirement: str) -> CheckpointError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return CheckpointError(f"config.json: {self.prefix}{name} = {shown} must be {requirement}")

    def _found(self, key: str, default: Any):
        found = self._lookup(key)
        if found is None and default is ...:
            spellings = " or ".join(repr(self.prefix + k) for k in (key, *self.aliases.get(key, ())))
            raise CheckpointError(
                f"config.json: missing key {spellings} for model_type {self.config.get('model_type')!r}"
            )
        return found

    def has(self, key: str) -> bool:
        """Whether the file holds ``key`` (any spelling) with a value other than null."""
        return self._lookup(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        """The value under any spelling, unchecked (for objects the caller checks), else ``default``."""
        found = self._lookup(key)
        return default if found is None else found[1]

    def integer(self, key: str, default: Any = ..., *, minimum: int = 1, maximum: int = MAX_INT32) -> int:
        """An integer (a float with an integral value is accepted, as JSON writers produce; not a bool) in
        ``[minimum, maximum]``."""
        found = self._found(key, default)
        if found is None:
            return default
        name, value = found
        number = value
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        if isinstance(number, bool) or not isinstance(number, int) or not minimum <= number <= maximum:
            raise self._fail(name, value, f"an integer in [{minimum}, {maximum}]")
        return number

    def number(
        self,
        key: str,
        default: Any = ...,
        *,
        above: float | None = 0.0,
        minimum: float | None = None,
        maximum: float = FLOAT32_MAX,
    ) -> float:
        """A finite number (not a bool) ``> above`` (or ``>= minimum``) and ``<= maximum``, as a float; a
        non-zero value must be a normal float32 (the model computes in float32: a value that rounds to 0 or
        overflows there is refused here rather than turned into NaN logits)."""
        found = self._found(key, default)
        if found is None:
            return default
        name, value = found
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (above is None or value > above) and (minimum is None or value >= minimum) and value <= maximum
        ok = ok and (value == 0 or FLOAT32_TINY <= abs(value) <= FLOAT32_MAX)
        if not ok:
            low = f"> {above}" if above is not None else (f">= {minimum}" if minimum is not None else "")
            high = f" and <= {maximum:g}" if maximum < FLOAT32_MAX else ""
            raise self._fail(name, value, f"a finite float32 number {low}{high}".rstrip())
        return float(value)

    def flag(self, key: str, default: Any = ...) -> bool:
        """A JSON boolean (``"false"``, a string, is refused rather than read as true)."""
        found = self._found(key, default)
        if found is None:
            return default
        name, value = found
        if not isinstance(value, bool):
            raise self._fail(name, value, "true or false")
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> str:
        """One of the strings ``choices``."""
        found = self._found(key, default)
        if found is None:
            return default
        name, value = found
        if not isinstance(value, str) or value not in choices:
            raise self._fail(name, value, f"one of {list(choices)}")
        return value

    def integers(self, key: str, default: Any = ..., *, minimum: int = 0, maximum: int = MAX_INT32) -> list[int]:
        """A list of integers, each in ``[minimum, maximum]``."""
        found = self._found(key, default)
        if found is None:
            return default
        name, value = found
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum for v in value
        ):
            raise self._fail(name, value, f"a list of integers in [{minimum}, {maximum}]")
        return value

    def nested(self, key: str, default: Any = None) -> ConfigReader | None:
        """A reader of the JSON object under ``key`` (None if absent and no default object)."""
        found = self._lookup(key)
        value = default if found is None else found[1]
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self._fail(found[0] if found else key, value, "a JSON object")
        return ConfigReader(value, prefix=f"{self.prefix}{found[0] if found else key}.")


def _routing(**fields) -> RoutingConfig:
    try:
        return RoutingConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from e


def _layer_count(c: ConfigReader) -> int:
    return c.integer("num_hidden_layers", maximum=MAX_LAYERS)


def _top_k(c: ConfigReader, num_experts: int) -> int:
    return c.integer("num_experts_per_tok", minimum=1, maximum=max(num_experts, 1))


def _mixtral(c: ConfigReader) -> MoEArchitecture:
    n = _layer_count(c)
    num_experts = c.integer("num_local_experts")
    return MoEArchitecture(
        model_type="mixtral",
        num_layers=n,
        moe_layers=tuple(range(n)),
        hidden_size=c.integer("hidden_size"),
        num_experts=num_experts,
        routing=_routing(top_k=_top_k(c, num_experts)),
        intermediate_size=c.integer("intermediate_size"),
    )


def _qwen_moe(c: ConfigReader) -> MoEArchitecture:
    n = _layer_count(c)
    step = c.integer("decoder_sparse_step", 1)
    mlp_only = set(c.integers("mlp_only_layers", [], maximum=n - 1))
    model_type = c.config["model_type"]
    num_experts = c.integer("num_local_experts" if model_type == "qwen3_moe" else "num_experts", minimum=0)
    moe_layers = tuple(i for i in range(n) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
    shared = c.integer("shared_expert_intermediate_size", 0, minimum=0)
    hidden, intermediate = c.integer("hidden_size"), c.integer("moe_intermediate_size")
    return MoEArchitecture(
        model_type=model_type,
        num_layers=n,
        moe_layers=moe_layers,
        hidden_size=hidden,
        num_experts=num_experts,
        intermediate_size=intermediate,
        routing=_routing(top_k=_top_k(c, num_experts), renormalize=c.flag("norm_topk_prob", False)),
        shared_intermediate_size=shared if model_type == "qwen2_moe" else 0,
        has_shared_experts=model_type == "qwen2_moe" and bool(shared),
        has_shared_expert_gate=model_type == "qwen2_moe" and shared > 0,
    )


#: DeepSeek's ``topk_method`` values and whether each routes within expert groups.
_DEEPSEEK_TOPK_METHODS = {"greedy": False, "group_limited_greedy": True, "noaux_tc": True}


def _deepseek(c: ConfigReader) -> MoEArchitecture:
    n = _layer_count(c)
    first_dense = c.integer("first_k_dense_replace", 0, minimum=0, maximum=n)
    freq = c.integer("moe_layer_freq", 1, maximum=n)
    moe_layers = tuple(i for i in range(n) if i >= first_dense and i % freq == 0)
    model_type = c.config["model_type"]
    default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
    topk_method = c.choice("topk_method", default_method, tuple(_DEEPSEEK_TOPK_METHODS))
    num_experts = c.integer("n_routed_experts")
    top_k = _top_k(c, num_experts)
    groups = group_choice = None
    if _DEEPSEEK_TOPK_METHODS[topk_method]:
        groups = c.integer("n_group", 1, maximum=num_experts)
        if num_experts % groups:
            raise CheckpointError(
                f"config.json: n_routed_experts = {num_experts} must be a multiple of n_group = {groups}"
            )
        group_choice = c.integer("topk_group", 1, maximum=groups)
        if top_k > group_choice * (num_experts // groups):
            raise CheckpointError(
                f"config.json: num_experts_per_tok = {top_k} exceeds the experts of topk_group = {group_choice} "
                f"groups ({group_choice * (num_experts // groups)})"
            )
    shared = c.integer("n_shared_experts", 0, minimum=0)
    moe_intermediate = c.integer("moe_intermediate_size")
    return MoEArchitecture(
        model_type=model_type,
        num_layers=n,
        moe_layers=moe_layers,
        hidden_size=c.integer("hidden_size"),
        num_experts=num_experts,
        intermediate_size=moe_intermediate,
        routing=_routing(
            top_k=top_k,
            scoring=c.choice(
                "scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax", ("softmax", "sigmoid")
            ),
            renormalize=c.flag("norm_topk_prob", model_type == "deepseek_v3"),
            num_expert_group=groups,
            topk_group=group_choice,
            routed_scaling_factor=c.number("routed_scaling_factor", 1.0, maximum=MAX_ACTIVATION_SCALE),
        ),
        has_correction_bias=topk_method == "noaux_tc",
        shared_intermediate_size=moe_intermediate * shared,
        has_shared_experts=bool(shared),
    )


def _gpt_oss(c: ConfigReader) -> MoEArchitecture:
    n = _layer_count(c)
    alpha = c.number("swiglu_alpha", 1.702)
    if alpha != 1.702:
        raise CheckpointError(
            f"config.json: swiglu_alpha = {alpha}: only gpt-oss's 1.702 is supported (vLLM hard-codes it too)"
        )
    num_experts = c.integer("num_local_experts")
    return MoEArchitecture(
        model_type="gpt_oss",
        num_layers=n,
        moe_layers=tuple(range(n)),
        hidden_size=c.integer("hidden_size"),
        num_experts=num_experts,
        routing=_routing(top_k=_top_k(c, num_experts), softmax_after_topk=True, renormalize=False),
        intermediate_size=c.integer("intermediate_size"),
        activation="swigluoai",
        interleaved=True,
        has_bias=True,
        swiglu_limit=c.number("swiglu_limit", 7.0),
    )


# ------------------------------------------------------------------------------------------- model families

#: :attr:`ModelFamily.layer_types` for a family without sliding-window attention: every layer attends fully.
NO_SLIDING = type("NoSliding", (), {"__repr__": lambda self: "NO_SLIDING"})()


def _configured_layer_types(c: ConfigReader, num_layers: int):
    return c.raw("layer_types")


def _gpt_oss_layer_types(c: ConfigReader, num_layers: int):
    layer_types = c.raw("layer_types")
    if layer_types is None:  # GptOssConfig's default: sliding and full attention alternate
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    return layer_types


def _qwen_layer_types(max_window_layers: bool):
    def layer_types(c: ConfigReader, num_layers: int):
        if not c.flag("use_sliding_window", False):
            return NO_SLIDING
        layer_types = c.raw("layer_types")
        if max_window_layers and layer_types is None and c.has("sliding_window"):
            max_window = c.integer("max_window_layers", 28, minimum=0)
            layer_types = [
                "sliding_attention" if (i + 1) % 2 and i < max_window else "full_attention" for i in range(num_layers)
            ]
        return layer_types

    return layer_types


def _no_sliding(c: ConfigReader, num_layers: int):
    return NO_SLIDING


def _synthetic_mixtral(common: dict, hidden: int, intermediate: int, experts: int, top_k: int) -> dict:
    return {
        **common,
        "architectures": ["MixtralForCausalLM"],
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "intermediate_size": intermediate,
    }


def _synthetic_qwen(v3: bool):
    def config(common: dict, hidden: int, intermediate: int, experts: int, top_k: int) -> dict:
        extra = {} if v3 else {"shared_expert_intermediate_size": 2 * intermediate}
        return {
            **common,
            "architectures": ["Qwen3MoeForCausalLM" if v3 else "Qwen2MoeForCausalLM"],
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": intermediate,
            "intermediate_size": 4 * intermediate,
            "norm_topk_prob": v3,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            **extra,
        }

    return config


def _synthetic_deepseek(v3: bool):
    def config(common: dict, hidden: int, intermediate: int, experts: int, top_k: int) -> dict:
        return {
            **common,
            "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "n_routed_experts": experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": intermediate,
            "intermediate_size": 4 * intermediate,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "scoring_func": "sigmoid" if v3 else "softmax",
            "topk_method": "noaux_tc" if v3 else "group_limited_greedy",
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5 if v3 else 1.0,
            "norm_topk_prob": v3,
            "q_lora_rank": hidden // 2 if v3 else None,
            "kv_lora_rank": hidden // 2,
            "qk_nope_head_dim": hidden // 4,
            "qk_rope_head_dim": hidden // 8,
            "v_head_dim": hidden // 4,
            "rope_interleave": True,
        }

    return config


def _synthetic_gpt_oss(common: dict, hidden: int, intermediate: int, experts: int, top_k: int) -> dict:
    return {
        **common,
        "architectures": ["GptOssForCausalLM"],
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "experts_per_token": top_k,
        "intermediate_size": intermediate,
        "swiglu_limit": 7.0,
        "sliding_window": 8,
        "attention_bias": True,
    }


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Everything quarkmoe-jax knows of one Hugging Face ``model_type``; :data:`FAMILIES` has one per type, and
    no other module branches on a ``model_type`` (``tests/test_structure.py`` holds that).

    Config reading: ``read_moe`` builds the :class:`MoEArchitecture` from config.json through a reader that
    accepts every spelling in ``aliases`` (``{canonical: other spellings}``: transformers 5.x saves the
    canonical name, its config class's attribute, and reads every alias of the class's ``attribute_map``;
    4.x wrote older spellings; two that disagree are refused). The decoder's defaults when config.json has
    none: ``rope_theta``, ``rms_norm_eps``, ``default_rope`` (rope parameters). Tensor names: ``names``.
    Attention: ``attention`` ("gqa", or "mla": DeepSeek's latent attention, ``num_key_value_heads`` unused),
    ``qk_norm`` (Qwen3's per-head RMSNorm of queries and keys), ``sinks`` (gpt-oss), ``attention_bias`` (the
    projections with a bias), ``rope_pairs(reader)`` (rotate interleaved channel pairs, DeepSeek),
    ``layer_types(reader, num_layers)`` (the per-layer attention kinds as the config class reads them, None
    for one ``sliding_window`` on every layer, or :data:`NO_SLIDING`). ``synthetic_config(common, hidden,
    intermediate, experts, top_k)``: the config.json of a small synthetic model
    (:mod:`~quarkmoe_jax.checkpoint.synthetic`).
    """

    model_type: str
    names: TensorNames
    read_moe: Callable[[ConfigReader], MoEArchitecture]
    synthetic_config: Callable[[dict, int, int, int, int], dict]
    aliases: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-6
    default_rope: Mapping[str, Any] | None = None
    attention: str = "gqa"
    qk_norm: bool = False
    sinks: bool = False
    attention_bias: tuple[str, ...] = ()
    rope_pairs: Callable[[ConfigReader], bool] = lambda c: False
    layer_types: Callable[[ConfigReader, int], Any] = _configured_layer_types

    def reader(self, config: Mapping[str, Any]) -> ConfigReader:
        """Typed access to ``config`` (a config.json dict of this family), every spelling in :attr:`aliases`."""
        return ConfigReader(config, self.aliases)

    def moe_architecture(self, config: Mapping[str, Any]) -> MoEArchitecture:
        """The MoE part of ``config`` (a config.json dict of this family)."""
        return self.read_moe(self.reader(config))


_QKV = ("q_proj", "k_proj", "v_proj")

#: The supported model families, one entry per ``model_type``.
FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family
    for family in (
        ModelFamily(
            "mixtral",
            TensorNames(block_names=("block_sparse_moe", _MLP), expert_projections=("w1", "w3", "w2")),
            _mixtral,
            _synthetic_mixtral,
            aliases={"num_local_experts": ("num_experts",)},
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        ),
        ModelFamily(
            "qwen2_moe",
            TensorNames(shared="shared_expert", shared_gate="shared_expert_gate"),
            _qwen_moe,
            _synthetic_qwen(v3=False),
            attention_bias=_QKV,
            layer_types=_qwen_layer_types(max_window_layers=True),
        ),
        ModelFamily(
            "qwen3_moe",
            TensorNames(),
            _qwen_moe,
            _synthetic_qwen(v3=True),
            aliases={"num_local_experts": ("num_experts",)},  # 4.x: num_experts; 5.x: num_local_experts
            qk_norm=True,
            layer_types=_qwen_layer_types(max_window_layers=False),
        ),
        ModelFamily(
            "deepseek_v2",
            TensorNames(shared="shared_experts"),
            _deepseek,
            _synthetic_deepseek(v3=False),
            aliases={"n_routed_experts": ("num_experts",)},
            attention="mla",
            rope_pairs=lambda c: True,
            layer_types=_no_sliding,
        ),
        ModelFamily(
            "deepseek_v3",
            TensorNames(shared="shared_experts"),
            _deepseek,
            _synthetic_deepseek(v3=True),
            aliases={"n_routed_experts": ("num_local_experts",)},
            attention="mla",
            rope_pairs=lambda c: c.flag("rope_interleave", True),
            layer_types=_no_sliding,
        ),
        ModelFamily(
            "gpt_oss",
            TensorNames(router="router"),
            _gpt_oss,
            _synthetic_gpt_oss,
            # OpenAI's own config names the top-k ``experts_per_token`` (not an HF alias; accepted too)
            aliases={"num_local_experts": ("num_experts",), "num_experts_per_tok": ("experts_per_token",)},
            rope_theta=150000.0,
            rms_norm_eps=1e-5,
            default_rope={
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            sinks=True,
            attention_bias=(*_QKV, "o_proj"),
            layer_types=_gpt_oss_layer_types,
        ),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(config: Mapping[str, Any]) -> ModelFamily:
    """The family of a config.json dict (its ``model_type``); an unsupported one raises :class:`CheckpointError`."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not a supported MoE architecture; "
            f"expected one of {SUPPORTED_MODEL_TYPES}"
        )
    return family


def _ranges(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    if values == tuple(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
