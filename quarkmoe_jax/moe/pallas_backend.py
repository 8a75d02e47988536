"""The ``pallas`` backend: the fused forward (:mod:`quarkmoe_jax.moe.fused`) on the Pallas (Triton dialect)
grouped-GEMM kernels of :mod:`quarkmoe_jax.kernels.grouped_gemm`.

On a GPU the kernels are compiled; on CPU they run in the Pallas interpreter (slow: for tests, not for use).
Every MX scheme, INT8 / FP8 W8A8 (int8 and fp8 tensor cores) and W8A16; prefill dequantizes MX weights in
bounded chunks (:data:`quarkmoe_jax.moe.fused.PREFILL_DEQUANT_CAP_BYTES`).
"""

from __future__ import annotations

from quarkmoe_jax.kernels.grouped_gemm import grouped_gemm
from quarkmoe_jax.moe.entry import bucketed_backend
from quarkmoe_jax.moe.fused import KernelBackend, fused_core

__all__ = ["PALLAS", "moe_experts"]

PALLAS = KernelBackend("pallas", grouped_gemm, prefill_dequant=True)

moe_experts = bucketed_backend(fused_core(PALLAS))
