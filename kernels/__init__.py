"""GPU kernel backends, installed as ``quarkmoe_jax.kernels`` (pyproject's package mapping: this folder is the
subpackage, never a top-level ``kernels``).

* ``base.py``: what every backend shares (the launch contract ``TileConfig`` / ``Epilogue`` and the epilogue's
  maths, the load and regime of a launch, device facts) and :class:`~quarkmoe_jax.kernels.base.KernelBackend`.
* ``pallas/``, ``triton/``: one folder per backend: its kernels and its backend object (``backend.py``:
  name, GEMM, MX weight layout, tile and split-K rules, kernel generations, availability).
* ``registry.py``: the backends by name and the one choice of which runs (``auto``'s measured order, the
  load's layout); ``backend_table.json`` its measurements.
* ``tiles.py``: the tile tables of ``tiles.json``.
"""
