"""quarkmoe-jax: AMD Quark's quantized Mixture-of-Experts formats for JAX / Flax.

The names below are the public API; everything else lives in submodules.
"""


def _map_source_kernels() -> None:
    """Installed, the top-level ``kernels/`` folder is the ``quarkmoe_jax.kernels`` package (pyproject maps
    it). Run from a source checkout without installing (``PYTHONPATH=.``), map it here the same way."""
    import importlib.util
    import os
    import sys

    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_map_source_kernels()

from quarkmoe_jax.errors import QuarkMoEError  # noqa: E402
from quarkmoe_jax.formats import (  # noqa: E402
    MX_FORMATS,
    MXFormat,
    MXTensor,
    dequantize,
    quant_dequant,
    quantize,
)

__version__ = "0.1.0"

__all__ = [
    "MXFormat",
    "MXTensor",
    "MX_FORMATS",
    "QuarkMoEError",
    "dequantize",
    "quant_dequant",
    "quantize",
    "__version__",
]
