"""The ``triton`` backend as one object: the jax-triton kernels (:mod:`quarkmoe_jax.kernels.triton.grouped_gemm`
and the v2 MX kernel :mod:`quarkmoe_jax.kernels.triton.mx_gemm`), the fragment layout they read MX weights
in, and their tile and split-K rules.

Optional: needs ``pip install 'quarkmoe-jax[triton]'`` (jax-triton 0.3.1, triton 3.6) and an NVIDIA GPU.
Without them this module still imports, and a call raises ``NotImplementedError`` saying what is missing
(``backend="auto"`` moves on). The same schemes as the ``pallas`` backend. MX weights (MXFP4, MXFP6) run on
the v2 kernels (fragment layout, decode in wgmma's register operand, split-K where the grid is small; tiles
from the ``triton_mx`` table); 8-bit / bf16 weights on the dense kernel (the Pallas table's ``block_m``;
``block_n`` / warps / stages autotuned). No prefill dequantize path.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.fragment_layout import FRAGMENT_LAYOUT, UNIT_K, padded_shape, to_fragment_layout
from quarkmoe_jax.kernels import tiles
from quarkmoe_jax.kernels.base import Generation, KernelBackend, Load, TileConfig, weight_class
from quarkmoe_jax.kernels.triton.grouped_gemm import triton_grouped_gemm, unavailable_reason

__all__ = ["TritonBackend", "TRITON", "MIN_MX_BLOCK_N", "split_k_for"]

MIN_MX_BLOCK_N = 64
"""The v2 kernel's smallest ``block_n`` (one warpgroup's 64 rows)."""
FUSED_EPILOGUE_ENV = "QUARKMOE_MX_FUSED_EPILOGUE"
"""``1``: every MX launch runs the v3 kernel (epilogue and split-K sum in the kernel) where it can, whatever
the tile table says (an experiment switch until the tables are tuned with it)."""


@functools.cache
def _sm_count() -> int:
    return getattr(jax.devices()[0], "core_count", 132) or 132


def split_k_for(num_tiles: int, n_tiles: int, k_units: int, limit: int) -> int:
    """The v2 kernel's K split that fills the GPU: the smallest power of two (up to ``limit``, dividing the K
    loop's ``k_units``) that gives at least two programs per SM over ``num_tiles`` x ``n_tiles``."""
    split = 1
    while split < limit and num_tiles * n_tiles * split < 2 * _sm_count() and k_units % (2 * split) == 0:
        split *= 2
    return split


class TritonBackend(KernelBackend):
    name = "triton"
    layout = FRAGMENT_LAYOUT
    generations = {"mx": Generation(2, "2026-12-02"), "dense": Generation(1, "2026-11-24")}
    prefill_dequantizes = False

    def gemm(self, *args, **kwargs):
        return triton_grouped_gemm(*args, **kwargs)

    def unavailable(self) -> str | None:
        return unavailable_reason()

    def tiles(self, device_kind: str, load: Load, contractions: tuple[int, int], mx: bool, arch=None):
        family = tiles.TRITON_MX_TILES if mx else tiles.PALLAS_TILES  # dense: only the row tile is read
        return tiles.tile_options(device_kind, family, load.regime, contractions, arch)

    def fit_tile(self, config: TileConfig, n: int, weight, num_tiles: int) -> TileConfig:
        """MX: ``block_n`` halved (down to 64) until it tiles the weight's padded rows, then the K split that
        fills the GPU (:func:`split_k_for`, at most the table's). Dense: as it is (the autotuner picks the
        rest)."""
        if weight_class(weight) != "mx":
            return config
        block_n = config.block_n
        while block_n > MIN_MX_BLOCK_N and padded_shape(weight)[1] % block_n:
            block_n //= 2
        _, n_pad, k_pad = padded_shape(weight)
        split_k = split_k_for(num_tiles, n_pad // block_n, k_pad // UNIT_K, config.split_k)
        fused = config.fused_epilogue or os.environ.get(FUSED_EPILOGUE_ENV, "") == "1"
        return dataclasses.replace(config, block_n=block_n, split_k=split_k, fused_epilogue=fused)

    def in_layout(self, weight: QArray) -> bool:
        return weight.layout == FRAGMENT_LAYOUT

    def to_layout(self, weight: QArray) -> QArray:
        return to_fragment_layout(weight)


TRITON = TritonBackend()
