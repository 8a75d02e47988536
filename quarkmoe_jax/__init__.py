"""quarkmoe-jax: AMD Quark's quantized Mixture-of-Experts formats for JAX / Flax.

The names below are the public API; everything else lives in submodules.
"""


from quarkmoe_jax.errors import QuarkMoEError
from quarkmoe_jax.formats import (
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
