"""Tile configurations per device kind and regime, chosen by measurement (``benchmarks/tune_tiles.py``).

Keys: ``(device kind, regime)``; regime ``"decode"`` (<= 16 rows per touched expert), ``"mid"`` (<= 128) or
``"prefill"``. Values: the GEMM1 and GEMM2 :class:`TileConfig`. Unknown devices (and the CPU interpreter)
use ``DEFAULT``. ``block_n`` is an upper bound: the launch uses the largest power of two <= it that divides N.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

from quarkmoe_jax.kernels.grouped_gemm import TileConfig

__all__ = [
    "TILE_CONFIGS",
    "DEFAULT",
    "DEQUANT_MIN_ROWS",
    "SPLIT_K_MAX_EXPERTS",
    "regime",
    "tile_configs",
    "dequant_min_rows",
    "FP8_TENSOR_CORES",
    "fp8_tensor_cores",
    "BACKEND_TABLE_PATH",
    "DEFAULT_BACKEND_ORDER",
    "scheme_family",
    "backend_order",
]

DEFAULT = {
    "decode": (TileConfig(16, 64, 4, 3), TileConfig(16, 64, 4, 3)),
    "mid": (TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3)),
    "prefill": (TileConfig(128, 128, 8, 3), TileConfig(128, 128, 8, 3)),
}

TILE_CONFIGS: dict[str, dict[str, tuple[TileConfig, TileConfig]]] = {
    # benchmarks/tune_tiles.py, 2026-11-24, Mixtral and gpt-oss shapes, packed decode (docs/performance.md):
    # decode tiles swapped (the weights are the MMA's M side), GEMM2 two chunks per iteration; split-K 2 / 4
    # when at most SPLIT_K_MAX_EXPERTS experts are touched (Mixtral T=1 GEMM2 187 -> 73 us), none beyond
    # (T=16: 8 experts fill the GPU, split-K costs 5-8%); prefill runs the dense tiles (dequantize path).
    "NVIDIA H100 80GB HBM3": {
        "decode": (
            TileConfig(16, 64, 4, 3, swap_ab=True, split_k=2),
            TileConfig(16, 64, 4, 3, k_unroll=2, swap_ab=True, split_k=4),
        ),
        "mid": (TileConfig(64, 128, 8, 3), TileConfig(64, 128, 8, 3)),
        "prefill": (TileConfig(128, 128, 8, 3), TileConfig(128, 256, 8, 3)),
    },
}


SPLIT_K_MAX_EXPERTS = 4
"""A table's split_k applies only when at most this many experts can be touched (few row tiles: the grid
alone does not fill the GPU); otherwise the launch runs unsplit."""

DEQUANT_MIN_ROWS = {"NVIDIA H100 80GB HBM3": 32}
"""Rows per expert from which the prefill path (dequantize to bfloat16, then the dense kernel) is used."""


def dequant_min_rows(device_kind: str) -> float:
    """Rows per expert from which prefill dequantizes (the CPU interpreter: never, unless forced)."""
    return DEQUANT_MIN_ROWS.get(device_kind, 128 if device_kind != "cpu" else float("inf"))


def regime(rows_per_expert: float) -> str:
    if rows_per_expert <= 16:
        return "decode"
    if rows_per_expert <= 128:
        return "mid"
    return "prefill"


def tile_configs(device_kind: str, rows_per_expert: float, touched_experts: int) -> tuple[TileConfig, TileConfig]:
    """GEMM1 and GEMM2 tile configs for a device kind (``jax.Device.device_kind``) and the expected load
    (``rows_per_expert`` over ``touched_experts``; :func:`quarkmoe_jax.moe.fused.expected_load`)."""
    configs = TILE_CONFIGS.get(device_kind, DEFAULT)[regime(rows_per_expert)]
    if touched_experts > SPLIT_K_MAX_EXPERTS:
        configs = tuple(dataclasses.replace(c, split_k=1) for c in configs)
    return configs


FP8_TENSOR_CORES = {"cpu": True, "NVIDIA H100 80GB HBM3": True, "NVIDIA H200": True}
"""Whether FP8 W8A8 runs e4m3 x e4m3 on the fp8 tensor cores (else the e4m3 codes go in as bfloat16, exact,
at half the tensor-core rate). Unknown GPUs: no (before sm89 there are none). The CPU interpreter runs the
fp8 kernel path so that CI tests it."""


def fp8_tensor_cores(device_kind: str) -> bool:
    return FP8_TENSOR_CORES.get(device_kind, False)


BACKEND_TABLE_PATH = pathlib.Path(__file__).with_name("backend_table.json")
"""``backend="auto"``'s measured order: ``{device kind: {scheme family: {tokens: [backends, fastest first]}}}``,
written by ``benchmarks/backend_table.py`` from ``benchmarks/moe_bench.py`` results."""

DEFAULT_BACKEND_ORDER = ("pallas", "triton")
"""Kernel backends ``auto`` tries (before the emulation) where the table has no entry."""


def scheme_family(quant_config) -> str:
    """The table key of a scheme: weight format and activation kind, e.g. ``"mxfp4/mx"``, ``"mxfp6/none"``,
    ``"int8/int8"``, ``"int8/none"`` (W8A16), ``"fp8/fp8"``, ``"bf16/none"``."""
    weight = quant_config.weight
    if weight.kind == "mx":
        name = "mxfp4" if weight.mx_format == "mxfp4" else "mxfp6"
    else:
        name = {"none": "bf16"}.get(weight.kind, weight.kind)
    return f"{name}/{quant_config.activation.kind}"


@functools.cache
def _backend_table() -> dict:
    if not BACKEND_TABLE_PATH.exists():
        return {}
    return json.loads(BACKEND_TABLE_PATH.read_text()).get("order", {})


def backend_order(device_kind: str, quant_config, num_tokens: int) -> tuple[str, ...]:
    """Kernel backends for ``auto``, fastest first as measured on ``device_kind`` for the scheme's family at
    the nearest measured token count (log scale), then the remaining default ones."""
    by_tokens = _backend_table().get(device_kind, {}).get(scheme_family(quant_config))
    if not by_tokens:
        return DEFAULT_BACKEND_ORDER
    nearest = min(by_tokens, key=lambda t: (abs(math.log2(int(t)) - math.log2(max(num_tokens, 1))), int(t)))
    measured = tuple(by_tokens[nearest])
    return measured + tuple(b for b in DEFAULT_BACKEND_ORDER if b not in measured)
