"""One MoE-experts op, several backends: ``emulation`` (the jnp oracle), ``pallas`` (fused kernels); ``triton`` later.

Backends are tried in order for ``backend="auto"``; a backend raises ``NotImplementedError`` for what it
cannot do (a scheme, a device) and the next one runs. The emulation backend supports everything.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from quarkmoe_jax.moe import emulation, pallas_backend

__all__ = ["BACKENDS", "AUTO_ORDER", "register_backend", "moe_experts"]

BACKENDS: dict[str, Callable] = {"emulation": emulation.moe_experts, "pallas": pallas_backend.moe_experts}
AUTO_ORDER: tuple[str, ...] = ("pallas", "triton", "emulation")


def register_backend(name: str, fn: Callable) -> None:
    """Add a backend with :func:`emulation.moe_experts`'s signature."""
    BACKENDS[name] = fn


def moe_experts(*args, backend: str = "auto", **kwargs):
    """Run the MoE experts with ``backend`` (a name, or "auto" for the first that accepts the call)."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {sorted(BACKENDS)} or 'auto'")
        return BACKENDS[backend](*args, **kwargs)
    errors = []
    for name in AUTO_ORDER:
        fn = BACKENDS.get(name)
        if fn is None or (name != "emulation" and jax.default_backend() == "cpu"):
            continue
        try:
            return fn(*args, **kwargs)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no backend accepted the call: " + "; ".join(errors))
