"""A whole decoder's settings read from a Hugging Face ``config.json``, as transformers' config classes read it.

Both spellings are accepted: transformers 5.x writes ``rope_parameters`` (with ``rope_theta`` inside) and
``dtype``; 4.x wrote ``rope_theta`` / ``rope_scaling`` and ``torch_dtype``. Where a key is absent, the value
is the config class's default for that ``model_type`` (e.g. gpt-oss's YaRN rope). Everything that differs
between model types (defaults, attention kind, sliding layers, rope pairing) is asked of the family
(:class:`~quarkmoe_jax.checkpoint.architectures.ModelFamily`); the MoE part (experts, routing, which layers are
MoE) is its :class:`~quarkmoe_jax.checkpoint.architectures.MoEArchitecture`, read by the same family.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from quarkmoe_jax.checkpoint.architectures import NO_SLIDING, ModelFamily, MoEArchitecture, family_of
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["DecoderConfig", "RopeConfig", "MLAConfig"]

#: config.json's dtype spellings -> the model dtypes (MODEL_DTYPES)
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16"}
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding of ``dim`` channels per head.

    ``kind``: "default" or "yarn" (transformers' ``_compute_yarn_parameters``: NTK-by-parts frequencies and
    ``attention_factor`` multiplying cos and sin). ``pairs``: rotate interleaved pairs ``(x0, x1), (x2, x3)``
    (DeepSeek) instead of the two halves of the head (Llama style).
    """

    dim: int
    theta: float
    kind: str = "default"
    factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_positions: int = 4096
    truncate: bool = True
    attention_factor: float = 1.0
    pairs: bool = False

    def inverse_frequencies(self) -> np.ndarray:
        """float32 ``[dim / 2]``, computed as transformers computes them (float32 powers)."""
        exponents = np.arange(0, self.dim, 2, dtype=np.float32) / np.float32(self.dim)
        pos_freqs = np.power(np.float32(self.theta), exponents, dtype=np.float32)
        extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
        if self.kind == "default":
            return extrapolation
        interpolation = (np.float32(1.0) / (np.float32(self.factor) * pos_freqs)).astype(np.float32)

        def correction_dim(rotations):
            return (self.dim * math.log(self.original_max_positions / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta)
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(self.dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation_factor = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)
        return (interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention: ``q_lora_rank`` (None: a plain ``q_proj``), ``kv_lora_rank``,
    per-head ``qk_nope_head_dim`` + ``qk_rope_head_dim`` query/key channels and ``v_head_dim`` value channels."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """What the decoder needs besides the MoE layers.

    ``sliding_windows``: per layer, the attention window (None = full causal attention); a key at position
    ``j`` is seen from position ``i`` when ``i - window < j <= i`` (transformers' sliding mask).
    ``dense_intermediate_size``: the dense MLP of non-MoE layers. ``attention_scale``: the softmax scale
    (``head_dim ** -0.5``; DeepSeek's YaRN multiplies it by ``mscale ** 2``). ``sinks``: gpt-oss's per-head
    attention sink logits. ``qk_norm``: Qwen3's per-head RMSNorm of queries and keys.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    attention_scale: float
    sliding_windows: tuple[int | None, ...]
    dense_intermediate_size: int | None
    moe: MoEArchitecture
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    sinks: bool = False
    mla: MLAConfig | None = None
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int | None = None

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe.moe_layers)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> DecoderConfig:
        """Parse ``config.json``; a missing or malformed key raises :class:`CheckpointError` naming it."""
        family = family_of(config)  # names an unsupported model_type
        moe = family.moe_architecture(config)
        model_type = family.model_type

        def get(key, default=..., kind=int):
            value = config.get(key)
            if value is None:
                if default is ...:
                    raise CheckpointError(f"config.json: missing key {key!r} for model_type {model_type!r}")
                return default
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CheckpointError(f"config.json: {key} = {value!r} is not a valid {kind.__name__}")
            if kind in (int, float) and value <= 0 and key not in ("eos_token_id",):
                raise CheckpointError(f"config.json: {key} = {value!r} must be positive")
            return value

        # read once, by the family's reader (both transformers spellings); the decoder adds that they be positive
        num_layers, hidden = moe.num_layers, moe.hidden_size
        for key, value in (("num_hidden_layers", num_layers), ("hidden_size", hidden)):
            if value <= 0:
                raise CheckpointError(f"config.json: {key} = {value!r} must be positive")
        heads = get("num_attention_heads")
        mla_model = family.attention == "mla"  # latent attention: num_key_value_heads unused
        kv_heads = heads if mla_model else get("num_key_value_heads", heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
            )
        head_dim = get("head_dim", hidden // heads)
        mla = None
        if mla_model:
            mla = MLAConfig(
                q_lora_rank=get("q_lora_rank", None),
                kv_lora_rank=get("kv_lora_rank"),
                qk_nope_head_dim=get("qk_nope_head_dim"),
                qk_rope_head_dim=get("qk_rope_head_dim"),
                v_head_dim=get("v_head_dim"),
            )
            head_dim = mla.qk_head_dim
        rope = _rope_config(config, family, mla.qk_rope_head_dim if mla else head_dim)
        scale = head_dim**-0.5
        if mla is not None and rope.kind != "default":
            mscale_all_dim = _rope_parameters(config, family).get("mscale_all_dim") or 0
            if mscale_all_dim:
                m = _yarn_mscale(rope.factor, float(mscale_all_dim))
                scale = scale * m * m
        windows = _sliding_windows(config, family, num_layers, get)
        dense = config.get("intermediate_size") if moe.moe_layers != tuple(range(num_layers)) else None
        if dense is not None:
            dense = get("intermediate_size")
        elif moe.moe_layers != tuple(range(num_layers)):
            raise CheckpointError(
                f"config.json: missing key 'intermediate_size' (the dense MLP of layers "
                f"{[i for i in range(num_layers) if i not in moe.moe_layers]})"
            )
        dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
        if not isinstance(dtype_name, str) or dtype_name.removeprefix("torch.") not in _DTYPES:
            raise CheckpointError(f"config.json: dtype {dtype_name!r} is not one of {list(MODEL_DTYPES)}")
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
            raise CheckpointError(f"config.json: eos_token_id = {eos!r} is not an integer or a list of integers")
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps", family.rms_norm_eps, float),
            rope=rope,
            attention_scale=scale,
            sliding_windows=windows,
            dense_intermediate_size=dense,
            moe=moe,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=family.qk_norm,
            sinks=family.sinks,
            mla=mla,
            dtype=_DTYPES[dtype_name.removeprefix("torch.")],
            eos_token_ids=eos_ids,
            max_position_embeddings=config.get("max_position_embeddings"),
        )


def _rope_parameters(config: dict[str, Any], family: ModelFamily) -> dict[str, Any]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or family.default_rope or {}
    if not isinstance(params, dict):
        raise CheckpointError(f"config.json: rope_parameters = {params!r} is not an object")
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("config.json: rope_parameters per layer type are not supported (one set for all layers)")
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_config(config, family: ModelFamily, dim: int) -> RopeConfig:
    params = _rope_parameters(config, family)
    theta = params.get("rope_theta", config.get("rope_theta", family.rope_theta))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 1:
        raise CheckpointError(f"config.json: rope_theta = {theta!r} must be a number > 1")
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0):
        raise CheckpointError(f"config.json: partial_rotary_factor = {partial!r} is not supported (1.0 only)")
    pairs = family.rope_pairs(config)
    if kind == "default":
        return RopeConfig(dim=dim, theta=float(theta), pairs=bool(pairs))
    if kind != "yarn":
        raise CheckpointError(
            f"config.json: rope type {kind!r} is not supported for {family.model_type} (supported: default, yarn)"
        )
    max_positions = config.get("max_position_embeddings")
    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    original = original or max_positions
    if not isinstance(original, int) or original <= 0:
        raise CheckpointError("config.json: yarn rope needs original_max_position_embeddings (a positive integer)")
    factor = params.get("factor")
    if factor is None:
        if not isinstance(max_positions, int):
            raise CheckpointError("config.json: yarn rope without 'factor' needs max_position_embeddings")
        factor = max_positions / original
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise CheckpointError(f"config.json: rope factor = {factor!r} must be a positive number")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return RopeConfig(
        dim=dim,
        theta=float(theta),
        kind="yarn",
        factor=float(factor),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        original_max_positions=int(original),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
        pairs=bool(pairs),
    )


def _sliding_windows(config, family: ModelFamily, num_layers: int, get) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    layer_types = family.layer_types(config, num_layers)
    if layer_types is NO_SLIDING:
        return (None,) * num_layers
    if layer_types is None:
        return ((get("sliding_window") if window else None),) * num_layers
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise CheckpointError(f"config.json: layer_types must list {num_layers} layer types, found {layer_types!r}")
    unknown = sorted({t for t in layer_types if t not in ("sliding_attention", "full_attention")})
    if unknown:
        raise CheckpointError(f"config.json: layer_types {unknown} not supported (sliding_attention, full_attention)")
    if "sliding_attention" in layer_types:
        window = get("sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
