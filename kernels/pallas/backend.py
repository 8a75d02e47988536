"""The ``pallas`` backend as one object: the Pallas (Triton dialect) grouped GEMM of
:mod:`quarkmoe_jax.kernels.pallas.grouped_gemm`, the chunk layout it reads MX weights in, its tile, split-K and
prefill rules, and the paged attention kernel of :mod:`quarkmoe_jax.kernels.pallas.paged_attention`.

Compiled on a GPU; on CPU the same kernels run in the Pallas interpreter (slow: for tests, not for use).
Every MX scheme but MXFP8, INT8 / FP8 W8A8 (int8 and fp8 tensor cores) and W8A16; prefill dequantizes MX
weights to bfloat16 in bounded chunks (:data:`quarkmoe_jax.moe.fused.PREFILL_DEQUANT_CAP_BYTES`) from
``dequant_min_rows`` rows per expert (``kernels/tiles.json``).
"""

from __future__ import annotations

import dataclasses

from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.kernel_layout import CHUNK_LAYOUT, DEFAULT_CHUNK, k_parts, to_kernel_layout
from quarkmoe_jax.kernels import tiles
from quarkmoe_jax.kernels.base import Generation, KernelBackend, Load, TileConfig
from quarkmoe_jax.kernels.pallas import paged_attention as paged
from quarkmoe_jax.kernels.pallas.grouped_gemm import grouped_gemm, k_iterations

__all__ = ["PallasBackend", "PALLAS", "SPLIT_K_MAX_EXPERTS", "MIN_BLOCK_N"]

SPLIT_K_MAX_EXPERTS = 4
"""A table's ``split_k`` applies only when at most this many experts can be touched (few row tiles: the grid
alone does not fill the GPU); otherwise the launch runs unsplit."""

MIN_BLOCK_N = 16
"""The smallest ``block_n`` (a power of two) a launch may be fitted down to."""


XLA_LATENT_GATHER_BYTES = 256 << 20
"""Latent-attention steps whose XLA gather reads at most this many bytes (bfloat16) run XLA under ``auto``."""


class PallasBackend(KernelBackend):
    name = "pallas"
    layout = CHUNK_LAYOUT
    generations = {"mx": Generation(1, "2026-11-24"), "dense": Generation(1, "2026-11-24")}
    prefill_dequantizes = True
    has_paged_attention = True

    def gemm(self, *args, **kwargs):
        return grouped_gemm(*args, **kwargs)

    def tiles(self, device_kind: str, load: Load, contractions: tuple[int, int], mx: bool, arch=None):
        configs = tiles.tile_options(device_kind, tiles.PALLAS_TILES, load.regime, contractions, arch)
        if load.touched > SPLIT_K_MAX_EXPERTS:
            configs = tuple(dataclasses.replace(c, split_k=1) for c in configs)
        return configs

    def fit_tile(self, config: TileConfig, n: int, weight, num_tiles: int) -> TileConfig:
        """``block_n``: the largest power of two <= the table's that divides ``n``; ``split_k``: the largest
        divisor of the K loop's iterations <= the table's."""
        block_n = config.block_n
        while n % block_n:
            block_n //= 2
        if block_n < MIN_BLOCK_N:
            raise NotImplementedError(f"{self.name} backend: N = {n} has no power-of-two tile >= {MIN_BLOCK_N}")
        iterations = k_iterations(weight, config.k_unroll)
        split_k = max((d for d in range(1, config.split_k + 1) if iterations % d == 0), default=1)
        return dataclasses.replace(config, block_n=block_n, split_k=split_k)

    def prefill_dequant(self, device_kind: str, load: Load) -> bool:
        return load.rows_per_expert >= tiles.dequant_min_rows(device_kind)

    def in_layout(self, weight: QArray) -> bool:
        return weight.layout == CHUNK_LAYOUT and k_parts(weight) == 1

    def to_layout(self, weight: QArray) -> QArray:
        return to_kernel_layout(weight, DEFAULT_CHUNK)

    def paged_attention_unsupported(self, block_size: int, key_dims: tuple[int, ...], value_dim: int) -> str | None:
        return paged.unsupported_reason(block_size, key_dims, value_dim)

    def paged_attention_preferred(self, num_tokens: int, context: int, key_dims: tuple[int, ...]) -> bool:
        # Latent attention (two key parts, 128 heads over one 576-wide latent) ran 2.1-2.8x slower than XLA's
        # gather at decode batches 1-64 on an H100 (2026-12-07, benchmarks/attention_bench.py): XLA for the
        # steps whose gather (every token's whole context) stays small, the kernel for prefill-sized ones.
        if len(key_dims) == 1:
            return True
        return num_tokens * context * sum(key_dims) * 2 > XLA_LATENT_GATHER_BYTES

    def paged_attention(self, *args, **kwargs):
        return paged.paged_attention(*args, **kwargs)


PALLAS = PallasBackend()
