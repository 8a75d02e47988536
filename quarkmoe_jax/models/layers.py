"""The decoder's non-MoE parts: RMSNorm, linear layers (float or Quark-quantized), rotary embeddings, attention.

Every function takes and returns the model's activation dtype (``x.dtype``); norms, softmax and rotary
tables are computed in float32 as transformers computes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from quarkmoe_jax.contracts import MoEQuantConfig
from quarkmoe_jax.formats import QArray
from quarkmoe_jax.kernels.base import expected_load
from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS, load_backend
from quarkmoe_jax.moe.emulation import dense_gemm
from quarkmoe_jax.moe.fused import kernel_weights, linear_gemm
from quarkmoe_jax.moe.gemm_io import quantize_gemm_input

__all__ = ["RMSNorm", "Linear", "rope_tables", "apply_rope", "attention"]

_HIGHEST = dict(precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in float32; ``weight [D]`` float32."""

    def __init__(self, weight, eps: float):
        self.weight = nnx.Param(jnp.asarray(weight, jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight.get_value() * normed).astype(x.dtype)


class Linear(nnx.Module):
    """``y = x W^T + b`` for ``x [..., K]`` -> ``[..., N]`` in ``x``'s dtype, accumulated in float32.

    ``weight``: a float ``[N, K]`` array, or a Quark-quantized weight as the checkpoint stores it, a
    :class:`~quarkmoe_jax.formats.QArray` (OCP MX codes + E8M0 scales; int8 / float8_e4m3fn codes ``[N, K]``
    with float32 scales per channel ``[N]`` or per tensor ``[]``). ``quant``: how the weight and the input
    are quantized (None: float); ``input_scale`` float32 ``[]`` for static activation scales; ``bias [N]``.
    The input is quantized exactly as the MoE layers quantize theirs (``moe.gemm_io.quantize_gemm_input``)
    and the GEMM is the oracle's (``moe.emulation.dense_gemm``), so a quantized linear computes what vLLM's
    Quark linear methods compute; after :meth:`prepare_for_kernels` (done at load on a GPU) an MX weight's
    GEMM runs on the MoE kernel backend's grouped GEMM with one group (``moe.fused.linear_gemm``), equal to
    the oracle's to float32 summation order. ``valid`` (bool, broadcastable
    to ``x.shape[:-1]``): False for padding rows, which are zeroed before a quantized input's dynamic scale
    is taken (a padded prompt bucket gives what its unpadded prompt gives).
    """

    def __init__(self, weight, *, bias=None, input_scale=None, quant: MoEQuantConfig | None = None):
        self.weight = nnx.Param(weight)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))
        self.input_scale = None if input_scale is None else nnx.Param(jnp.asarray(input_scale, jnp.float32))
        self.quant = quant
        self.kernel_backend: str | None = None  # set by prepare_for_kernels: the weight is then [1, N, K] in its layout

    @property
    def out_features(self) -> int:
        return self.weight.get_value().shape[-2]

    def checkpoint_weight(self):
        """The weight as loaded: ``[N, K]``, a float array or a checkpoint-layout :class:`QArray`."""
        w = self.weight.get_value()
        if self.kernel_backend is None:
            return w
        return jax.tree.map(lambda a: a[0], w.to_checkpoint_layout())

    def dequantized_weight(self, dtype=jnp.float32):
        """``[N, K]`` in ``dtype``, scales applied."""
        w = self.checkpoint_weight()
        return w.dequantize(dtype) if isinstance(w, QArray) else w.astype(dtype)

    def prepare_for_kernels(self, backend: str | None = "auto") -> Linear:
        """Lay an MX weight out once for a kernel backend's grouped GEMM, which this layer then runs with one
        group (the weight as expert ``[1, N, K]``; its codes decoded inside the kernel instead of the whole
        weight dequantized by XLA on every call) for calls of up to 128 rows (decode steps and small batches;
        a prefill's many rows dequantize the weight once and multiply densely, as before). ``backend``: a
        kernel backend's name, or ``"auto"`` / None: the one the MoE layers of this scheme load for
        (:func:`~quarkmoe_jax.kernels.registry.load_backend`). Float and 8-bit weights (XLA's dots read them as
        stored), a backend that is unavailable here or does not take the weight's shape: nothing changes.
        Returns ``self``."""
        if self.kernel_backend is not None or self.quant is None or self.quant.weight.kind != "mx":
            return self
        kernels = load_backend(self.quant) if backend in (None, "auto") else KERNEL_BACKENDS.get(backend)
        if kernels is None or kernels.unavailable() is not None:
            return self
        one_group = jax.tree.map(lambda a: a[None], self.weight.get_value())
        static = None if self.input_scale is None else self.input_scale.get_value()
        try:
            laid = kernel_weights(one_group, "weight", kernels)
            for rows in (1, 128):  # the decode and mid tiles must fit the weight (traced, not compiled)
                x = jax.ShapeDtypeStruct((rows, laid.shape[2]), jnp.bfloat16)
                jax.eval_shape(lambda x: linear_gemm(x, laid, self.quant, kernels, static), x)  # noqa: B023
        except NotImplementedError:  # e.g. FP6 with K % 64 != 0, an N no tile divides, per-channel input scales
            return self
        self.weight.set_value(laid)
        self.kernel_backend = kernels.name
        return self

    def restore_checkpoint_layout(self) -> Linear:
        """Undo :meth:`prepare_for_kernels` (the weight back to ``[N, K]`` as loaded). Returns ``self``."""
        if self.kernel_backend is not None:
            self.weight.set_value(self.checkpoint_weight())
            self.kernel_backend = None
        return self

    def __call__(self, x, valid=None):
        lead, k = x.shape[:-1], x.shape[-1]
        w = self.weight.get_value()
        if self.quant is None or self.quant.weight.kind == "none":
            acc = jnp.dot(x.reshape(-1, k), w.astype(x.dtype).T, **_HIGHEST)
        else:
            if valid is not None:
                x = jnp.where(jnp.broadcast_to(valid, lead)[..., None], x, jnp.zeros((), x.dtype))
            acc = self._quantized(x.reshape(-1, k), w)
        if self.bias is not None:
            acc = acc + self.bias.get_value()
        return acc.astype(x.dtype).reshape(*lead, -1)

    def _quantized(self, x2, w: QArray):
        q = self.quant
        static = None if self.input_scale is None else self.input_scale.get_value()
        if self.kernel_backend is not None:
            if expected_load(x2.shape[0], 1, 1).regime != "prefill":
                return linear_gemm(x2, w, q, KERNEL_BACKENDS[self.kernel_backend], static)
            # many rows (a prefill): dequantize once and multiply densely, as the MoE layers' prefill does
            w = self.checkpoint_weight()
        operand, a_scale = quantize_gemm_input(x2, q.activation, q.weight.kind, static, q.semantics)
        return dense_gemm(operand, w, a_scale)  # the oracle's GEMM dtype rule and epilogue


def rope_tables(inverse_frequencies: np.ndarray, positions, attention_factor: float):
    """``(cos, sin)`` float32 ``[..., dim / 2]`` for integer ``positions [...]`` (transformers' float32 product)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies, jnp.float32)
    return jnp.cos(freqs) * attention_factor, jnp.sin(freqs) * attention_factor


def apply_rope(x, cos, sin, pairs: bool):
    """Rotate ``x [B, T, heads, dim]`` by ``cos, sin [B, T, dim / 2]``, in ``x``'s dtype.

    ``pairs``: channels ``(2i, 2i+1)`` form pair i (DeepSeek), else channels ``i`` and ``i + dim/2``.
    The output keeps the input's channel order.
    """
    dtype = x.dtype
    c, s = cos[:, :, None, :].astype(dtype), sin[:, :, None, :].astype(dtype)
    if pairs:
        first, second = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([first * c - second * s, second * c + first * s], axis=-1)
        return out.reshape(x.shape)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * c - second * s, second * c + first * s], axis=-1)


def attention(q, k, v, q_positions, k_positions, *, scale: float, window: int | None = None, sinks=None, k_valid=None):
    """Causal grouped-query attention.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``Hq`` a multiple of ``Hkv``).
      q_positions: int32 ``[T]``, or ``[B, T]`` (each row its own, as the paged cache's tokens);
        k_positions: int32 ``[S]``. Key j is seen from query i when ``k_pos[j] <= q_pos[i]`` (and
        ``k_pos[j] > q_pos[i] - window`` with a sliding ``window``).
      sinks: float32 ``[Hq]`` gpt-oss sink logits: one more softmax column per head, dropped afterwards.
      k_valid: optional bool ``[S]``: keys that exist (a cache's written slots).

    Returns:
      ``[B, T, Hq, Dv]`` in ``q``'s dtype; scores and softmax in float32.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    qg = q.reshape(b, t, hkv, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, **_HIGHEST) * jnp.float32(scale)
    allowed = k_positions[None, :] <= q_positions[..., :, None]  # [T, S] or [B, T, S]
    if window is not None:
        allowed &= k_positions[None, :] > q_positions[..., :, None] - window
    if k_valid is not None:
        allowed &= k_valid[None, :]
    if allowed.ndim == 3:
        allowed = allowed[:, None, None]  # per row: [B, 1, 1, T, S] against scores [B, Hkv, G, T, S]
    scores = jnp.where(allowed, scores, -jnp.inf)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, hkv, groups, 1, 1), (b, hkv, groups, t, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, **_HIGHEST)
    return out.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
