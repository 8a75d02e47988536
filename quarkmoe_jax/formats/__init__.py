"""Number formats: element codecs, OCP MX block quantization, FP8 / INT8 activation quantizers, and
:class:`QArray`, the one quantized-array type (every format, checkpoint or kernel layout)."""

# the kernel layouts register themselves with QArray on import
from quarkmoe_jax.formats import fragment_layout, kernel_layout  # noqa: E402, I001
from quarkmoe_jax.formats.elements import (
    BFLOAT16,
    E2M1,
    E2M3,
    E3M2,
    E4M3FN,
    E8M0_NAN,
    E8M0_ONE,
    FLOAT16,
    FLOAT32,
    FloatFormat,
    decode,
    e8m0_decode,
    e8m0_encode,
    e8m0_is_nan,
    element_format,
    encode,
)
from quarkmoe_jax.formats.mx import (
    MX_BLOCK_SIZE,
    MX_FORMATS,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    SCALE_MODES,
    MXFormat,
    block_scale_exponents,
    mx_format,
    pack_codes,
    quant_dequant,
    round_up,
    unpack_codes,
)
from quarkmoe_jax.formats.qarray import (
    MXTensor,
    QArray,
    QType,
    dequantize,
    float_qarray,
    quantize,
    scaled_qarray,
)
from quarkmoe_jax.formats.quantizers import (
    FP8_E4M3_MAX,
    fp8_dequantize,
    fp8_quant_dequant,
    fp8_quantize,
    int8_dequantize,
    int8_quant_dequant,
    int8_quantize,
)
