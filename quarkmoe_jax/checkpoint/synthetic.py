"""Small seeded float MoE checkpoints with real Hugging Face configs and tensor names, per architecture.

Used by the tests, the CLI and the notebooks to make checkpoints without downloads; export them with
:func:`quarkmoe_jax.checkpoint.exporter.export_quark_checkpoint`. :func:`write_sparse_checkpoint` writes a
checkpoint of any config (a real model's sizes) whose headers are complete and whose data is never written
(sparse files), for what reads headers only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
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
    family_of,
    split_tensor_name,
    tensor_name,
)
from quarkmoe_jax.checkpoint.safetensors_io import DTYPES, new_checkpoint_folder, save_file
from quarkmoe_jax.errors import QuarkMoEError

__all__ = [
    "synthetic_moe",
    "tensor_specs",
    "TensorSpec",
    "write_float_checkpoint",
    "write_sparse_checkpoint",
    "SPARSE_SHARD_BYTES",
    "write_synthetic_tokenizer",
    "SPECIAL_TOKENS",
    "SYNTHETIC_TOKENIZER_VOCAB",
    "CHAT_TEMPLATE",
]


def _hf_config(
    family: ModelFamily,
    layers: int,
    hidden: int,
    intermediate: int,
    experts: int,
    top_k: int,
    vocab: int,
    heads: int = 4,
    kv_heads: int = 2,
) -> dict:
    common = {
        "model_type": family.model_type,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
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
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A float MoE language model: ``(config.json dict, {tensor name: bfloat16 / float32 array})``.

    Every tensor the whole model needs is there (embeddings, attention of the architecture's kind: GQA with
    Qwen3's q/k norms or gpt-oss's biases and sinks, DeepSeek's latent attention; norms; dense and MoE MLPs;
    LM head), so :func:`quarkmoe_jax.models.from_pretrained` runs it. Weights are Gaussian (std 0.02) with a
    few larger outliers per expert so that MX blocks see different scales; norm weights are near 1.
    ``fused_experts`` stores each layer's experts as all-expert ``gate_up_proj`` / ``down_proj`` tensors
    instead of per-expert projections (gpt-oss always uses per-expert fused ``gate_up_proj``). ``vocab_size``:
    the embedding's rows (at least :data:`SYNTHETIC_TOKENIZER_VOCAB` for :func:`write_float_checkpoint`'s
    tokenizer). ``num_heads`` / ``num_kv_heads``: attention heads (``head_dim`` = hidden / heads; DeepSeek's
    latent attention takes only ``num_heads``).
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
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )
    if num_heads % num_kv_heads or hidden_size % num_heads:
        raise QuarkMoEError(
            f"synthetic model: num_heads {num_heads} must divide hidden_size {hidden_size} and be a multiple of "
            f"num_kv_heads {num_kv_heads}"
        )
    config = _hf_config(
        family, num_layers, hidden_size, intermediate_size, num_experts, top_k, vocab_size, num_heads, num_kv_heads
    )
    rng = np.random.default_rng(seed)
    # the non-expert tensors the MoE tests never read come from their own stream, so adding them kept the
    # expert weights of every seed unchanged
    aux = np.random.default_rng([seed, 1])
    bf16 = ml_dtypes.bfloat16

    def weight(shape):
        w = rng.standard_normal(shape).astype(np.float32) * 0.02
        w.reshape(-1)[rng.integers(0, w.size, max(1, w.size // 500))] *= 8
        return w.astype(bf16)

    fill = {
        "weight": weight,
        "small": lambda shape: (aux.standard_normal(shape) * 0.02).astype(bf16),
        "norm": lambda shape: (1 + 0.1 * aux.standard_normal(shape)).astype(bf16),
        "ones": lambda shape: np.ones(shape, bf16),
        "router_bias": lambda shape: (rng.standard_normal(shape) * 0.1).astype(np.float32),
        "expert_bias": lambda shape: (rng.standard_normal(shape) * 0.02).astype(np.float32),
        "correction_bias": lambda shape: (rng.standard_normal(shape) * 0.01).astype(np.float32),
        "sinks": lambda shape: (aux.standard_normal(shape) * 0.5).astype(np.float32),
    }
    # in the specs' order: each stream is drawn in the same order as ever, so every seed gives the same tensors
    return config, {
        spec.name: fill[spec.init](spec.shape) for spec in tensor_specs(config, fused_experts=fused_experts)
    }


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a whole float model: ``name``, ``shape`` and ``init``, how :func:`synthetic_moe` fills it
    (``weight``: Gaussian with outliers; ``small``, ``norm``, ``ones``; float32 ``router_bias``,
    ``expert_bias``, ``correction_bias``, ``sinks``). ``expert``: the weight of a routed or shared expert's
    projection (what the exporter quantizes). :attr:`dtype` is its safetensors dtype."""

    name: str
    shape: tuple[int, ...]
    init: str
    expert: bool = False

    @property
    def dtype(self) -> np.dtype:
        """bfloat16, or float32 for the biases and sinks."""
        return np.dtype(np.float32 if self.init in _FLOAT32_INITS else ml_dtypes.bfloat16)


_FLOAT32_INITS = ("router_bias", "expert_bias", "correction_bias", "sinks")


def tensor_specs(config: dict[str, Any], *, fused_experts: bool = False) -> list[TensorSpec]:
    """Every tensor of the float model a config.json describes (any supported ``model_type``; sizes from the
    config, as :class:`~quarkmoe_jax.models.DecoderConfig` reads them), in :func:`synthetic_moe`'s order.

    Embeddings, LM head (unless ``tie_word_embeddings``), final norm; per layer the two norms, attention of the
    family's kind (GQA ``q/k/v/o_proj`` ``[heads * head_dim, H]`` / ``[kv_heads * head_dim, H]`` with Qwen3's
    q/k norms, gpt-oss's biases and sinks; DeepSeek's latent attention), a dense MLP of
    ``intermediate_size`` or the MoE block: router (+ bias / correction bias), routed experts per expert
    (``fused_experts``: all-expert ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``; gpt-oss: per-expert
    fused, interleaved ``gate_up_proj`` with biases), shared expert(s) and their gate.
    """
    family = family_of(config)
    arch = family.moe_architecture(config)
    c = family.reader(config)
    names = arch.names
    h, i, e = arch.hidden_size, arch.intermediate_size, arch.num_experts
    vocab = c.integer("vocab_size")
    heads = c.integer("num_attention_heads")
    kv_heads = heads if family.attention == "mla" else c.integer("num_key_value_heads", heads)
    head_dim = c.integer("head_dim", h // heads)
    specs: list[TensorSpec] = []

    def add(name: str, shape, init: str = "weight", expert: bool = False) -> None:
        specs.append(TensorSpec(name, tuple(int(d) for d in shape), init, expert))

    add("model.embed_tokens.weight", (vocab, h))
    if not c.flag("tie_word_embeddings", False):
        add("lm_head.weight", (vocab, h))
    add("model.norm.weight", (h,), "norm")
    rows = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim, "o_proj": h}
    for layer in range(arch.num_layers):
        p = decoder_layer(layer)
        add(f"{p}.input_layernorm.weight", (h,), "ones")
        add(f"{p}.post_attention_layernorm.weight", (h,), "norm")
        if family.attention == "mla":
            specs.extend(_latent_attention(f"{p}.self_attn", c, h, heads))
        else:
            for proj, out in rows.items():
                add(f"{p}.self_attn.{proj}.weight", (out, h if proj != "o_proj" else heads * head_dim))
        if family.qk_norm:
            add(f"{p}.self_attn.q_norm.weight", (head_dim,), "norm")
            add(f"{p}.self_attn.k_norm.weight", (head_dim,), "norm")
        for proj, out in rows.items():
            if proj in family.attention_bias:
                add(f"{p}.self_attn.{proj}.bias", (out,), "small")
        if family.sinks:
            add(f"{p}.self_attn.sinks", (heads,), "sinks")
        if layer not in arch.moe_layers:
            dense = c.integer("intermediate_size")
            for shard, shape in (("w1", (dense, h)), ("w3", (dense, h)), ("w2", (h, dense))):
                add(dense_tensor(dense_mlp(layer), shard), shape)
            continue
        moe = names.block(layer)
        if arch.interleaved:  # gpt-oss: per-expert fused, interleaved gate_up_proj, with biases
            add(names.router_tensor(moe), (e, h))
            add(names.router_tensor(moe, "bias"), (e,), "router_bias")
            for x in range(e):
                add(names.expert_tensor(moe, x, "w13"), (2 * i, h), expert=True)
                add(names.expert_tensor(moe, x, "w13", "bias"), (2 * i,), "expert_bias")
                add(names.expert_tensor(moe, x, "w2"), (h, i), expert=True)
                add(names.expert_tensor(moe, x, "w2", "bias"), (h,), "expert_bias")
            continue
        add(names.router_tensor(moe), (e, h))
        if fused_experts:
            add(names.expert_tensor(moe, None, "w13"), (e, 2 * i, h), expert=True)
            add(names.expert_tensor(moe, None, "w2"), (e, h, i), expert=True)
        else:
            for x in range(e):
                add(names.expert_tensor(moe, x, "w1"), (i, h), expert=True)
                add(names.expert_tensor(moe, x, "w3"), (i, h), expert=True)
                add(names.expert_tensor(moe, x, "w2"), (h, i), expert=True)
        if arch.has_correction_bias:
            add(names.router_tensor(moe, CORRECTION_BIAS), (e,), "correction_bias")
        shared = arch.shared_intermediate_size
        if shared:
            sp = names.shared_experts(moe)
            add(dense_tensor(sp, "w1"), (shared, h), expert=True)
            add(dense_tensor(sp, "w3"), (shared, h), expert=True)
            add(dense_tensor(sp, "w2"), (h, shared), expert=True)
            if names.shared_gate:
                add(names.shared_gate_tensor(moe), (1, h))
    return specs


def _latent_attention(prefix: str, c, h: int, heads: int) -> list[TensorSpec]:
    """DeepSeek's multi-head latent attention tensors (transformers' names and shapes)."""
    rank, nope, rope, v = (c.integer(k) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q_rank = c.integer("q_lora_rank", None)
    specs = []
    if q_rank is None:
        specs.append(TensorSpec(f"{prefix}.q_proj.weight", (heads * (nope + rope), h), "small"))
    else:
        specs.append(TensorSpec(f"{prefix}.q_a_proj.weight", (q_rank, h), "small"))
        specs.append(TensorSpec(f"{prefix}.q_a_layernorm.weight", (q_rank,), "norm"))
        specs.append(TensorSpec(f"{prefix}.q_b_proj.weight", (heads * (nope + rope), q_rank), "small"))
    specs.append(TensorSpec(f"{prefix}.kv_a_proj_with_mqa.weight", (rank + rope, h), "small"))
    specs.append(TensorSpec(f"{prefix}.kv_a_layernorm.weight", (rank,), "norm"))
    specs.append(TensorSpec(f"{prefix}.kv_b_proj.weight", (heads * (nope + v), rank), "small"))
    specs.append(TensorSpec(f"{prefix}.o_proj.weight", (h, heads * v), "small"))
    return specs


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


SPARSE_SHARD_BYTES = 5 * 10**9
"""The data bytes of one file of :func:`write_sparse_checkpoint` (what Hugging Face's "5GB" shards hold)."""


def write_sparse_checkpoint(
    path: str | pathlib.Path,
    hf_config: dict[str, Any],
    scheme: str | None = None,
    *,
    shard_bytes: int = SPARSE_SHARD_BYTES,
    overwrite: bool = False,
) -> pathlib.Path:
    """A checkpoint folder of any size whose tensors have real headers and no data: for what reads headers only
    (``quarkmoe plan``, ``quarkmoe inspect``), e.g. a DeepSeek-V3-sized model in a test.

    Writes ``config.json`` (``hf_config``, plus Quark's ``quantization_config`` for ``scheme``, as
    :func:`~quarkmoe_jax.checkpoint.exporter.export_quark_checkpoint` writes it) and safetensors shards of at
    most ``shard_bytes`` of data each (``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json``; one ``model.safetensors`` when everything fits one) listing every tensor
    of :func:`tensor_specs` at full size: float tensors as the float model has them, and with ``scheme`` (one
    of the exporter's ``EXPORT_SCHEMES``) every routed and shared expert weight of the MoE layers in the
    scheme's stored layout, names, dtypes and shapes taken from the exporter's own quantization of a
    sample (``.weight`` codes, ``.weight_scale``, zero points, ``.input_scale`` for static schemes).

    Each data section is only allocated (``truncate``): a sparse file, nothing written, so the folder takes the
    headers' bytes on disk, whatever its size. Reading a tensor gives zeros. Written to a temporary folder
    renamed when complete (:func:`~quarkmoe_jax.checkpoint.safetensors_io.new_checkpoint_folder`; a non-empty
    ``path`` is refused unless ``overwrite``).
    """
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
    config = dict(hf_config)
    specs = tensor_specs(config)
    if scheme is None:
        entries = [(spec.name, spec.dtype, spec.shape) for spec in specs]
    else:
        entries, quantization_config = _quantized_entries(specs, scheme)
        config["quantization_config"] = quantization_config
    shards: list[list[tuple[str, np.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    with new_checkpoint_folder(path, overwrite=overwrite) as tmp:
        if len(shards) == 1:
            _write_sparse_file(tmp / "model.safetensors", shards[0])
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards, 1):
                name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                total += _write_sparse_file(tmp / name, shard)
                weight_map.update((entry[0], name) for entry in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return pathlib.Path(path)


_SAMPLE_ELEMENTS = 1 << 20
"""What the exporter quantizes to learn an expert weight's stored layout: a weight of its own shape when it has at
most this many elements (an export of the same model then reuses the compiled calls), else of two of its rows
(the layout depends on the contraction length alone)."""


def _quantized_entries(specs: list[TensorSpec], scheme: str):
    """``(entries, quantization_config)``: ``(name, dtype, shape)`` of every tensor of the float model ``specs``
    (per-expert layout) exported with ``scheme``, and the config's ``quantization_config``, as
    :func:`~quarkmoe_jax.checkpoint.exporter.export_quark_checkpoint` makes them (the exporter's quantization of
    a sample per weight shape gives the stored tensors; ``exclude`` lists every other 2-D weight, as there)."""
    from quarkmoe_jax.checkpoint.exporter import (
        quark_quantization_config,
        scheme_has_static_input_scales,
        scheme_layer_config,
        write_quantized,
    )
    from quarkmoe_jax.schemes import get_moe_scheme

    layer_config = scheme_layer_config(scheme)
    moe_scheme = get_moe_scheme(layer_config, "quark")
    input_scale = np.asarray(1.0, np.float32) if scheme_has_static_input_scales(scheme) else None
    samples: dict[tuple[int, int], dict[str, tuple[np.dtype, tuple[int, ...]]]] = {}
    entries, exclude = [], []
    for spec in specs:
        linear, suffix = split_tensor_name(spec.name)
        if spec.expert:
            rows, contraction = spec.shape  # per-expert (or shared) weights [N, K]: every row stored alike
            sample = (rows if rows * contraction <= _SAMPLE_ELEMENTS else 2, contraction)
            if sample not in samples:
                out: dict[str, np.ndarray] = {}
                write_quantized(out, "", np.ones(sample, np.float32), moe_scheme, "even", input_scale)
                samples[sample] = {split_tensor_name(n)[1]: (a.dtype, a.shape) for n, a in out.items()}
            for stored, (dtype, shape) in samples[sample].items():
                entries.append((tensor_name(linear, stored), dtype, (rows, *shape[1:]) if shape else ()))
            continue
        entries.append((spec.name, spec.dtype, spec.shape))
        if suffix == "weight" and len(spec.shape) == 2:
            exclude.append(linear)
    quantization_config = quark_quantization_config(layer_config, exclude)
    return entries, quantization_config


_SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _write_sparse_file(path: pathlib.Path, entries) -> int:
    """One safetensors file listing ``entries`` (``(name, dtype, shape)``, laid out in name order as
    :func:`~quarkmoe_jax.checkpoint.safetensors_io.save_file` does) whose data section is allocated, not
    written; returns its data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in sorted(entries, key=lambda entry: entry[0]):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section 8-byte aligned, as save_file writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.truncate(8 + len(encoded) + offset)  # a hole: no data block is written
    return offset


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
