"""Build a :class:`~quarkmoe_jax.models.model.QuarkMoEForCausalLM` from a checkpoint folder.

Float tensors (embeddings, norms, routers, attention unless quantized) are read with their headers checked
(dtype, shape) before any data; MoE layers load through :meth:`QuarkMoEBlock.from_checkpoint`, dense MLPs as
one-expert :class:`QuarkMoE` through the same schemes; Linear layers that the Quark config quantizes
(attention projections in many exports) load as quantized :class:`Linear` through their scheme's lifecycle
(:class:`~quarkmoe_jax.schemes.linear.LinearMethod`: the checks the experts get). Any tensor the model needs and the
checkpoint lacks raises :class:`CheckpointError` naming it; nothing is returned half-built.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.checkpoint.architectures import SUFFIXES, check_layers_present
from quarkmoe_jax.checkpoint.loader import load_dense_mlp, read_hf_config
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError, CheckpointReader
from quarkmoe_jax.checkpoint.sharded_loading import load_sharded_dense_mlp
from quarkmoe_jax.contracts import check_semantics
from quarkmoe_jax.models.decoder_config import MODEL_DTYPES, DecoderConfig
from quarkmoe_jax.models.inputs import positive_int
from quarkmoe_jax.models.layers import Linear, RMSNorm
from quarkmoe_jax.models.model import Attention, DecoderLayer, LatentAttention, QuarkMoEForCausalLM
from quarkmoe_jax.models.sharding import COLUMN, LINEAR_SPLITS, ModelSharding
from quarkmoe_jax.moe.op import BACKENDS
from quarkmoe_jax.moe.sharding import MoESharding
from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock
from quarkmoe_jax.quark_config import QuarkConfig, exclude_match_budget
from quarkmoe_jax.schemes import HeaderCheckBuffer, get_moe_scheme
from quarkmoe_jax.schemes.linear import LinearMethod

__all__ = ["from_pretrained"]


@exclude_match_budget()  # one budget for every re: exclude pattern of the load
def from_pretrained(
    path: str | pathlib.Path,
    *,
    semantics: str = "vllm",
    dtype=None,
    backend: str = "auto",
    max_model_len: int | None = None,
    mesh: Mesh | MoESharding | None = None,
) -> QuarkMoEForCausalLM:
    """The model of a Hugging Face / Quark checkpoint folder (``config.json`` + safetensors).

    Args:
      path: the folder (quantized by Quark, partly quantized or float).
      semantics: "vllm" (what vLLM's Quark methods compute) or "quark" (Quark's own fake-quant), for every
        quantized layer (docs/checkpoints.md).
      dtype: the activation dtype and that of the float weights (default: the config's ``dtype`` /
        ``torch_dtype``, else float32).
      backend: the MoE backend of every MoE layer ("auto": the fastest measured here; the emulation on CPU).
      max_model_len: the most positions a sequence may have (prompt + generated tokens); default the config's
        ``max_position_embeddings`` (docs/models.md, "Limits").
      mesh: split the model over a ``jax.sharding.Mesh`` with :func:`~quarkmoe_jax.moe.sharding.moe_mesh`'s axes
        (``data``, ``expert``, ``tensor``; or an :class:`~quarkmoe_jax.moe.sharding.MoESharding` to choose the
        experts' placement and exchange): experts over ``expert`` x ``tensor``, attention heads, dense MLPs and
        the vocabulary over ``tensor`` (:mod:`quarkmoe_jax.models.sharding`). Every tensor is read per shard
        from the memory-mapped files (docs/distributed.md, "Whole models").

    Returns:
      :class:`QuarkMoEForCausalLM`; ``model(input_ids)`` gives float32 logits ``[B, T, vocab]``.
    """
    check_semantics(semantics)
    if max_model_len is not None:
        positive_int(max_model_len, "max_model_len")  # before the weights are read
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    hf_config = read_hf_config(path)
    config = DecoderConfig.from_hf_config(hf_config)
    if dtype is None:
        dtype = config.dtype
    dtype = jnp.dtype(dtype)
    if dtype.name not in MODEL_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    quark = QuarkConfig.from_hf_config(hf_config) if "quantization_config" in hf_config else None
    sharding = None if mesh is None else ModelSharding.of(mesh, config)
    with CheckpointReader(path) as reader:
        check_layers_present(reader, config.num_layers)
        tensors = _Tensors(reader, quark, semantics, dtype, sharding)
        h, v = config.hidden_size, config.vocab_size
        embed = tensors.embedding("model.embed_tokens.weight", (v, h))
        lm_head = None
        if not config.tie_word_embeddings:
            lm_head = tensors.linear("lm_head", v, h, rows=None if sharding is None else sharding.padded_vocab)
        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}"
            attn = _attention(tensors, config, i, f"{p}.self_attn")
            if i in config.moe.moe_layers:
                mlp = None  # loaded below, outside this reader (the block loader opens its own)
            elif sharding is not None:
                loaded = load_sharded_dense_mlp(
                    reader, f"{p}.mlp", h, config.dense_intermediate_size, quark, sharding.dense, semantics, dtype
                )
                mlp = QuarkMoE.from_loaded(loaded, activation="silu", sharding=sharding.dense)
            else:
                loaded = load_dense_mlp(
                    reader, f"{p}.mlp", h, config.dense_intermediate_size, quark, semantics, float_dtype=dtype
                )
                mlp = QuarkMoE.from_loaded(loaded, activation="silu")
            layers.append(
                [
                    tensors.norm(f"{p}.input_layernorm.weight", h, config),
                    attn,
                    tensors.norm(f"{p}.post_attention_layernorm.weight", h, config),
                    mlp,
                ]
            )
        norm = tensors.norm("model.norm.weight", h, config)
    decoder_layers = []
    for i, (norm1, attn, norm2, mlp) in enumerate(layers):
        if mlp is None:
            mlp = QuarkMoEBlock.from_checkpoint(
                path,
                i,
                semantics=semantics,
                float_dtype=dtype,
                backend=backend,
                sharding=None if sharding is None else sharding.moe,
            )
        elif jax.default_backend() == "gpu":
            mlp.prepare_for_kernels(backend)
        decoder_layers.append(DecoderLayer(norm1, attn, norm2, mlp))
    model = QuarkMoEForCausalLM(
        config,
        embed,
        decoder_layers,
        norm,
        lm_head,
        dtype=dtype,
        backend=backend,
        max_model_len=max_model_len,
        sharding=sharding,
    )
    if sharding is not None:
        sharding.replicate_rest(model)  # the routers the block loader read whole
    elif jax.default_backend() == "gpu":
        model.prepare_linears_for_kernels(backend)
    return model


def _attention(tensors: _Tensors, config: DecoderConfig, layer: int, prefix: str):
    h, heads = config.hidden_size, config.num_heads
    if config.mla is not None:
        mla = config.mla
        projections, norms = {}, {}
        if mla.q_lora_rank is None:
            projections["q_proj"] = tensors.linear(f"{prefix}.q_proj", heads * mla.qk_head_dim, h)
        else:
            projections["q_a_proj"] = tensors.linear(f"{prefix}.q_a_proj", mla.q_lora_rank, h)
            norms["q_a_layernorm"] = tensors.norm(f"{prefix}.q_a_layernorm.weight", mla.q_lora_rank, config)
            projections["q_b_proj"] = tensors.linear(f"{prefix}.q_b_proj", heads * mla.qk_head_dim, mla.q_lora_rank)
        projections["kv_a_proj_with_mqa"] = tensors.linear(
            f"{prefix}.kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim, h
        )
        norms["kv_a_layernorm"] = tensors.norm(f"{prefix}.kv_a_layernorm.weight", mla.kv_lora_rank, config)
        projections["kv_b_proj"] = tensors.linear(
            f"{prefix}.kv_b_proj", heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank
        )
        projections["o_proj"] = tensors.linear(f"{prefix}.o_proj", h, heads * mla.v_head_dim)
        return LatentAttention(config, projections, norms)
    d, kv = config.head_dim, config.num_kv_heads
    kv_rows = None if tensors.sharding is None else tensors.sharding.kv_head_rows(d)  # heads repeated to tp
    projections = {
        "q_proj": tensors.linear(f"{prefix}.q_proj", heads * d, h),
        "k_proj": tensors.linear(f"{prefix}.k_proj", kv * d, h, rows=kv_rows),
        "v_proj": tensors.linear(f"{prefix}.v_proj", kv * d, h, rows=kv_rows),
        "o_proj": tensors.linear(f"{prefix}.o_proj", h, heads * d),
    }
    norms = None
    if config.qk_norm:
        norms = {
            "q_norm": tensors.norm(f"{prefix}.q_norm.weight", d, config),
            "k_norm": tensors.norm(f"{prefix}.k_norm.weight", d, config),
        }
    sinks = tensors.float(f"{prefix}.sinks", (heads,), np.float32, split=True) if config.sinks else None
    return Attention(config, layer, projections, norms, sinks)


class _Tensors:
    """Reads the non-expert tensors, checking each header before its data; with a ``sharding``, each device
    reads only its block from the memory-mapped file, placed as :class:`ModelSharding` says."""

    def __init__(self, reader: CheckpointReader, quark: QuarkConfig | None, semantics: str, dtype, sharding=None):
        self.reader, self.quark, self.semantics, self.dtype = reader, quark, semantics, dtype
        self.sharding: ModelSharding | None = sharding

    def _info(self, name: str):
        if name not in self.reader:
            raise CheckpointError(f"missing tensor {name!r} (the model needs it)")
        return self.reader.info(name)

    def _check_float(self, name: str, shape: tuple[int, ...]) -> None:
        found_dtype, found = self._info(name)
        if found_dtype.kind != "f" and found_dtype.name != "bfloat16":
            raise CheckpointError(f"{name}: expected a float tensor, found dtype {found_dtype}")
        if tuple(found) != tuple(shape):
            raise CheckpointError(f"{name}: shape {tuple(found)}, expected {tuple(shape)}")

    def float(self, name: str, shape: tuple[int, ...], dtype=None, *, split: bool = False, spec=None, rows=None):
        """A float tensor in ``dtype`` (default float32): a host array, or on the mesh split by ``spec`` (a
        vector ``split`` with its rows; default replicated), ``rows`` as :meth:`ModelSharding.from_view` takes
        it (zero-padded rows, or the checkpoint row of each row)."""
        self._check_float(name, shape)
        dtype = dtype or np.float32
        if self.sharding is None:
            return np.asarray(self.reader[name].astype(np.float32), dtype)
        if spec is None:
            length = shape[0] if rows is None else (rows if np.ndim(rows) == 0 else len(rows))
            spec = self.sharding.vector_spec(length, split) if split else P()
        return self.sharding.from_view(self.reader.view(name), spec, dtype, rows)

    def embedding(self, name: str, shape: tuple[int, int]):
        """``[V, H]`` (on a mesh: ``[padded V, H]``, vocabulary rows split) in the model's dtype."""
        if self.sharding is None:
            return self.float(name, shape)
        return self.float(name, shape, self.dtype, spec=self.sharding.vocab_spec(), rows=self.sharding.padded_vocab)

    def norm(self, name: str, dim: int, config: DecoderConfig) -> RMSNorm:
        return RMSNorm(self.float(name, (dim,)), config.rms_norm_eps)

    def linear(self, name: str, out_features: int, in_features: int, rows=None) -> Linear:
        """``<name>.weight`` (+ ``.bias`` if present; + scales when the Quark config quantizes it); on a mesh
        split as :data:`LINEAR_SPLITS` says for its last name component, its output rows as ``rows`` says
        (a mesh only: an int pads float rows with zeros, the padded vocabulary of the LM head; an index array
        picks the checkpoint row of each row, the repeated key / value heads)."""
        bias = None
        split = LINEAR_SPLITS[name.rsplit(".", 1)[-1]]
        picked = rows if rows is not None and np.ndim(rows) == 1 else None
        if f"{name}.bias" in self.reader:
            bias = self.float(f"{name}.bias", (out_features,), split=split == COLUMN, rows=picked)
        layer_config = self.quark.resolve(name, "Linear", child_names=[name]) if self.quark else None
        if layer_config is None or layer_config.weight is None:
            shape = (out_features, in_features)
            if self.sharding is None:
                weight = jnp.asarray(self.float(f"{name}.weight", shape), self.dtype)
            else:
                length = out_features if rows is None else (rows if np.ndim(rows) == 0 else len(rows))
                spec = self.sharding.matrix_spec((length, in_features), split)
                weight = self.float(f"{name}.weight", shape, self.dtype, spec=spec, rows=rows)
            return Linear(weight, bias=bias)
        method = LinearMethod(get_moe_scheme(layer_config, self.semantics, layer=name), out_features, in_features)
        quant = method.quant_config()
        if quant.activation.kind in ("fp8", "int8") and quant.activation.granularity == "channel":
            raise CheckpointError(
                f"{name}: dynamic per-channel (ch_axis 1) input quantization of a Linear layer is not supported"
            )
        params = self._through_scheme(name, method)
        weight, input_scale = params["weight"], params["input_scale"]
        if self.sharding is not None:  # one tensor whole on the host at a time (the scheme's checks need it)
            weight = self.sharding.place_linear(weight, split, picked)
            if input_scale is not None:
                input_scale = self.sharding.place(jnp.asarray(input_scale, jnp.float32), P())
        return Linear(weight, bias=bias, input_scale=input_scale, quant=quant)

    def _through_scheme(self, name: str, method: LinearMethod) -> dict:
        """The Linear's quantized tensors through its scheme's lifecycle (the experts' checks: dtypes, shapes,
        NaN E8M0 and non-positive scales, zero points): every header first, then the data."""
        buffers = {key: spec.allocate() for key, spec in method.create_weights().items()}
        for suffix in method.required_suffixes():
            self._info(f"{name}.{suffix}")  # a missing tensor is named
        present = [s for s in SUFFIXES if s != "bias" and f"{name}.{s}" in self.reader]
        stand_ins = {key: HeaderCheckBuffer() for key in buffers}
        method.scheme.values_checked = False
        try:
            for suffix in present:
                dtype, shape = self.reader.info(f"{name}.{suffix}")
                stand_in = np.broadcast_to(np.zeros((), dtype), shape)
                method.load_weights(stand_ins, suffix, stand_in, f"{name}.{suffix}")
        finally:
            method.scheme.values_checked = True
        for suffix in present:
            method.load_weights(buffers, suffix, self.reader[f"{name}.{suffix}"], f"{name}.{suffix}")
        return method.process_weights_after_loading(buffers)
