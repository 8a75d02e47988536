"""quarkmoe-jax: AMD Quark's quantized Mixture-of-Experts formats for JAX / Flax.

The names below are the public API; everything else lives in submodules.
"""

from quarkmoe_jax.errors import QuarkMoEError
from quarkmoe_jax.formats import (
    MX_FORMATS,
    MXFormat,
    MXTensor,
    QArray,
    QType,
    dequantize,
    float_qarray,
    quant_dequant,
    quantize,
    scaled_qarray,
)

__version__ = "0.1.0"

__all__ = [
    "MXFormat",
    "MXTensor",
    "MX_FORMATS",
    "QArray",
    "QType",
    "QuarkMoEError",
    "dequantize",
    "float_qarray",
    "quant_dequant",
    "quantize",
    "scaled_qarray",
    "__version__",
]
