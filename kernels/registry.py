"""The kernel backends by name, and the one decision of which to run: ``backend="auto"``'s order and the
layout the load lays MX weights out in both come from :func:`backend_order` / :func:`preferred_backend`.

The order is measured: ``kernels/backend_table.json`` holds, per device kind, scheme family
(:attr:`quarkmoe_jax.contracts.MoEQuantConfig.family`) and token count, the kernel backends fastest first and
the kernel generation each was timed at
(``{"order": {device: {family: {tokens: {"backends": [...], "generations": {backend: n}}}}}}``, written by
``benchmarks/backend_table.py`` from ``benchmarks/moe_bench.py`` results). A row whose generation
of some backend is older than that backend's current one (:attr:`KernelBackend.generations`) ranks kernels
that no longer exist: it is ignored, with one warning per device and family, and the default order applies
there. Where the table has nothing, the default order: MX weights on the v2 kernels first
(:data:`MX_DEFAULT_ORDER`), others Pallas first (:data:`DEFAULT_ORDER`).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import warnings

import jax

from quarkmoe_jax.kernels.base import KernelBackend
from quarkmoe_jax.kernels.pallas import PALLAS
from quarkmoe_jax.kernels.triton import TRITON

__all__ = [
    "KERNEL_BACKENDS",
    "register_kernel_backend",
    "BACKEND_TABLE_PATH",
    "DEFAULT_ORDER",
    "MX_DEFAULT_ORDER",
    "weight_class_of_family",
    "backend_order",
    "preferred_backend",
    "load_backend",
]

KERNEL_BACKENDS: dict[str, KernelBackend] = {PALLAS.name: PALLAS, TRITON.name: TRITON}
"""Every kernel backend by name (the op adds the emulation oracle to these: :mod:`quarkmoe_jax.moe.op`)."""


def register_kernel_backend(backend: KernelBackend) -> None:
    """Add a :class:`KernelBackend` (``auto`` tries it after the measured and default ones)."""
    KERNEL_BACKENDS[backend.name] = backend


BACKEND_TABLE_PATH = pathlib.Path(__file__).with_name("backend_table.json")

DEFAULT_ORDER = (PALLAS.name, TRITON.name)
"""Kernel backends ``auto`` tries where the table has no valid row, except for MX weights."""
MX_DEFAULT_ORDER = (TRITON.name, PALLAS.name)
"""MX weights (MXFP4, MXFP6) without a valid row: the v2 kernels first (``auto`` falls back to Pallas where
jax-triton cannot run)."""


def weight_class_of_family(family: str) -> str:
    """``"mx"`` or ``"dense"``: which of a backend's kernel generations a family's rows timed."""
    return "mx" if family.startswith("mx") else "dense"


@functools.cache
def _backend_table() -> dict:
    if not BACKEND_TABLE_PATH.exists():
        return {}
    return json.loads(BACKEND_TABLE_PATH.read_text()).get("order", {})


_warned: set[tuple[str, str]] = set()


def _stale(device_kind: str, family: str, row: dict) -> str | None:
    """What makes ``row`` stale (a backend timed at an older generation than its current one), or None."""
    weight_class = weight_class_of_family(family)
    for name, timed in row.get("generations", {}).items():
        backend = KERNEL_BACKENDS.get(name)
        if backend is not None and timed < backend.generation(weight_class):
            return f"{name} generation {timed} (now {backend.generation(weight_class)})"
    return None


def _measured_rows(device_kind: str, family: str) -> dict[int, tuple[str, ...]]:
    """``{tokens: backends fastest first}`` of the table's valid rows for a device and family."""
    rows = _backend_table().get(device_kind, {}).get(family, {})
    valid, stale = {}, []
    for tokens, row in rows.items():
        reason = _stale(device_kind, family, row)
        if reason is None:
            valid[int(tokens)] = tuple(row["backends"])
        else:
            stale.append(f"T={tokens}: {reason}")
    if stale and (device_kind, family) not in _warned:
        _warned.add((device_kind, family))
        warnings.warn(
            f"kernels/backend_table.json: rows of {family!r} on {device_kind!r} timed older kernels "
            f"({'; '.join(stale)}): ignored, the default order applies there; benchmarks/moe_bench.py and "
            "benchmarks/backend_table.py --write re-measure them",
            stacklevel=3,
        )
    return valid


def _default_order(family: str) -> tuple[str, ...]:
    default = MX_DEFAULT_ORDER if weight_class_of_family(family) == "mx" else DEFAULT_ORDER
    return default + tuple(name for name in KERNEL_BACKENDS if name not in default)


def backend_order(device_kind: str, quant_config, num_tokens: int | None) -> tuple[str, ...]:
    """Every kernel backend, in the order ``auto`` tries them on ``device_kind``: as measured for the scheme's
    family at the nearest valid measured token count (log scale), then the default order.

    ``num_tokens`` None: the order for the load's layout, which must serve every token count: the backend
    first at the most measured token counts (ties: the fewer tokens) leads.
    """
    family = quant_config.family
    default = _default_order(family)
    measured = _measured_rows(device_kind, family)
    if not measured:
        return default
    if num_tokens is None:
        firsts = [measured[t][0] for t in sorted(measured)]
        lead = max(firsts, key=lambda b: (firsts.count(b), -firsts.index(b)))
        return (lead,) + tuple(b for b in default if b != lead)
    nearest = min(measured, key=lambda t: (abs(math.log2(t) - math.log2(max(num_tokens, 1))), t))
    return measured[nearest] + tuple(b for b in default if b not in measured[nearest])


def preferred_backend(quant_config, num_tokens: int | None, device=None) -> KernelBackend | None:
    """The kernel backend ``auto`` runs first for ``quant_config`` at ``num_tokens`` on a GPU ``device``
    (default the first): the first of :func:`backend_order` that can run here (None if none can).
    ``num_tokens`` None: the backend whose layout the load lays MX weights out in. (On a CPU ``auto`` runs
    the emulation; this names the kernel backend the Pallas interpreter would run there.)"""
    device = device or jax.devices()[0]
    for name in backend_order(device.device_kind, quant_config, num_tokens):
        backend = KERNEL_BACKENDS[name]
        if backend.unavailable() is None:
            return backend
    return None


def load_backend(quant_config, device=None) -> KernelBackend | None:
    """The backend a module lays its MX weights out for at load time (:func:`preferred_backend` over every
    token count)."""
    return preferred_backend(quant_config, None, device)
