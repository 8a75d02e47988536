"""A whole decoder-only MoE model in Flax NNX: embeddings, attention, dense MLPs, Quark MoE blocks, LM head.

One class covers Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 / V3 and gpt-oss; the differences are the
:class:`~quarkmoe_jax.models.decoder_config.DecoderConfig` fields (rope kind and layout, Qwen3's q/k norm, gpt-oss's
sinks, biases and sliding layers, DeepSeek's latent attention, which layers are MoE). Build it with
:func:`quarkmoe_jax.models.from_pretrained`.

Shapes: ``input_ids`` int32 ``[B, T]``; hidden states ``[B, T, H]`` in the model's ``dtype``; logits float32
``[B, T, vocab]``. The KV cache (:meth:`QuarkMoEForCausalLM.init_cache`) is a list with one dict per layer of
static-shape arrays ``[B, S, ...]`` written at positions ``start .. start + T - 1``.

What a caller passes is checked before anything is allocated (:mod:`quarkmoe_jax.models.inputs`); a refusal is
an :class:`~quarkmoe_jax.errors.InputError`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.models import inputs
from quarkmoe_jax.models.decoder_config import DecoderConfig
from quarkmoe_jax.models.layers import Linear, RMSNorm, apply_rope, attention, rope_tables
from quarkmoe_jax.models.paged import (
    XLA_ATTENTION,
    PagedAttention,
    PagedBatch,
    resolve_attention_backend,
    write_contiguous,
)
from quarkmoe_jax.models.sampling import sample_tokens
from quarkmoe_jax.models.sharding import ModelSharding
from quarkmoe_jax.moe.buckets import token_bucket
from quarkmoe_jax.nn import QuarkMoEBlock

__all__ = ["Attention", "LatentAttention", "DecoderLayer", "QuarkMoEForCausalLM", "sample_tokens"]


class Attention(nnx.Module):
    """Grouped-query attention (Mixtral, Qwen2/3-MoE, gpt-oss).

    ``q_proj [Hq*D, H]``, ``k_proj`` / ``v_proj [Hkv*D, H]``, ``o_proj [H, Hq*D]`` (:class:`Linear`, biases where
    the checkpoint has them); Qwen3's ``q_norm`` / ``k_norm`` (RMSNorm over D, before the rotation); gpt-oss's
    ``sinks [Hq]``. Cache entry: ``{"k": [B, S, Hkv, D], "v": [B, S, Hkv, D]}``.
    """

    cache_keys, cache_value = ("k",), "v"  # the key's and the value's cache entries (models.paged)

    def __init__(self, config: DecoderConfig, layer: int, projections: dict[str, Linear], norms=None, sinks=None):
        self.q_proj, self.k_proj = projections["q_proj"], projections["k_proj"]
        self.v_proj, self.o_proj = projections["v_proj"], projections["o_proj"]
        norms = norms or {}
        self.q_norm, self.k_norm = norms.get("q_norm"), norms.get("k_norm")
        self.sinks = None if sinks is None else nnx.Param(jnp.asarray(sinks, jnp.float32))
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        # the heads k_proj holds: the config's, or on a mesh with fewer heads than tensor shards each repeated
        self.num_kv_heads = self.k_proj.out_features // self.head_dim
        self.scale = config.attention_scale
        self.window = config.sliding_windows[layer]
        self.pairs = config.rope.pairs

    def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, positions, cos, sin, cache=None, start=0, valid=None, paged=None):
        b, t, _ = x.shape
        q = self.q_proj(x, valid).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, valid).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, valid).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, self.pairs), apply_rope(k, cos, sin, self.pairs)
        sinks = None if self.sinks is None else self.sinks.get_value()
        if paged is not None:
            cache = paged.write(cache, {"k": k, "v": v})
            out = paged.attend(
                q[0], cache, self.cache_keys, self.cache_value, scale=self.scale, window=self.window, sinks=sinks
            )
            return self.o_proj(out.reshape(b, t, -1), valid), cache
        cache, read, k_positions = write_contiguous(cache, {"k": k, "v": v}, start)
        out = attention(
            q,
            read["k"].astype(q.dtype),
            read["v"].astype(q.dtype),
            positions,
            positions if k_positions is None else k_positions,
            scale=self.scale,
            window=self.window,
            sinks=sinks,
        )
        return self.o_proj(out.reshape(b, t, -1), valid), cache


class LatentAttention(nnx.Module):
    """DeepSeek's multi-head latent attention, computed in its absorbed form.

    Projections: ``q_proj [Hq*(dn+dr), H]`` or ``q_a_proj [rq, H]`` + ``q_a_layernorm`` + ``q_b_proj``;
    ``kv_a_proj_with_mqa [r+dr, H]`` (the latent ``c`` and the shared rotary key), ``kv_a_layernorm [r]``,
    ``kv_b_proj [Hq*(dn+dv), r]``, ``o_proj [H, Hq*dv]``. Scores are ``q_nope W_uk c + q_rot k_rot`` and the
    output ``W_uv (p c)``, with ``W_uk`` / ``W_uv`` the two halves of ``kv_b_proj``'s dequantized weight, as
    vLLM's MLA does, so the cache holds only the latent: ``{"latent": [B, S, r], "k_rot": [B, S, dr]}``
    (equal to transformers' expanded form up to float rounding).
    """

    cache_keys, cache_value = ("latent", "k_rot"), None  # keys [latent | k_rot]; the latent is the value
    dequantized_linears = ("kv_b_proj",)  # read as dequantized weights (absorbed), not multiplied as a Linear

    def __init__(self, config: DecoderConfig, projections: dict[str, Linear], norms: dict[str, RMSNorm]):
        mla = config.mla
        self.q_proj = projections.get("q_proj")
        self.q_a_proj, self.q_b_proj = projections.get("q_a_proj"), projections.get("q_b_proj")
        self.q_a_layernorm = norms.get("q_a_layernorm")
        self.kv_a_proj_with_mqa = projections["kv_a_proj_with_mqa"]
        self.kv_a_layernorm = norms["kv_a_layernorm"]
        self.kv_b_proj, self.o_proj = projections["kv_b_proj"], projections["o_proj"]
        self.num_heads = config.num_heads
        self.nope, self.rope_dim, self.v_dim, self.rank = (
            mla.qk_nope_head_dim,
            mla.qk_rope_head_dim,
            mla.v_head_dim,
            mla.kv_lora_rank,
        )
        self.scale = config.attention_scale
        self.pairs = config.rope.pairs

    def init_cache(self, batch: int, length: int, dtype) -> dict[str, jax.Array]:
        return {
            "latent": jnp.zeros((batch, length, self.rank), dtype),
            "k_rot": jnp.zeros((batch, length, self.rope_dim), dtype),
        }

    def __call__(self, x, positions, cos, sin, cache=None, start=0, valid=None, paged=None):
        b, t, _ = x.shape
        h = self.num_heads
        if self.q_proj is not None:
            q = self.q_proj(x, valid)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, valid)), valid)
        q = q.reshape(b, t, h, self.nope + self.rope_dim)
        q_nope, q_rot = q[..., : self.nope], q[..., self.nope :]
        compressed = self.kv_a_proj_with_mqa(x, valid)
        latent = self.kv_a_layernorm(compressed[..., : self.rank])
        k_rot = compressed[..., self.rank :][:, :, None, :]
        q_rot, k_rot = apply_rope(q_rot, cos, sin, self.pairs), apply_rope(k_rot, cos, sin, self.pairs)[:, :, 0]
        w = self.kv_b_proj.dequantized_weight(jnp.float32).reshape(h, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_latent = jnp.einsum("bthn,hnr->bthr", q_nope, w_uk, precision=lax.Precision.HIGHEST).astype(x.dtype)
        # multi-query attention over [latent | k_rot] keys with the latent as the value
        queries = jnp.concatenate([q_latent, q_rot], axis=-1)
        if paged is not None:
            cache = paged.write(cache, {"latent": latent, "k_rot": k_rot})
            context = paged.attend(queries[0], cache, self.cache_keys, self.cache_value, scale=self.scale)
        else:
            cache, read, k_positions = write_contiguous(cache, {"latent": latent, "k_rot": k_rot}, start)
            latents = read["latent"].astype(x.dtype)
            keys = jnp.concatenate([latents, read["k_rot"].astype(x.dtype)], axis=-1)[:, :, None, :]
            k_positions = positions if k_positions is None else k_positions
            context = attention(queries, keys, latents[:, :, None, :], positions, k_positions, scale=self.scale)
        context = context.reshape(b, t, h, self.rank)
        out = jnp.einsum("bthr,hvr->bthv", context, w_uv, precision=lax.Precision.HIGHEST).astype(x.dtype)
        return self.o_proj(out.reshape(b, t, h * self.v_dim), valid), cache


class DecoderLayer(nnx.Module):
    """``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``; ``mlp`` is a :class:`QuarkMoEBlock` (MoE layers) or a
    one-expert :class:`QuarkMoE` (a dense gated MLP, quantized as the checkpoint says)."""

    def __init__(self, input_layernorm: RMSNorm, attn, post_attention_layernorm: RMSNorm, mlp):
        self.input_layernorm = input_layernorm
        self.self_attn = attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def __call__(self, x, positions, cos, sin, cache=None, start=0, valid=None, backend="auto", paged=None):
        b, t, hidden = x.shape
        attn_out, cache = self.self_attn(self.input_layernorm(x), positions, cos, sin, cache, start, valid, paged)
        h = x + attn_out
        y = self.post_attention_layernorm(h).reshape(b * t, hidden)
        valid_rows = None if valid is None else jnp.broadcast_to(valid[None, :], (b, t)).reshape(-1)
        if isinstance(self.mlp, QuarkMoEBlock):
            m = self.mlp(y, backend=backend, valid_tokens=valid_rows)
        else:
            ones, zeros = jnp.ones((b * t, 1), jnp.float32), jnp.zeros((b * t, 1), jnp.int32)
            m = self.mlp.apply(y, ones, zeros, backend=backend, valid_tokens=valid_rows)
        return h + m.reshape(b, t, hidden).astype(h.dtype), cache


class QuarkMoEForCausalLM(nnx.Module):
    """A decoder-only MoE language model whose MoE layers are Quark-quantized :class:`QuarkMoEBlock` s.

    Attributes: ``embed_tokens`` ``nnx.Param [V, H]`` (``dtype``), ``layers`` (``nnx.List`` of
    :class:`DecoderLayer`), ``norm`` (:class:`RMSNorm`), ``lm_head`` (:class:`Linear` ``[V, H]``, or None when
    tied to the embeddings). Static: ``config`` (:class:`DecoderConfig`), ``dtype``, ``backend``,
    ``max_model_len`` (None: the context is the config's ``max_position_embeddings``; see :attr:`context`),
    ``sharding`` (a :class:`~quarkmoe_jax.models.sharding.ModelSharding` when the parameters are split over a
    mesh: then ``embed_tokens`` and ``lm_head`` hold its padded vocabulary's rows and caches are allocated split
    over the devices; None on one device).
    """

    def __init__(
        self,
        config: DecoderConfig,
        embed_tokens,
        layers,
        norm: RMSNorm,
        lm_head: Linear | None,
        *,
        dtype=jnp.float32,
        backend: str = "auto",
        max_model_len: int | None = None,
        sharding: ModelSharding | None = None,
    ):
        self.config = config
        self.sharding = sharding
        self.dtype = jnp.dtype(dtype)
        self.backend = backend
        self.max_model_len = None if max_model_len is None else inputs.positive_int(max_model_len, "max_model_len")
        self.embed_tokens = nnx.Param(jnp.asarray(embed_tokens, dtype))
        self.layers = nnx.List(layers)
        self.norm = norm
        self.lm_head = lm_head
        rope = config.rope
        self._inverse_frequencies = tuple(float(f) for f in rope.inverse_frequencies())

    # ---------------------------------------------------------------------------------------------- forward

    @property
    def context(self) -> inputs.Context:
        """The most positions a sequence may have: ``max_model_len`` if set, else the config's
        ``max_position_embeddings``, else :data:`~quarkmoe_jax.models.inputs.DEFAULT_CONTEXT`."""
        return inputs.context_of(self.config, self.max_model_len)

    def init_cache(self, batch: int, length: int, dtype=None) -> list[dict[str, jax.Array]]:
        """An empty KV cache for ``batch`` sequences of up to ``length`` positions (``dtype``: the model's, or
        a float dtype). ``batch`` and ``length`` are positive integers; a cache larger than the device's
        memory is refused before it is allocated (:class:`InputError`)."""
        batch, length = inputs.positive_int(batch, "batch"), inputs.positive_int(length, "length")
        dtype = jnp.dtype(dtype or self.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise InputError(f"dtype of a KV cache must be a float dtype, got {dtype}")
        inputs.check_cache_size(self.config, batch, length, dtype)
        return self._allocate_cache(batch, length, dtype)

    def _allocate_cache(self, batch: int, length: int, dtype) -> list[dict[str, jax.Array]]:
        if self.sharding is not None:
            return self.sharding.allocate_cache(self._expected_cache(batch, length, dtype))
        return [layer.self_attn.init_cache(batch, length, dtype) for layer in self.layers]

    def _expected_cache(self, batch: int, length: int, dtype) -> list[dict[str, jax.ShapeDtypeStruct]]:
        return jax.eval_shape(lambda: [layer.self_attn.init_cache(batch, length, dtype) for layer in self.layers])

    def hidden_states(self, input_ids, *, cache=None, start=0, valid=None):
        """The final-norm hidden states ``[B, T, H]`` and the updated cache (None without one).

        ``start``: the position of ``input_ids[:, 0]`` (int or int32 scalar); ``valid``: optional bool ``[T]``,
        False for padding positions (they enter no MoE statistic and nothing attends to them later).
        """
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise InputError(f"input_ids must be an integer array [B, T], got {ids.dtype} {tuple(ids.shape)}")
        t = ids.shape[1]
        positions = jnp.asarray(start, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        cos, sin = rope_tables(
            np.asarray(self._inverse_frequencies, np.float32), positions, self.config.rope.attention_factor
        )
        cos, sin = cos[None], sin[None]
        x = jnp.take(self.embed_tokens.get_value(), ids, axis=0)
        return self._decoder(x, positions, cos, sin, cache, start, valid)

    def _decoder(self, x, positions, cos, sin, cache, start, valid, paged=None):
        new_cache = None if cache is None else []
        for i, layer in enumerate(self.layers):
            entry = None if cache is None else cache[i]
            x, entry = layer(x, positions, cos, sin, entry, start, valid, self.backend, paged)
            if cache is not None:
                new_cache.append(entry)
        return self.norm(x), new_cache

    def prepare_linears_for_kernels(self, backend: str | None = "auto") -> QuarkMoEForCausalLM:
        """Lay the MX attention projections out once for the kernel backend (:meth:`Linear.prepare_for_kernels`;
        ``from_pretrained`` does it on a GPU for a one-device model), so a decode step's projections read their
        packed bytes instead of dequantizing whole weights; returns the model."""
        for layer in self.layers:
            attn = layer.self_attn
            for name, value in vars(attn).items():
                if isinstance(value, Linear) and name not in getattr(attn, "dequantized_linears", ()):
                    value.prepare_for_kernels(backend)
        return self

    def shard(self, mesh) -> QuarkMoEForCausalLM:
        """Move this one-device model onto ``mesh`` (a :func:`~quarkmoe_jax.moe.sharding.moe_mesh`, or an
        :class:`~quarkmoe_jax.moe.sharding.MoESharding`), in place, split as ``from_pretrained(path, mesh=...)``
        loads it (:meth:`ModelSharding.shard_model`: experts still in Quark's layout); returns it."""
        return ModelSharding.of(mesh, self.config).shard_model(self)

    def init_paged_cache(self, num_blocks: int, block_size: int, dtype=None) -> list[dict[str, jax.Array]]:
        """An empty paged KV cache (:mod:`~quarkmoe_jax.models.paged`): per layer ``{name: [num_blocks,
        block_size, ...]}``, the contiguous cache's entries with blocks for sequences (``dtype``: the model's)."""
        num_blocks, block_size = (
            inputs.positive_int(num_blocks, "num_blocks"),
            inputs.positive_int(block_size, "block_size"),
        )
        dtype = jnp.dtype(dtype or self.dtype)
        inputs.check_cache_size(self.config, num_blocks, block_size, dtype)
        return self._allocate_cache(num_blocks, block_size, dtype)

    def paged_attention_backend(
        self, requested: str, block_size: int, num_tokens: int | None = None, context: int | None = None
    ) -> str:
        """The attention backend (:func:`~quarkmoe_jax.models.paged.attention_backends`) that ``requested``
        ("auto", "xla" or "pallas") gives for a paged cache of ``block_size`` (refused with the reason where the
        kernel cannot take this model's head dims: :func:`~quarkmoe_jax.models.paged.resolve_attention_backend`);
        with ``num_tokens`` and ``context``, ``auto``'s choice for a step of that many tokens. On a mesh the
        attention runs as XLA's partitioned program (no kernel yet): ``auto`` gives XLA, a kernel is refused."""
        if self.sharding is not None:
            if requested not in ("auto", XLA_ATTENTION):
                raise InputError(
                    f"attention_backend {requested!r} does not run on a mesh yet; use 'auto' or {XLA_ATTENTION!r}",
                    field="attention_backend",
                )
            return XLA_ATTENTION
        chosen = set()
        for layer in self.layers:
            attn = layer.self_attn
            shapes = jax.eval_shape(lambda attn=attn: attn.init_cache(1, block_size, self.dtype))
            key_dims = tuple(shapes[name].shape[-1] for name in attn.cache_keys)
            value_dim = shapes[attn.cache_value or attn.cache_keys[0]].shape[-1]
            chosen.add(resolve_attention_backend(requested, key_dims, value_dim, block_size, num_tokens, context))
        return chosen.pop() if len(chosen) == 1 else XLA_ATTENTION

    def paged_logits(self, input_ids, batch: PagedBatch, cache, attention_backend: str = XLA_ATTENTION):
        """One step of a paged batch (jit-traceable): ``input_ids`` int32 ``[N]`` (the step's tokens, flattened
        over its sequences) -> ``(logits float32 [S, V]`` at each sequence's ``batch.last_token``, the updated
        cache). Keys and values of every valid token are written at its slot before any token attends;
        ``attention_backend``: static, :meth:`paged_attention_backend`'s answer."""
        positions = batch.positions
        cos, sin = rope_tables(
            np.asarray(self._inverse_frequencies, np.float32), positions, self.config.rope.attention_factor
        )
        x = jnp.take(self.embed_tokens.get_value(), input_ids, axis=0)[None]
        step = PagedAttention(batch, attention_backend)
        hidden, cache = self._decoder(x, positions, cos[None], sin[None], cache, 0, batch.valid, step)
        return self.logits(hidden[0][batch.last_token]), cache

    def logits(self, hidden):
        """float32 ``[..., V]`` of final hidden states ``[..., H]`` (a mesh's vocabulary padding dropped)."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden).astype(jnp.float32)
        else:
            w = self.embed_tokens.get_value()
            logits = jnp.dot(hidden, w.T, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        logits = logits[..., : self.config.vocab_size]
        if self.sharding is not None:  # whole on every device: each host reads them (multi-host), samples alike
            logits = lax.with_sharding_constraint(logits, self.sharding.named(P()))
        return logits

    def __call__(self, input_ids, *, cache=None, start=0):
        """Logits float32 ``[B, T, V]`` of ``input_ids`` integer ``[B, T]``; with a ``cache``, ``(logits, cache)``.

        ``input_ids``: B >= 1 sequences of 1 <= T <= :attr:`context` tokens, each in ``[0, vocab)``. ``cache``:
        what :meth:`init_cache` ``(B, S)`` returned (or a previous call), ``start``: the position of
        ``input_ids[:, 0]``, an integer with ``0 <= start`` and ``start + T <= min(S, context)``. Anything else
        raises :class:`InputError` before the forward runs. Inside ``jit`` only shapes and dtypes are checked
        (a traced ``start`` or traced ids cannot be: out-of-range values there are the caller's to avoid).

        Called eagerly (outside ``jit``) without a cache, the forward runs as one compiled program per
        (B, token bucket): T is padded to the bucket (1, 2, 4, ..., as the MoE layers bucket tokens).
        """
        ids = inputs.check_input_ids(input_ids, self.config.vocab_size, self.context)
        if cache is not None:
            batch, t = ids.shape
            length = inputs.check_cache(cache, batch, len(self.layers), self._expected_cache)
            inputs.check_start(start, t, length, self.context)
            hidden, cache = self.hidden_states(ids, cache=list(cache), start=start)
            return self.logits(hidden), cache
        if isinstance(ids, jax.core.Tracer):
            return self.logits(self.hidden_states(ids)[0])
        t = ids.shape[1]
        bucket = token_bucket(t)
        padded = np.zeros((ids.shape[0], bucket), np.int32)
        padded[:, :t] = ids
        graphdef, state = nnx.split(self)
        valid = np.arange(bucket) < t
        return _full_forward(graphdef, state, jax.device_put(padded), jax.device_put(valid))[:, :t]

    # ------------------------------------------------------------------------------------------- generation

    def generate(
        self,
        input_ids,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        key: jax.Array | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> np.ndarray:
        """Extend ``input_ids`` integer ``[B, T]`` by up to ``max_new_tokens`` tokens with a KV cache.

        ``temperature`` 0: greedy (argmax); otherwise sample from ``softmax(logits / temperature)`` restricted to
        the smallest set of tokens whose probability reaches ``top_p`` (``key`` required: an explicit
        ``jax.random`` key, split once per step). ``eos_token_id``: a row stops at it and is filled with it
        afterwards; generation ends early once every row has stopped (default: the config's
        ``eos_token_id``; pass ``[]`` to never stop).

        Checked before anything is allocated (:func:`~quarkmoe_jax.models.inputs.check_generation`; a refusal
        is an :class:`InputError`): ``input_ids`` B >= 1 rows of T >= 1 ids in ``[0, vocab)``;
        ``max_new_tokens`` an integer >= 0 with ``T + max_new_tokens <= context`` (:attr:`context`);
        ``temperature`` 0 or a positive normal float32, ``top_p`` in ``(0, 1]``, both finite numbers; ``key`` one
        PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``); ``eos_token_id`` ids in
        ``[0, vocab)``; the KV cache within the device's memory.

        Compiles one prefill per (B, prompt bucket) and one decode loop per (B, cache length, bucket of
        ``max_new_tokens``); the cache length is ``token_bucket(max(bucket, T + max_new_tokens))``. The decode
        loop runs on the device (``lax.while_loop``, stop tokens checked there): the tokens come to the host
        once. Returns int32 ``[B, T + n]`` (host array), ``n <= max_new_tokens``. Many requests of different
        lengths: :mod:`quarkmoe_jax.serving`.
        """
        request = inputs.check_generation(
            self.config,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            key=key,
            eos_token_id=eos_token_id,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
        )
        ids, max_new_tokens, eos = request.input_ids, request.max_new_tokens, request.eos_token_ids
        greedy = request.greedy
        b, t = ids.shape
        if max_new_tokens == 0:
            return ids
        bucket = request.prompt_bucket
        padded = np.zeros((b, bucket), np.int32)
        padded[:, :t] = ids
        graphdef, state = nnx.split(self)
        cache = self._allocate_cache(b, request.cache_length, self.dtype)
        key = jax.random.key(0) if request.key is None else request.key
        params = (jnp.float32(1.0 if greedy else request.temperature), jnp.float32(request.top_p))
        key, step_key = jax.random.split(key)
        token, cache = _prefill(
            graphdef, state, jax.device_put(padded), jnp.int32(t), cache, step_key, *params, greedy=greedy
        )
        tokens, count, _ = _decode_loop(
            graphdef,
            state,
            token,
            jnp.int32(t),
            cache,
            key,
            *params,
            jnp.asarray(eos, jnp.int32),
            jnp.int32(max_new_tokens),
            greedy=greedy,
            out_size=token_bucket(max_new_tokens),
        )
        return np.concatenate([ids, np.asarray(tokens)[:, : int(count)]], axis=1)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"QuarkMoEForCausalLM({c.model_type}, layers={c.num_layers}, hidden={c.hidden_size}, "
            f"vocab={c.vocab_size}, moe_layers={len(c.moe.moe_layers)}, dtype={self.dtype.name})"
        )


@jax.jit
def _full_forward(graphdef, state, ids, valid):
    model = nnx.merge(graphdef, state)
    return model.logits(model.hidden_states(ids, valid=valid)[0])


@functools.partial(jax.jit, static_argnames=("greedy",), donate_argnames=("cache",))
def _prefill(graphdef, state, ids, length, cache, key, temperature, top_p, *, greedy):
    model = nnx.merge(graphdef, state)
    valid = jnp.arange(ids.shape[1]) < length
    hidden, cache = model.hidden_states(ids, cache=cache, start=0, valid=valid)
    last = lax.dynamic_index_in_dim(hidden, length - 1, axis=1, keepdims=False)
    return sample_tokens(model.logits(last), key, temperature, top_p, greedy=greedy), cache


@functools.partial(jax.jit, static_argnames=("greedy", "out_size"), donate_argnames=("cache",))
def _decode_loop(
    graphdef, state, first, prompt_length, cache, key, temperature, top_p, eos, max_new, *, greedy, out_size
):
    """The decode steps of :meth:`QuarkMoEForCausalLM.generate` in one device loop (no host round trip per
    token): from the prefill's token ``first [B]``, up to ``max_new`` tokens in all, stopping once every row has
    produced one of ``eos [n]``; a stopped row repeats its stop token. Returns ``(tokens int32 [B, out_size],
    count, cache)``: the first ``count`` columns are the new tokens."""
    model = nnx.merge(graphdef, state)
    done = jnp.isin(first, eos)
    out = jnp.zeros((first.shape[0], out_size), jnp.int32).at[:, 0].set(first)

    def running(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new) & ~(done.all() & (eos.size > 0))

    def decode(carry):
        step, token, cache, key, done, out = carry
        key, step_key = jax.random.split(key)
        hidden, cache = model.hidden_states(token[:, None], cache=cache, start=prompt_length + step - 1)
        new = sample_tokens(model.logits(hidden[:, 0]), step_key, temperature, top_p, greedy=greedy)
        new = jnp.where(done, token, new)
        return step + 1, new, cache, key, done | jnp.isin(new, eos), out.at[:, step].set(new)

    count, _, cache, _, _, out = lax.while_loop(running, decode, (jnp.int32(1), first, cache, key, done, out))
    return out, count, cache  # the cache returned so that its donated buffer is the loop's (no second copy)
