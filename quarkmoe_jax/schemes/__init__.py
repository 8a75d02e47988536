"""MoE quantization schemes with vLLM's lifecycle, and the dispatch that picks one per layer."""

from quarkmoe_jax.schemes.base import (
    SEMANTICS,
    ActivationQuant,
    HeaderCheckBuffer,
    MoEQuantConfig,
    MoEScheme,
    MoEShape,
    ParamSpec,
    SchemeError,
    WeightQuant,
)
from quarkmoe_jax.schemes.ocp_mx import OcpMxScheme
from quarkmoe_jax.schemes.select import MX_WEIGHT_DTYPES, get_moe_scheme
from quarkmoe_jax.schemes.unquantized import UnquantizedScheme
from quarkmoe_jax.schemes.w8a8 import Fp8W8A8Scheme, Int8W8A8Scheme
