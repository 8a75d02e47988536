"""One MoE-experts op, several backends: ``emulation`` (the jnp oracle), ``pallas`` (fused Pallas kernels),
``triton`` (fused jax-triton kernels, optional extra).

``backend="auto"`` tries the kernel backends fastest first, as measured on this device kind for the
scheme's family and token count (:func:`quarkmoe_jax.kernels.configs.backend_order`, a shipped table), then
the emulation; a backend raises ``NotImplementedError`` for what it cannot do (a scheme, a device, a missing
optional package) and the next one runs. On CPU ``auto`` runs the emulation (the kernels would run in the
Pallas interpreter: for tests only). The emulation backend supports everything.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from quarkmoe_jax.kernels.configs import backend_order
from quarkmoe_jax.moe import emulation, pallas_backend, triton_backend

__all__ = ["BACKENDS", "register_backend", "auto_order", "moe_experts"]

BACKENDS: dict[str, Callable] = {
    "emulation": emulation.moe_experts,
    "pallas": pallas_backend.moe_experts,
    "triton": triton_backend.moe_experts,
}


def register_backend(name: str, fn: Callable) -> None:
    """Add a backend with :func:`emulation.moe_experts`'s signature."""
    BACKENDS[name] = fn


def auto_order(quant_config, num_tokens: int) -> tuple[str, ...]:
    """The backends ``auto`` tries, in order, on this machine."""
    if jax.default_backend() == "cpu":
        return ("emulation",)
    kernels = backend_order(jax.devices()[0].device_kind, quant_config, num_tokens)
    extra = tuple(name for name in BACKENDS if name not in kernels and name != "emulation")
    return kernels + extra + ("emulation",)


def moe_experts(x, topk_weights, topk_ids, params, quant_config, shape, *, backend: str = "auto", **kwargs):
    """Run the MoE experts with ``backend`` (a name, or "auto": :func:`auto_order`, the first that accepts
    the call). Arguments: :func:`quarkmoe_jax.moe.emulation.moe_experts`'s."""
    args = (x, topk_weights, topk_ids, params, quant_config, shape)
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {sorted(BACKENDS)} or 'auto'")
        return BACKENDS[backend](*args, **kwargs)
    errors = []
    for name in auto_order(quant_config, x.shape[0]):
        fn = BACKENDS.get(name)
        if fn is None:
            continue
        try:
            return fn(*args, **kwargs)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no backend accepted the call: " + "; ".join(errors))
