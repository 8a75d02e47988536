"""The ``triton`` backend: the fused forward (:mod:`quarkmoe_jax.moe.fused`) on jax-triton kernels
(:mod:`quarkmoe_jax.kernels.triton_grouped_gemm`).

Optional: needs ``pip install 'quarkmoe-jax[triton]'`` (jax-triton 0.3.1, triton 3.6) and an NVIDIA GPU.
Without them this module still imports, and a call raises ``NotImplementedError`` saying what is missing
(``backend="auto"`` moves on). The same schemes as the ``pallas`` backend. MX weights (MXFP4, MXFP6) run
on the v2 kernels (:mod:`quarkmoe_jax.kernels.triton_mx_gemm`: fragment layout, decode in wgmma's register
operand, split-K where the grid is small; tiles from ``kernels/tiles.json``); 8-bit / bf16 weights on the
dense kernel (``block_n`` / warps / stages autotuned). No prefill dequantize path.
"""

from __future__ import annotations

from quarkmoe_jax.kernels.triton_grouped_gemm import triton_grouped_gemm, unavailable_reason
from quarkmoe_jax.moe.entry import bucketed_backend
from quarkmoe_jax.moe.fused import KernelBackend, fused_core

__all__ = ["TRITON", "moe_experts"]

TRITON = KernelBackend(
    "triton", triton_grouped_gemm, prefill_dequant=False, unavailable=unavailable_reason, fragment_layout=True
)

moe_experts = bucketed_backend(fused_core(TRITON))
