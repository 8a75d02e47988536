"""Small seeded float MoE checkpoints with real Hugging Face configs and tensor names, per architecture.

Used by the tests, the CLI and the notebooks to make checkpoints without downloads; export them with
:func:`quarkmoe_jax.checkpoint.exporter.export_quark_checkpoint`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from quarkmoe_jax.checkpoint.architectures import (
    CORRECTION_BIAS,
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    ModelFamily,
    decoder_layer,
    dense_mlp,
    dense_tensor,
)
from quarkmoe_jax.checkpoint.safetensors_io import save_file
from quarkmoe_jax.errors import QuarkMoEError

__all__ = [
    "synthetic_moe",
    "write_float_checkpoint",
    "write_synthetic_tokenizer",
    "SPECIAL_TOKENS",
    "SYNTHETIC_TOKENIZER_VOCAB",
    "CHAT_TEMPLATE",
]


def _hf_config(
    family: ModelFamily, layers: int, hidden: int, intermediate: int, experts: int, top_k: int, vocab: int
) -> dict:
    common = {
        "model_type": family.model_type,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
    }
    return family.synthetic_config(common, hidden, intermediate, experts, top_k)


MAX_SYNTHETIC_BYTES = 8 << 30
"""The largest synthetic model made (float32 expert weights, the dominant part, estimated before anything is
allocated): it is a test and demo model, not a stand-in for a real checkpoint."""


def _check_sizes(**sizes: int) -> None:
    """Every size a positive int, ``top_k`` at most the expert count, and the experts' float32 bytes within
    :data:`MAX_SYNTHETIC_BYTES`: refused before any allocation (:class:`QuarkMoEError` naming the value)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise QuarkMoEError(f"synthetic model: {name} must be a positive integer, found {value!r}")
    if sizes["top_k"] > sizes["num_experts"]:
        raise QuarkMoEError(f"synthetic model: top_k {sizes['top_k']} exceeds num_experts {sizes['num_experts']}")
    expert_bytes = 4 * 3 * sizes["num_layers"] * (sizes["num_experts"] + 1) * sizes["hidden_size"]
    expert_bytes *= sizes["intermediate_size"]
    if expert_bytes > MAX_SYNTHETIC_BYTES:
        raise QuarkMoEError(
            f"synthetic model: {sizes} needs about {expert_bytes / 2**30:.3g} GiB of expert weights, more than the "
            f"{MAX_SYNTHETIC_BYTES / 2**30:g} GiB a synthetic model may take"
        )


def synthetic_moe(
    model_type: str = "mixtral",
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 64,
    num_experts: int = 4,
    top_k: int = 2,
    fused_experts: bool = False,
    seed: int = 0,
    vocab_size: int = 128,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A float MoE language model: ``(config.json dict, {tensor name: bfloat16 / float32 array})``.

    Every tensor the whole model needs is there (embeddings, attention of the architecture's kind: GQA with
    Qwen3's q/k norms or gpt-oss's biases and sinks, DeepSeek's latent attention; norms; dense and MoE MLPs;
    LM head), so :func:`quarkmoe_jax.models.from_pretrained` runs it. Weights are Gaussian (std 0.02) with a
    few larger outliers per expert so that MX blocks see different scales; norm weights are near 1.
    ``fused_experts`` stores each layer's experts as all-expert ``gate_up_proj`` / ``down_proj`` tensors
    instead of per-expert projections (gpt-oss always uses per-expert fused ``gate_up_proj``). ``vocab_size``:
    the embedding's rows (at least :data:`SYNTHETIC_TOKENIZER_VOCAB` for :func:`write_float_checkpoint`'s
    tokenizer).
    """
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}")
    _check_sizes(
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        vocab_size=vocab_size,
    )
    config = _hf_config(family, num_layers, hidden_size, intermediate_size, num_experts, top_k, vocab_size)
    arch = family.moe_architecture(config)
    names = family.names
    rng = np.random.default_rng(seed)
    bf16 = ml_dtypes.bfloat16
    h, i, e = hidden_size, intermediate_size, num_experts

    def weight(*shape):
        w = rng.standard_normal(shape).astype(np.float32) * 0.02
        w.reshape(-1)[rng.integers(0, w.size, max(1, w.size // 500))] *= 8
        return w.astype(bf16)

    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": weight(vocab_size, h),
        "lm_head.weight": weight(vocab_size, h),
    }
    # the non-expert tensors the MoE tests never read come from their own stream, so adding them kept the
    # expert weights of every seed unchanged
    aux = np.random.default_rng([seed, 1])

    def norm(dim):
        return (1 + 0.1 * aux.standard_normal(dim)).astype(bf16)

    def small(*shape):
        return (aux.standard_normal(shape) * 0.02).astype(bf16)

    tensors["model.norm.weight"] = norm(h)
    for layer in range(num_layers):
        p = decoder_layer(layer)
        tensors[f"{p}.input_layernorm.weight"] = np.ones(h, bf16)
        tensors[f"{p}.post_attention_layernorm.weight"] = norm(h)
        if family.attention == "mla":
            tensors.update(_latent_attention(f"{p}.self_attn", config, small, norm))
        else:
            for proj, rows in (("q_proj", h), ("k_proj", h // 2), ("v_proj", h // 2), ("o_proj", h)):
                tensors[f"{p}.self_attn.{proj}.weight"] = weight(rows, h)
        if family.qk_norm:
            tensors[f"{p}.self_attn.q_norm.weight"] = norm(h // 4)
            tensors[f"{p}.self_attn.k_norm.weight"] = norm(h // 4)
        for proj, rows in (("q_proj", h), ("k_proj", h // 2), ("v_proj", h // 2), ("o_proj", h)):
            if proj in family.attention_bias:
                tensors[f"{p}.self_attn.{proj}.bias"] = small(rows)
        if family.sinks:
            tensors[f"{p}.self_attn.sinks"] = (aux.standard_normal(4) * 0.5).astype(np.float32)
        if layer not in arch.moe_layers:
            for shard, shape in (("w1", (4 * i, h)), ("w3", (4 * i, h)), ("w2", (h, 4 * i))):
                tensors[dense_tensor(dense_mlp(layer), shard)] = weight(*shape)
            continue
        moe = names.block(layer)
        if arch.interleaved:  # gpt-oss: per-expert fused, interleaved gate_up_proj, with biases
            tensors[names.router_tensor(moe)] = weight(e, h)
            tensors[names.router_tensor(moe, "bias")] = (rng.standard_normal(e) * 0.1).astype(np.float32)
            for x in range(e):
                tensors[names.expert_tensor(moe, x, "w13")] = weight(2 * i, h)
                tensors[names.expert_tensor(moe, x, "w13", "bias")] = (rng.standard_normal(2 * i) * 0.02).astype(
                    np.float32
                )
                tensors[names.expert_tensor(moe, x, "w2")] = weight(h, i)
                tensors[names.expert_tensor(moe, x, "w2", "bias")] = (rng.standard_normal(h) * 0.02).astype(np.float32)
            continue
        tensors[names.router_tensor(moe)] = weight(e, h)
        if fused_experts:
            tensors[names.expert_tensor(moe, None, "w13")] = weight(e, 2 * i, h)
            tensors[names.expert_tensor(moe, None, "w2")] = weight(e, h, i)
        else:
            for x in range(e):
                tensors[names.expert_tensor(moe, x, "w1")] = weight(i, h)
                tensors[names.expert_tensor(moe, x, "w3")] = weight(i, h)
                tensors[names.expert_tensor(moe, x, "w2")] = weight(h, i)
        if arch.has_correction_bias:
            tensors[names.router_tensor(moe, CORRECTION_BIAS)] = (rng.standard_normal(e) * 0.01).astype(np.float32)
        shared = arch.shared_intermediate_size
        if shared:
            sp = names.shared_experts(moe)
            tensors[dense_tensor(sp, "w1")] = weight(shared, h)
            tensors[dense_tensor(sp, "w3")] = weight(shared, h)
            tensors[dense_tensor(sp, "w2")] = weight(h, shared)
            if names.shared_gate:
                tensors[names.shared_gate_tensor(moe)] = weight(1, h)
    return config, tensors


def _latent_attention(prefix: str, config: dict, small, norm) -> dict[str, np.ndarray]:
    """DeepSeek's multi-head latent attention tensors (transformers' names and shapes)."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    rank, nope, rope, v = (config[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q_rank = config["q_lora_rank"]
    tensors = {}
    if q_rank is None:
        tensors[f"{prefix}.q_proj.weight"] = small(heads * (nope + rope), h)
    else:
        tensors[f"{prefix}.q_a_proj.weight"] = small(q_rank, h)
        tensors[f"{prefix}.q_a_layernorm.weight"] = norm(q_rank)
        tensors[f"{prefix}.q_b_proj.weight"] = small(heads * (nope + rope), q_rank)
    tensors[f"{prefix}.kv_a_proj_with_mqa.weight"] = small(rank + rope, h)
    tensors[f"{prefix}.kv_a_layernorm.weight"] = norm(rank)
    tensors[f"{prefix}.kv_b_proj.weight"] = small(heads * (nope + v), rank)
    tensors[f"{prefix}.o_proj.weight"] = small(h, heads * v)
    return tensors


def write_float_checkpoint(
    path: str | pathlib.Path, model_type: str = "mixtral", *, tokenizer: bool = False, **kwargs
) -> pathlib.Path:
    """Write :func:`synthetic_moe` as a Hugging Face folder (config.json + model.safetensors); with
    ``tokenizer``, also :func:`write_synthetic_tokenizer`'s files (``vocab_size`` then defaults to
    :data:`SYNTHETIC_TOKENIZER_VOCAB`) and the special tokens' ids in config.json."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        kwargs.setdefault("vocab_size", SYNTHETIC_TOKENIZER_VOCAB)
    config, tensors = synthetic_moe(model_type, **kwargs)
    if tokenizer:
        config.update(write_synthetic_tokenizer(path, config["vocab_size"]))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
"""The synthetic tokenizer's special tokens (ids 256 ...): BOS, EOS and the chat turn markers."""
SYNTHETIC_TOKENIZER_VOCAB = 272
"""The synthetic model's vocabulary when it has a tokenizer: 256 byte tokens, the special tokens, padding to 16."""
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The synthetic tokenizer's chat template (ChatML turns after a BOS)."""


def _byte_characters() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_synthetic_tokenizer(path: str | pathlib.Path, vocab_size: int = SYNTHETIC_TOKENIZER_VOCAB) -> dict:
    """Write a byte-level ``tokenizer.json`` (token ``b`` is byte ``b``, no merges, so any UTF-8 text encodes
    and a multi-byte character spans several tokens) and a ``tokenizer_config.json`` with a chat template,
    through the ``tokenizers`` library. Returns config.json's ``bos_token_id`` / ``eos_token_id`` (the end of
    text and of a chat turn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a synthetic tokenizer needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    path = pathlib.Path(path)
    vocab = {c: b for b, c in enumerate(_byte_characters())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(path / "tokenizer.json"))
    bos, eos, _, end_of_turn = SPECIAL_TOKENS
    settings = {"bos_token": bos, "eos_token": eos, "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return {"bos_token_id": tok.token_to_id(bos), "eos_token_id": [tok.token_to_id(eos), tok.token_to_id(end_of_turn)]}
