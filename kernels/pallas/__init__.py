"""The ``pallas`` kernel backend: the Pallas (Triton dialect) grouped GEMM (``grouped_gemm.py``), the paged
attention kernel (``paged_attention.py``) and the backend object with the tile, split-K and prefill rules
(``backend.py``)."""

from quarkmoe_jax.kernels.pallas.backend import PALLAS, PallasBackend
