"""Tile configurations per device kind and regime, chosen by measurement (``benchmarks/tune_tiles.py``).

Keys: ``(device kind, regime)``; regime ``"decode"`` (<= 16 rows per touched expert), ``"mid"`` (<= 128) or
``"prefill"``. Values: the GEMM1 and GEMM2 :class:`TileConfig`. Unknown devices (and the CPU interpreter)
use ``DEFAULT``. ``block_n`` is an upper bound: the launch uses the largest power of two <= it that divides N.
"""

from __future__ import annotations

import dataclasses

from quarkmoe_jax.kernels.grouped_gemm import TileConfig

__all__ = [
    "TILE_CONFIGS",
    "DEFAULT",
    "DEQUANT_MIN_ROWS",
    "SPLIT_K_MAX_EXPERTS",
    "regime",
    "tile_configs",
    "dequant_min_rows",
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
    """GEMM1 and GEMM2 tile configs for a device kind (``jax.Device.device_kind``) and load
    (``touched_experts``: the most experts a call can touch, ``min(local experts, token-expert pairs)``)."""
    configs = TILE_CONFIGS.get(device_kind, DEFAULT)[regime(rows_per_expert)]
    if touched_experts > SPLIT_K_MAX_EXPERTS:
        configs = tuple(dataclasses.replace(c, split_k=1) for c in configs)
    return configs
