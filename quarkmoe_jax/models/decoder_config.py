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

from quarkmoe_jax.checkpoint.architectures import (
    MAX_ACTIVATION_SCALE,
    NO_SLIDING,
    ConfigReader,
    ModelFamily,
    MoEArchitecture,
    family_of,
)
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
        """Parse ``config.json``; a missing, mistyped, non-finite, out-of-range or inconsistent field raises one
        :class:`CheckpointError` naming the key, the value and what is allowed (limits: docs/models.md)."""
        family = family_of(config)  # names an unsupported model_type
        moe = family.moe_architecture(config)  # the layer count, sizes and routing, checked there
        model_type = family.model_type
        c = family.reader(config)
        num_layers, hidden = moe.num_layers, moe.hidden_size
        vocab = c.integer("vocab_size")
        heads = c.integer("num_attention_heads")
        mla_model = family.attention == "mla"  # latent attention: num_key_value_heads unused
        kv_heads = heads if mla_model else c.integer("num_key_value_heads", heads, maximum=heads)
        if heads % kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
            )
        head_dim = c.integer("head_dim", hidden // heads)
        if head_dim < 1:
            raise CheckpointError(
                f"config.json: hidden_size = {hidden} over num_attention_heads = {heads} leaves no head_dim "
                "(set head_dim)"
            )
        mla = None
        if mla_model:
            mla = MLAConfig(
                q_lora_rank=c.integer("q_lora_rank", None),
                kv_lora_rank=c.integer("kv_lora_rank"),
                qk_nope_head_dim=c.integer("qk_nope_head_dim"),
                qk_rope_head_dim=c.integer("qk_rope_head_dim"),
                v_head_dim=c.integer("v_head_dim"),
            )
            head_dim = mla.qk_head_dim
        max_positions = c.integer("max_position_embeddings", None)
        rope = _rope_config(c, family, mla.qk_rope_head_dim if mla else head_dim, max_positions)
        scale = head_dim**-0.5
        if mla is not None and rope.kind != "default":
            mscale_all_dim = _rope_reader(c, family).number(
                "mscale_all_dim", 0.0, above=None, minimum=0.0, maximum=MAX_ACTIVATION_SCALE
            )
            if mscale_all_dim:
                m = _yarn_mscale(rope.factor, mscale_all_dim)
                scale = scale * m * m
        windows = _sliding_windows(c, family, num_layers)
        dense = None
        if moe.moe_layers != tuple(range(num_layers)):
            if not c.has("intermediate_size"):
                raise CheckpointError(
                    f"config.json: missing key 'intermediate_size' (the dense MLP of layers "
                    f"{[i for i in range(num_layers) if i not in moe.moe_layers]})"
                )
            dense = c.integer("intermediate_size")
        dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
        if not isinstance(dtype_name, str) or dtype_name.removeprefix("torch.") not in _DTYPES:
            raise CheckpointError(f"config.json: dtype {dtype_name!r} is not one of {list(MODEL_DTYPES)}")
        eos = c.raw("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < vocab for e in eos_ids):
            raise CheckpointError(
                f"config.json: eos_token_id = {eos!r} must be a token id in [0, {vocab}) or a list of them"
            )
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=c.number("rms_norm_eps", family.rms_norm_eps, maximum=1.0),
            rope=rope,
            attention_scale=scale,
            sliding_windows=windows,
            dense_intermediate_size=dense,
            moe=moe,
            tie_word_embeddings=c.flag("tie_word_embeddings", False),
            qk_norm=family.qk_norm,
            sinks=family.sinks,
            mla=mla,
            dtype=_DTYPES[dtype_name.removeprefix("torch.")],
            eos_token_ids=eos_ids,
            max_position_embeddings=max_positions,
        )


def _rope_reader(c: ConfigReader, family: ModelFamily) -> ConfigReader:
    """The rope parameters (``rope_parameters``, 4.x ``rope_scaling``, else the family's default)."""
    key = "rope_parameters" if c.has("rope_parameters") else "rope_scaling"
    params = c.nested(key) or ConfigReader(family.default_rope or {}, prefix="rope_parameters.")
    if any(isinstance(v, dict) for v in params.config.values()):
        raise CheckpointError("config.json: rope_parameters per layer type are not supported (one set for all layers)")
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_config(c: ConfigReader, family: ModelFamily, dim: int, max_positions: int | None) -> RopeConfig:
    if dim % 2:
        raise CheckpointError(f"config.json: the rotary dimension {dim} (the head's rope channels) must be even")
    params = _rope_reader(c, family)
    if params.has("rope_theta"):
        theta = params.number("rope_theta", above=1.0)
    else:
        theta = c.number("rope_theta", family.rope_theta, above=1.0)
    kind = params.raw("rope_type", params.raw("type", "default"))
    if kind not in ("default", "yarn"):
        raise CheckpointError(
            f"config.json: rope type {kind!r} is not supported for {family.model_type} (supported: default, yarn)"
        )
    reader = params if params.has("partial_rotary_factor") else c
    partial = reader.number("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise CheckpointError(f"config.json: partial_rotary_factor = {partial!r} is not supported (1.0 only)")
    pairs = family.rope_pairs(c)
    if kind == "default":
        return RopeConfig(dim=dim, theta=theta, pairs=pairs)
    original_key = "original_max_position_embeddings"
    if params.has(original_key):
        original = params.integer(original_key)
    else:
        original = c.integer(original_key, max_positions)
    if original is None:
        raise CheckpointError("config.json: yarn rope needs original_max_position_embeddings (a positive integer)")
    if params.has("factor"):
        factor = params.number("factor", above=None, minimum=1.0)  # transformers: >= 1 (0 < factor < 1 would
        # raise the interpolated frequencies above 1 rad/token and overflow position * frequency in float32)
    elif max_positions is None:
        raise CheckpointError("config.json: yarn rope without 'factor' needs max_position_embeddings")
    else:
        factor = max_positions / original
        if factor < 1:
            raise CheckpointError(
                f"config.json: yarn rope without 'factor' takes max_position_embeddings / "
                f"original_max_position_embeddings = {max_positions} / {original}, which must be >= 1"
            )
    attention_factor = params.number("attention_factor", None, maximum=MAX_ACTIVATION_SCALE)
    if attention_factor is None:
        mscale = params.number("mscale", 0.0, above=None, minimum=0.0, maximum=MAX_ACTIVATION_SCALE)
        mscale_all_dim = params.number("mscale_all_dim", 0.0, above=None, minimum=0.0, maximum=MAX_ACTIVATION_SCALE)
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return RopeConfig(
        dim=dim,
        theta=theta,
        kind="yarn",
        factor=factor,
        beta_fast=params.number("beta_fast", 32.0),
        beta_slow=params.number("beta_slow", 1.0),
        original_max_positions=original,
        truncate=params.flag("truncate", True),
        attention_factor=attention_factor,
        pairs=pairs,
    )


def _sliding_windows(c: ConfigReader, family: ModelFamily, num_layers: int) -> tuple[int | None, ...]:
    layer_types = family.layer_types(c, num_layers)
    if layer_types is NO_SLIDING:
        return (None,) * num_layers
    if layer_types is None:
        return ((c.integer("sliding_window") if c.has("sliding_window") else None),) * num_layers
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        shown = repr(layer_types)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise CheckpointError(f"config.json: layer_types must list {num_layers} layer types, found {shown}")
    unknown = sorted({repr(t) for t in layer_types if t not in ("sliding_attention", "full_attention")})
    if unknown:
        raise CheckpointError(
            f"config.json: layer_types {unknown[:4]} not supported (sliding_attention, full_attention)"
        )
    window = c.integer("sliding_window") if "sliding_attention" in layer_types else None
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
