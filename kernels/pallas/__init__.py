"""The ``pallas`` kernel backend: the Pallas (Triton dialect) grouped GEMM (``grouped_gemm.py``) and its
backend object with the tile, split-K and prefill rules (``backend.py``)."""

from quarkmoe_jax.kernels.pallas.backend import PALLAS, PallasBackend
