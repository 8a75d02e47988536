"""The ``triton`` kernel backend (optional extra ``quarkmoe-jax[triton]``): the jax-triton dense grouped GEMM
(``grouped_gemm.py``), the v2 MX kernel (``mx_gemm.py``) and the backend object with their tile and split-K
rules (``backend.py``)."""

from quarkmoe_jax.kernels.triton.backend import TRITON, TritonBackend
