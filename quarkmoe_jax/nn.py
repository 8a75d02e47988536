"""Flax NNX modules holding a Quark MoE layer's packed parameters exactly as the checkpoint stores them.

* :class:`QuarkMoE`: the routed experts of one layer (``apply(x, topk_weights, topk_ids)``).
* :class:`QuarkMoEBlock`: router + experts + optional shared expert(s) (``__call__(x)`` or
  ``__call__(x, router_logits)``).

Parameters are ``nnx.Param`` values: the expert weights ``w13`` / ``w2`` are :class:`~quarkmoe_jax.formats.QArray` s
(OCP MX: uint8 codes + E8M0 scales; W8A8: int8 / float8_e4m3fn codes + float32 scales with their granularity;
unquantized: floats), biases and static input scales float32 arrays. The quantization scheme
(:class:`~quarkmoe_jax.schemes.MoEQuantConfig`) and the sizes are static module attributes.

``apply`` / ``__call__`` run the MoE forward through ``moe.op`` (``backend="auto"``: the emulation oracle on
CPU); both work under ``nnx.jit``.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quarkmoe_jax.checkpoint.architectures import MoEArchitecture
from quarkmoe_jax.checkpoint.loader import LoadedExperts, check_expert_map, load_moe_block
from quarkmoe_jax.checkpoint.safetensors_io import CheckpointError
from quarkmoe_jax.checkpoint.sharded_loading import load_sharded_moe_block
from quarkmoe_jax.contracts import MoEQuantConfig, MoEShape
from quarkmoe_jax.formats import QArray, float_qarray
from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS, load_backend
from quarkmoe_jax.moe import op, routing
from quarkmoe_jax.moe.buckets import check_weights, host_rows, token_bucket
from quarkmoe_jax.moe.fused import kernel_weights
from quarkmoe_jax.moe.routing import RoutingConfig
from quarkmoe_jax.moe.shard_layout import kernel_layout_per_shard, shard_params
from quarkmoe_jax.moe.sharded import sharded_moe_experts
from quarkmoe_jax.moe.sharding import MoESharding

__all__ = ["RoutingConfig", "QuarkMoE", "QuarkMoEBlock", "ExpertMap"]

_OPTIONAL_PARAMS = (
    "w13_input_scale",
    "w2_input_scale",
    "w13_bias",
    "w2_bias",
)


class ExpertMap(nnx.Variable):
    """``[E_global]`` int32: global expert id -> local id, -1 where the expert lives on another device."""


class QuarkMoE(nnx.Module):
    """Routed experts of one MoE layer.

    Attributes (``nnx.Param``): ``w13`` ``[E, S*I_pad, H_pad]`` and ``w2`` ``[E, H_pad, I_pad]`` (logical shapes),
    each a :class:`~quarkmoe_jax.formats.QArray` holding its scales (a float array given for an unquantized
    layer is wrapped), and where the scheme has them ``w13_input_scale``, ``w2_input_scale``,
    ``w13_bias [E, S*I_pad]``, ``w2_bias [E, H_pad]``.
    Static: ``quant_config``, ``shape`` (logical sizes before padding), ``activation``, ``sharding``
    (:class:`~quarkmoe_jax.moe.sharding.MoESharding` or None; when set the parameters are global arrays in the
    sharded layout: experts shard-major, ``I`` split per tensor shard, see
    :mod:`~quarkmoe_jax.moe.shard_layout`).
    """

    def __init__(
        self,
        quant_config: MoEQuantConfig,
        shape: MoEShape,
        params: dict[str, Any],
        *,
        activation: str = "silu",
        swiglu_limit: float | None = None,
        expert_map=None,
        num_global_experts: int | None = None,
        sharding: MoESharding | None = None,
    ):
        self.quant_config = quant_config
        self.shape = shape
        self.activation = activation
        self.swiglu_limit = swiglu_limit
        self.sharding = sharding
        missing = {"w13", "w2"} - set(params)
        unknown = set(params) - {"w13", "w2", *_OPTIONAL_PARAMS}
        if missing or unknown:
            raise ValueError(f"QuarkMoE params: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if sharding is not None and expert_map is not None:
            raise ValueError("a sharded QuarkMoE places its experts itself; pass expert_map or sharding, not both")
        e = shape.num_experts if sharding is None else sharding.expert_slots(shape.num_experts)
        w13, w2 = _as_weight(params["w13"], "w13"), _as_weight(params["w2"], "w2")
        check_weights({"w13": w13, "w2": w2}, quant_config)
        if w13.shape[0] != e or w2.shape[0] != e or w13.shape[2] != w2.shape[1] or w13.shape[1] % shape.num_shards:
            raise ValueError(
                f"QuarkMoE params: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit {e} experts "
                f"with {shape.num_shards} shard(s)"
            )
        self.w13 = nnx.Param(w13)
        self.w2 = nnx.Param(w2)
        for key in _OPTIONAL_PARAMS:
            setattr(self, key, nnx.Param(params[key]) if key in params else None)
        if expert_map is not None:
            expert_map = check_expert_map(expert_map, num_global_experts or len(expert_map))
            if int(expert_map.max()) + 1 != e:
                raise ValueError(f"expert_map places {int(expert_map.max()) + 1} experts here, params hold {e}")
            self.expert_map = ExpertMap(jnp.asarray(expert_map))
        else:
            self.expert_map = None
        self.num_global_experts = num_global_experts or e

    @classmethod
    def from_loaded(
        cls, loaded: LoadedExperts, *, activation="silu", swiglu_limit=None, num_global_experts=None, sharding=None
    ) -> QuarkMoE:
        return cls(
            loaded.scheme.quant_config(),
            loaded.shape,
            loaded.params,
            activation=activation,
            swiglu_limit=swiglu_limit,
            expert_map=loaded.expert_map,
            num_global_experts=num_global_experts,
            sharding=sharding,
        )

    def shard(self, sharding: MoESharding) -> QuarkMoE:
        """A copy of these (single-device) experts split over ``sharding``'s mesh (:func:`shard_params`).

        For a model that does not fit one device, load per shard instead:
        ``QuarkMoEBlock.from_checkpoint(path, layer, sharding=...)``.
        """
        if self.sharding is not None or self.expert_map is not None:
            raise ValueError("shard() takes experts holding every expert on one device")
        return QuarkMoE(
            self.quant_config,
            self.shape,
            shard_params(self.params(), self.shape, sharding),
            activation=self.activation,
            swiglu_limit=self.swiglu_limit,
            sharding=sharding,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | pathlib.Path, layer: int, *, semantics: str = "vllm", expert_map=None
    ) -> QuarkMoE:
        """The routed experts of MoE layer ``layer`` of a Quark checkpoint folder."""
        return QuarkMoEBlock.from_checkpoint(path, layer, semantics=semantics, expert_map=expert_map).experts

    def params(self) -> dict[str, Any]:
        """The parameter values by name (``w13``, ``w2``, scales, biases that exist)."""
        out = {"w13": self.w13.get_value(), "w2": self.w2.get_value()}
        for key in _OPTIONAL_PARAMS:
            var = getattr(self, key)
            if var is not None:
                out[key] = var.get_value()
        return out

    def prepare_for_kernels(self, backend: str | None = "auto") -> QuarkMoE:
        """Re-lay MX weights once for a kernel backend (``process_weights_after_loading``'s kernel step);
        ``from_checkpoint`` does it on a GPU. Returns ``self``.

        ``backend``: the backend the module will be called with: a kernel backend's name (``"triton"``: the
        fragment layout of the v2 kernels; ``"pallas"``: the chunk layout); ``"auto"`` or None: the kernel
        backend ``auto`` runs this layer's scheme on here (:func:`quarkmoe_jax.kernels.registry.load_backend`,
        the same measured order ``auto`` follows, so ``auto`` reads the weights as laid out); another backend
        of ``moe.op.BACKENDS`` (the emulation): nothing to do. Exact, the same bytes (plus K and N padding to
        128 in the fragment layout); every backend accepts every layout, but one in another layout re-lays
        the weights on each call. Sharded experts take the chunk layout, shard by shard.
        """
        if backend not in (None, "auto") and backend not in op.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {sorted(op.BACKENDS)}")
        if self.sharding is not None:  # the chunk layout, shard by shard
            for name, value in kernel_layout_per_shard(self.params(), self.sharding).items():
                getattr(self, name).set_value(value)
            return self
        if backend in (None, "auto"):
            kernels = load_backend(self.quant_config)
        else:
            kernels = KERNEL_BACKENDS.get(backend)
        if kernels is None:
            return self
        for name, var in (("w13", self.w13), ("w2", self.w2)):
            value = var.get_value()
            if value.kind == "mx":
                try:
                    var.set_value(kernel_weights(value, name, kernels))
                except NotImplementedError:  # e.g. FP6 with K % 64 != 0: the kernels do not take it; keep it
                    pass
        return self

    def dequantized_weights(self, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """``(w13 [E, S*I_pad, H_pad], w2 [E, H_pad, I_pad])`` in ``dtype``, scales applied (for inspection).

        Per-tensor INT8/FP8 scales that Quark semantics keep per shard apply to their w1/w3 halves.
        """
        return self.w13.get_value().dequantize(dtype), self.w2.get_value().dequantize(dtype)

    def apply(
        self,
        x,
        topk_weights,
        topk_ids,
        *,
        backend: str = "auto",
        apply_router_weight_on_input: bool = False,
        valid_tokens=None,
    ):
        """MoE experts forward.

        Args:
          x: ``[T, H]`` float32 / bfloat16 / float16 hidden states.
          topk_weights: ``[T, k]`` router weights (float32).
          topk_ids: ``[T, k]`` int32 **global** expert ids; pairs whose expert is not local contribute zero.
          backend: "auto" (the best available; the emulation oracle on CPU) or a name from ``moe.op.BACKENDS``.
          apply_router_weight_on_input: scale ``x`` by the (top-1) weight before GEMM1 instead of the output.
          valid_tokens: optional ``[T]`` bool; False rows are padding (they contribute nothing and enter no
            dynamic scale).

        Returns:
          ``[T, H]`` in ``x``'s dtype (split over the mesh's token axes when the experts are sharded).
        """
        args = (x, topk_weights, topk_ids, self.params(), self.quant_config, self.shape)
        kwargs = dict(
            activation=self.activation,
            swiglu_limit=self.swiglu_limit,
            apply_router_weight_on_input=apply_router_weight_on_input,
            valid_tokens=valid_tokens,
            backend=backend,
        )
        if self.sharding is not None:
            return sharded_moe_experts(*args, self.sharding, **kwargs)
        expert_map = None if self.expert_map is None else self.expert_map.get_value()
        return op.moe_experts(*args, expert_map=expert_map, num_global_experts=self.num_global_experts, **kwargs)

    def __repr__(self) -> str:
        s = self.shape
        return (
            f"QuarkMoE({self.quant_config.scheme}, semantics={self.quant_config.semantics}, experts={s.num_experts}, "
            f"hidden={s.hidden_size}, intermediate={s.intermediate_size}, activation={self.activation})"
        )


def _as_weight(value, name: str) -> QArray:
    """An expert weight as a :class:`QArray`: QArrays as they are, a float array wrapped (unquantized)."""
    if isinstance(value, QArray):
        return value
    if hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != jnp.float8_e4m3fn:
        return float_qarray(value)
    raise TypeError(
        f"QuarkMoE params: {name} must be a QArray (quarkmoe_jax.formats: quantize for MX, scaled_qarray for "
        f"int8 / fp8 codes with their scales) or a float array, found {type(value).__name__} "
        f"{getattr(value, 'dtype', '')}"
    )


class QuarkMoEBlock(nnx.Module):
    """A whole MoE block: router, routed experts and optional shared expert(s).

    Attributes: ``router_weight`` ``nnx.Param [E, H]`` float32, optional ``router_bias [E]``,
    ``correction_bias [E]`` (DeepSeek-V3 ``e_score_correction_bias``, used for selection only),
    ``experts`` (:class:`QuarkMoE`), ``shared`` (:class:`QuarkMoE` with one expert, or None),
    ``shared_gate_weight [1, H]`` (Qwen2-MoE). Static: ``routing`` (:class:`RoutingConfig`),
    ``architecture``.
    """

    def __init__(
        self,
        experts: QuarkMoE,
        router_weight,
        routing: RoutingConfig,
        *,
        router_bias=None,
        correction_bias=None,
        shared: QuarkMoE | None = None,
        shared_gate_weight=None,
        architecture: MoEArchitecture | None = None,
    ):
        num_experts = experts.num_global_experts
        router_weight = jnp.asarray(router_weight, jnp.float32)
        if router_weight.shape != (num_experts, experts.shape.hidden_size):
            raise ValueError(
                f"router_weight shape {router_weight.shape}, expected {(num_experts, experts.shape.hidden_size)}"
            )
        if not 1 <= routing.top_k <= num_experts:
            raise ValueError(f"top_k {routing.top_k} must be in 1..{num_experts}")
        self.routing = routing
        self.architecture = architecture
        self.experts = experts
        self.router_weight = nnx.Param(router_weight)
        self.router_bias = _optional_param(router_bias, (num_experts,), "router_bias")
        self.correction_bias = _optional_param(correction_bias, (num_experts,), "correction_bias")
        self.shared = shared
        self.shared_gate_weight = _optional_param(
            shared_gate_weight, (1, experts.shape.hidden_size), "shared_gate_weight"
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | pathlib.Path,
        layer: int,
        *,
        semantics: str = "vllm",
        expert_map=None,
        progress: bool | None = None,
        sharding: MoESharding | None = None,
        float_dtype=None,
        backend: str = "auto",
    ) -> QuarkMoEBlock:
        """Load MoE block ``layer`` from a Quark checkpoint folder (config.json + safetensors).

        ``float_dtype``: the dtype unquantized experts are held in (default bfloat16; a model passes its own).

        ``backend``: the backend the block will be called with; on a GPU its MX weights are laid out for it
        once here (:meth:`QuarkMoE.prepare_for_kernels`).

        ``sharding``: split the experts over a mesh (:class:`~quarkmoe_jax.moe.sharding.MoESharding`), each
        shard reading only its experts and its slice of the intermediate dimension
        (:func:`~quarkmoe_jax.checkpoint.sharded_loading.load_sharded_moe_block`, docs/distributed.md).
        """
        load = load_moe_block if sharding is None else functools.partial(load_sharded_moe_block, sharding=sharding)
        loaded = load(
            path, layer, semantics=semantics, expert_map=expert_map, progress=progress, float_dtype=float_dtype
        )
        arch = loaded.architecture
        experts = QuarkMoE.from_loaded(
            loaded.experts,
            activation=arch.activation,
            swiglu_limit=arch.swiglu_limit,
            num_global_experts=arch.num_experts,
            sharding=sharding,
        )
        shared = None
        if loaded.shared:
            shared_sharding = None if sharding is None else sharding.for_shared_experts()
            shared = QuarkMoE.from_loaded(loaded.shared, activation="silu", sharding=shared_sharding)
        if jax.default_backend() == "gpu":  # the kernels' layout now, not in every call
            for module in (experts, shared):
                if module is not None:
                    module.prepare_for_kernels(backend)
        return cls(
            experts,
            loaded.router_weight,
            RoutingConfig.from_architecture(arch),
            router_bias=loaded.router_bias,
            correction_bias=loaded.correction_bias,
            shared=shared,
            shared_gate_weight=loaded.shared_gate_weight,
            architecture=arch,
        )

    def route(self, x, logits=None):
        """``(topk_weights f32 [T, k], topk_ids int32 [T, k])`` for ``x [T, H]`` (or given logits ``[T, E]``)."""
        if logits is None:
            bias = None if self.router_bias is None else self.router_bias.get_value()
            logits = routing.router_logits(x, self.router_weight.get_value(), bias)
        correction = None if self.correction_bias is None else self.correction_bias.get_value()
        return routing.route(logits, self.routing, correction)

    def __call__(self, x, router_logits=None, *, backend: str = "auto", valid_tokens=None):
        """MoE block forward: ``x [T, H]`` (optionally with precomputed ``router_logits [T, E]``) -> ``[T, H]``.

        Routed experts, plus the shared expert(s) where the architecture has them (Qwen2-MoE gates the
        shared output with ``sigmoid(x @ shared_gate^T)``); the sum is taken in float32 and cast to ``x``'s
        dtype. ``valid_tokens``: optional bool ``[T]``, False for padding rows (they enter no dynamic scale
        and give zero).
        """
        x = _as_jax(x)
        hidden = self.experts.shape.hidden_size
        if x.ndim != 2 or x.shape[1] != hidden:
            raise ValueError(f"x must be [T, {hidden}], got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a float array (float32 / bfloat16 / float16), got {x.dtype}")
        if router_logits is not None:
            router_logits = _as_jax(router_logits)
            if router_logits.shape != (x.shape[0], self.experts.num_global_experts):
                raise ValueError(
                    f"router_logits must be [T={x.shape[0]}, {self.experts.num_global_experts}], "
                    f"got shape {tuple(router_logits.shape)}"
                )
        traced = isinstance(x, jax.core.Tracer) or isinstance(router_logits, jax.core.Tracer)
        if traced or valid_tokens is not None or self.experts.sharding is not None or x.shape[0] == 0:
            return self._forward(x, router_logits, valid_tokens, backend)
        return self._bucketed(x, router_logits, backend)

    def _forward(self, x, router_logits, valid_tokens, backend):
        weights, ids = self.route(x, router_logits)
        out = self.experts.apply(x, weights, ids, backend=backend, valid_tokens=valid_tokens)
        if self.shared is None:
            return out
        t = x.shape[0]
        ones, zeros = jnp.ones((t, 1), jnp.float32), jnp.zeros((t, 1), jnp.int32)
        shared = self.shared.apply(x, ones, zeros, backend=backend, valid_tokens=valid_tokens).astype(jnp.float32)
        if self.shared_gate_weight is not None:
            shared = shared * jax.nn.sigmoid(routing.router_logits(x, self.shared_gate_weight.get_value()))
        return (out.astype(jnp.float32) + shared).astype(x.dtype)

    def _bucketed(self, x, router_logits, backend):
        """An eager call: routing, top-k and experts under one ``jit`` per token bucket (T padded on the host,
        so a new T inside a compiled bucket compiles nothing; padding rows are marked invalid)."""
        t = x.shape[0]
        bucket = token_bucket(t)
        valid = np.arange(bucket) < t
        if bucket != t:
            x = host_rows(x, bucket)
            router_logits = None if router_logits is None else host_rows(router_logits, bucket)
        graphdef, state = nnx.split(self)
        out = _bucketed_block_forward(graphdef, state, x, router_logits, valid, backend)
        return out if bucket == t else host_rows(out, t)


@functools.partial(jax.jit, static_argnames=("graphdef", "backend"))
def _bucketed_block_forward(graphdef, state, x, router_logits, valid, backend):
    return nnx.merge(graphdef, state)._forward(x, router_logits, valid, backend)


def _as_jax(value):
    """A JAX array of ``value``; host data by ``device_put`` (``jnp.asarray`` compiles a program per shape)."""
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        return value
    return jax.device_put(np.asarray(value))


def _optional_param(value, shape, name):
    if value is None:
        return None
    value = jnp.asarray(np.asarray(value), jnp.float32)
    if value.shape != shape:
        raise CheckpointError(f"{name}: shape {value.shape}, expected {shape}")
    return nnx.Param(value)
