"""MoE architectures read from a Hugging Face ``config.json``: sizes, routing, and checkpoint tensor names.

Supported ``model_type`` values: ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``deepseek_v2``, ``deepseek_v3``,
``gpt_oss``. Expert tensors are looked up under several prefixes because Quark writes Mixtral under
``block_sparse_moe.experts`` or ``mlp.experts`` depending on the transformers version it ran with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["MoEArchitecture", "SUPPORTED_MODEL_TYPES", "PROJECTIONS", "CONFIG_ALIASES"]

#: checkpoint projection name -> shard ("w13" = fused gate+up).
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


@dataclasses.dataclass(frozen=True)
class MoEArchitecture:
    """What quarkmoe-jax needs to know about a model's MoE layers.

    Sizes: ``num_experts`` (global), ``top_k``, ``hidden_size``, ``intermediate_size`` (per expert),
    ``shared_intermediate_size`` (0 = no shared expert). Routing: ``scoring`` ("softmax" / "sigmoid"),
    ``renormalize``, ``softmax_after_topk`` (gpt-oss), grouped top-k (``num_expert_group``, ``topk_group``),
    ``routed_scaling_factor``, ``has_correction_bias``. Experts: ``activation`` ("silu" / "swigluoai"),
    ``interleaved`` (gpt-oss gate/up rows), ``has_bias``, ``swiglu_limit``.
    """

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: str = "softmax"
    renormalize: bool = True
    softmax_after_topk: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    has_correction_bias: bool = False
    activation: str = "silu"
    interleaved: bool = False
    has_bias: bool = False
    swiglu_limit: float | None = None
    shared_intermediate_size: int = 0
    has_shared_expert_gate: bool = False
    # MoE block prefixes (the experts live under "<block>.experts"); others hang off the block too.
    block_prefixes: tuple[str, ...] = ("model.layers.{layer}.mlp",)
    router_suffix: str = "gate"
    shared_suffix: str | None = None
    shared_gate_suffix: str | None = None

    def block_prefix_candidates(self, layer: int) -> list[str]:
        return [p.format(layer=layer) for p in self.block_prefixes]

    def check_moe_layer(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise CheckpointError(
                f"layer {layer} is not a MoE layer of this {self.model_type} model; MoE layers: "
                f"{_ranges(self.moe_layers)}"
            )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> MoEArchitecture:
        model_type = config.get("model_type")
        builder = _BUILDERS.get(model_type) if isinstance(model_type, str) else None
        if builder is None:
            raise CheckpointError(
                f"config.json: model_type {model_type!r} is not a supported MoE architecture; "
                f"expected one of {SUPPORTED_MODEL_TYPES}"
            )
        return builder(_Config(config))


#: Other spellings of a config field, per model type: ``{canonical: aliases}``. transformers 5.x saves the
#: canonical name (its config class's attribute) and reads every alias of the class's ``attribute_map``;
#: transformers 4.x wrote the older spellings. A config may use any of them; two that disagree are refused.
CONFIG_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"num_local_experts": ("num_experts",)},
    "qwen2_moe": {},
    "qwen3_moe": {"num_local_experts": ("num_experts",)},  # 4.x: num_experts; 5.x: num_local_experts
    "deepseek_v2": {"n_routed_experts": ("num_experts",)},
    "deepseek_v3": {"n_routed_experts": ("num_local_experts",)},
    # gpt-oss: OpenAI's own config names the top-k ``experts_per_token`` (not an HF alias; accepted too).
    "gpt_oss": {"num_local_experts": ("num_experts",), "num_experts_per_tok": ("experts_per_token",)},
}


class _Config:
    """config.json access as the model's Hugging Face config class reads it (aliases included), with errors
    that name the missing or conflicting key."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.aliases = CONFIG_ALIASES.get(str(config.get("model_type")), {})

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
                    f"config.json: {first_name} = {first_value!r} and {name} = {value!r} disagree; both spell the "
                    f"same field of model_type {self.config.get('model_type')!r} (keep one)"
                )
        return found[0]

    def __call__(self, key: str, default: Any = ..., cast=int):
        found = self._lookup(key)
        if found is None:
            if default is ...:
                spellings = " or ".join(repr(k) for k in (key, *self.aliases.get(key, ())))
                raise CheckpointError(
                    f"config.json: missing key {spellings} for model_type {self.config.get('model_type')!r}"
                )
            return default
        name, value = found
        if cast is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if cast is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"config.json: {name} = {value!r} is not an integer")
        try:
            return cast(value) if cast is not None else value
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: {name} = {value!r} is not a valid {cast.__name__}") from e


def _mixtral(c: _Config) -> MoEArchitecture:
    n = c("num_hidden_layers")
    return MoEArchitecture(
        model_type="mixtral",
        num_layers=n,
        moe_layers=tuple(range(n)),
        hidden_size=c("hidden_size"),
        num_experts=c("num_local_experts"),
        top_k=c("num_experts_per_tok"),
        intermediate_size=c("intermediate_size"),
        block_prefixes=("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp"),
    )


def _qwen_moe(c: _Config) -> MoEArchitecture:
    n = c("num_hidden_layers")
    step = c("decoder_sparse_step", 1)
    mlp_only = set(c("mlp_only_layers", [], cast=list))
    num_experts = c("num_local_experts" if c.config["model_type"] == "qwen3_moe" else "num_experts")
    moe_layers = tuple(i for i in range(n) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
    shared = c("shared_expert_intermediate_size", 0)
    model_type = c.config["model_type"]
    return MoEArchitecture(
        model_type=model_type,
        num_layers=n,
        moe_layers=moe_layers,
        hidden_size=c("hidden_size"),
        num_experts=num_experts,
        top_k=c("num_experts_per_tok"),
        intermediate_size=c("moe_intermediate_size"),
        renormalize=c("norm_topk_prob", False, cast=bool),
        shared_intermediate_size=shared if model_type == "qwen2_moe" else 0,
        has_shared_expert_gate=model_type == "qwen2_moe" and shared > 0,
        shared_suffix="shared_expert" if model_type == "qwen2_moe" and shared else None,
        shared_gate_suffix="shared_expert_gate" if model_type == "qwen2_moe" and shared else None,
    )


def _deepseek(c: _Config) -> MoEArchitecture:
    n = c("num_hidden_layers")
    first_dense = c("first_k_dense_replace", 0)
    freq = c("moe_layer_freq", 1)
    moe_layers = tuple(i for i in range(n) if i >= first_dense and i % freq == 0)
    model_type = c.config["model_type"]
    topk_method = c("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy", cast=str)
    grouped = topk_method in ("group_limited_greedy", "noaux_tc")
    shared = c("n_shared_experts", 0)
    moe_intermediate = c("moe_intermediate_size")
    return MoEArchitecture(
        model_type=model_type,
        num_layers=n,
        moe_layers=moe_layers,
        hidden_size=c("hidden_size"),
        num_experts=c("n_routed_experts"),
        top_k=c("num_experts_per_tok"),
        intermediate_size=moe_intermediate,
        scoring=c("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax", cast=str),
        renormalize=c("norm_topk_prob", model_type == "deepseek_v3", cast=bool),
        num_expert_group=c("n_group", 1) if grouped else None,
        topk_group=c("topk_group", 1) if grouped else None,
        routed_scaling_factor=c("routed_scaling_factor", 1.0, cast=float),
        has_correction_bias=topk_method == "noaux_tc",
        shared_intermediate_size=moe_intermediate * shared,
        shared_suffix="shared_experts" if shared else None,
    )


def _gpt_oss(c: _Config) -> MoEArchitecture:
    n = c("num_hidden_layers")
    alpha = c("swiglu_alpha", 1.702, cast=float)
    if alpha != 1.702:
        raise CheckpointError(
            f"config.json: swiglu_alpha = {alpha}: only gpt-oss's 1.702 is supported (vLLM hard-codes it too)"
        )
    return MoEArchitecture(
        model_type="gpt_oss",
        num_layers=n,
        moe_layers=tuple(range(n)),
        hidden_size=c("hidden_size"),
        num_experts=c("num_local_experts"),
        top_k=c("num_experts_per_tok"),
        intermediate_size=c("intermediate_size"),
        softmax_after_topk=True,
        renormalize=False,
        activation="swigluoai",
        interleaved=True,
        has_bias=True,
        swiglu_limit=c("swiglu_limit", 7.0, cast=float),
        router_suffix="router",
    )


_BUILDERS = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "gpt_oss": _gpt_oss,
}
SUPPORTED_MODEL_TYPES = tuple(_BUILDERS)


def _ranges(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    if values == tuple(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))
