"""Activations applied to the GEMM1 output ``h [..., S*I] -> [..., I]``, with vLLM's rounding.

Gated (``w13`` rows ``[gate; up]``, S = 2): ``silu``, ``gelu`` (erf), ``gelu_tanh``: ``act(g) * u`` with
``act`` computed in float32 and rounded to the activation dtype before the multiply (vLLM's CUDA kernels);
``silu`` with ``limit``: ``silu(min(g, L)) * clamp(u, ±L)``; ``swigluoai`` (gpt-oss, gate/up **interleaved**:
row 2j = gate_j, 2j+1 = up_j): ``g = min(g, L)``, ``u = clamp(u, ±L)``, ``(u + 1) * g * sigmoid(1.702 g)``,
in float32, rounded once; ``swigluoai_uninterleave``: the same on ``[gate; up]`` halves.
Non-gated (S = 1): ``silu_no_mul``, ``gelu_no_mul``, ``gelu_tanh_no_mul``, ``relu2_no_mul`` (``relu(h)^2``;
also accepted as ``relu2``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "is_gated",
    "apply_activation",
    "gated_activation",
    "unary_activation",
    "SWIGLUOAI_ALPHA",
    "SWIGLUOAI_LIMIT",
]

SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0

_UNARY = {
    "silu": jax.nn.silu,
    "gelu": lambda v: jax.nn.gelu(v, approximate=False),
    "gelu_tanh": lambda v: jax.nn.gelu(v, approximate=True),
    "relu2": lambda v: jnp.square(jax.nn.relu(v)),
}
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai", "swigluoai_uninterleave")
ACTIVATIONS = GATED_ACTIVATIONS + ("silu_no_mul", "gelu_no_mul", "gelu_tanh_no_mul", "relu2_no_mul", "relu2")


def is_gated(name: str) -> bool:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return name in GATED_ACTIVATIONS


def apply_activation(h, name: str, *, limit: float | None = None, alpha: float = SWIGLUOAI_ALPHA, beta: float = 1.0):
    """``h [..., S*I]`` (any float dtype) -> ``[..., I]`` in ``h``'s dtype."""
    if not is_gated(name):
        return unary_activation(h, name)
    if name == "swigluoai":
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
    return gated_activation(gate, up, name, limit=limit, alpha=alpha, beta=beta)


def unary_activation(h, name: str):
    """A non-gated activation (``*_no_mul``) of ``h`` in float32, rounded to ``h``'s dtype."""
    return _UNARY[name.removesuffix("_no_mul")](h.astype(jnp.float32)).astype(h.dtype)


def gated_activation(
    gate, up, name: str, *, limit: float | None = None, alpha: float = SWIGLUOAI_ALPHA, beta: float = 1.0
):
    """A gated activation of ``gate, up [..., I]`` (the activation dtype) -> ``[..., I]`` in that dtype.

    Elementwise only, so the Pallas kernels call it in their epilogue on the gate / up accumulators.
    """
    dtype = gate.dtype
    gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
    if name.startswith("swigluoai"):
        lim = SWIGLUOAI_LIMIT if limit is None else limit
        gate = jnp.minimum(gate, lim)
        up = jnp.clip(up, -lim, lim)
        return ((up + beta) * gate * jax.nn.sigmoid(alpha * gate)).astype(dtype)
    if limit is not None:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    activated = _UNARY[name](gate).astype(dtype)  # rounded to the activation dtype, then multiplied
    return (activated.astype(jnp.float32) * up.astype(dtype).astype(jnp.float32)).astype(dtype)
