"""One MoE-experts op, several backends: ``emulation`` (the jnp oracle) and every kernel backend of
:data:`quarkmoe_jax.kernels.registry.KERNEL_BACKENDS` (``pallas``: fused Pallas kernels; ``triton``: fused
jax-triton kernels, optional extra), each run by the shared fused forward (:mod:`quarkmoe_jax.moe.fused`).

``backend="auto"`` tries the kernel backends in :func:`quarkmoe_jax.kernels.registry.backend_order` (fastest
first, as measured on this device kind for the scheme's family and token count, from a shipped table), then
the emulation; a backend raises ``NotImplementedError`` for what it cannot do (a scheme, a device, a missing
optional package) and the next one runs. On CPU ``auto`` runs the emulation (the kernels would run in the
Pallas interpreter: for tests only). The emulation backend supports everything.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from quarkmoe_jax.kernels.base import KernelBackend
from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS, backend_order
from quarkmoe_jax.moe import emulation
from quarkmoe_jax.moe.buckets import bucketed_backend
from quarkmoe_jax.moe.fused import fused_core

__all__ = ["BACKENDS", "register_backend", "kernel_backend_op", "auto_order", "moe_experts"]


def kernel_backend_op(backend: KernelBackend) -> Callable:
    """The op of a kernel backend: the fused forward on its kernels, bucketed like every backend."""
    return bucketed_backend(fused_core(backend))


BACKENDS: dict[str, Callable] = {"emulation": emulation.moe_experts} | {
    name: kernel_backend_op(backend) for name, backend in KERNEL_BACKENDS.items()
}
"""Every backend's op by name, with :func:`emulation.moe_experts`'s signature."""


def register_backend(name: str, fn: Callable) -> None:
    """Add a backend with :func:`emulation.moe_experts`'s signature (a kernel backend: register its
    :class:`KernelBackend` with :func:`quarkmoe_jax.kernels.registry.register_kernel_backend` and add
    :func:`kernel_backend_op` of it here)."""
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
