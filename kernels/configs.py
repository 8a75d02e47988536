"""Tile configurations per device kind and regime, chosen by measurement (``benchmarks/tune_tiles.py``).

Keys: ``(device kind, regime)``; regime ``"decode"`` (<= 16 rows per touched expert), ``"mid"`` (<= 128) or
``"prefill"``. Values: the GEMM1 and GEMM2 :class:`TileConfig`. Unknown devices (and the CPU interpreter)
use ``DEFAULT``. ``block_n`` is an upper bound: the launch uses the largest power of two <= it that divides N.
"""

from __future__ import annotations

from quarkmoe_jax.kernels.grouped_gemm import TileConfig

__all__ = ["TILE_CONFIGS", "DEFAULT", "DEQUANT_MIN_ROWS", "regime", "tile_configs", "dequant_min_rows"]

DEFAULT = {
    "decode": (TileConfig(16, 64, 4, 3), TileConfig(16, 64, 4, 3)),
    "mid": (TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3)),
    "prefill": (TileConfig(128, 128, 8, 3), TileConfig(128, 128, 8, 3)),
}

TILE_CONFIGS: dict[str, dict[str, tuple[TileConfig, TileConfig]]] = {
    # benchmarks/tune_tiles.py, 2026-11-24, Mixtral shapes (docs/performance.md): block_n 64 with 4 stages was
    # the best decode compromise of T = 1 and 16 for both GEMMs; prefill runs the dense tiles (dequantize path).
    "NVIDIA H100 80GB HBM3": {
        "decode": (TileConfig(16, 64, 4, 4), TileConfig(16, 64, 4, 4)),
        "mid": (TileConfig(64, 128, 8, 3), TileConfig(64, 128, 8, 3)),
        "prefill": (TileConfig(128, 128, 8, 3), TileConfig(128, 256, 8, 3)),
    },
}


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


def tile_configs(device_kind: str, rows_per_expert: float) -> tuple[TileConfig, TileConfig]:
    """GEMM1 and GEMM2 tile configs for a device kind (``jax.Device.device_kind``) and load."""
    return TILE_CONFIGS.get(device_kind, DEFAULT)[regime(rows_per_expert)]
