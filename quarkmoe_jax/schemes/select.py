"""Pick the MoE scheme for a layer's Quark config, in vLLM's order: FP8 W8A8, OCP MX, INT8 W8A8.

Mirrors ``QuarkMoEMethod.get_moe_method`` (vLLM 0.33, semantics reference §1) with two differences:
* the combinations vLLM refuses but that are well defined run (weight-only MXFP6, MXFP6 with FP8
  activations, MX weights with dynamic FP8 activations, MX pairs outside vLLM's table, W8A8 granularity pairs
  outside vLLM's three);
* every refusal is a :class:`SchemeError` naming the scheme and the offending key with the expected and
  found values, where vLLM often falls through to "Unsupported FusedMoe scheme".
"""

from __future__ import annotations

from quarkmoe_jax.contracts import Numerics
from quarkmoe_jax.formats import MX_FORMATS, MXFP8_E4M3, mx_format
from quarkmoe_jax.quark_config import LayerQuantConfig, TensorSpec
from quarkmoe_jax.schemes.base import ActivationQuant, MoEScheme, SchemeError
from quarkmoe_jax.schemes.names import SchemeName
from quarkmoe_jax.schemes.ocp_mx import OcpMxScheme
from quarkmoe_jax.schemes.unquantized import UnquantizedScheme
from quarkmoe_jax.schemes.w8a8 import Fp8W8A8Scheme, Int8W8A8Scheme

__all__ = ["get_moe_scheme", "MX_WEIGHT_DTYPES"]

# Quark's dtype names of the MX formats (formats.mx); fp8_e4m3 is MXFP8 only with qscheme per_group (group 32,
# e8m0 scales), otherwise FP8 W8A8
MX_WEIGHT_DTYPES = {f.quark_dtype: f.name for f in MX_FORMATS.values() if f.bits < 8}
MXFP8_DTYPE = MXFP8_E4M3.quark_dtype


def get_moe_scheme(
    config: LayerQuantConfig | None, semantics: str = "vllm", layer: str = "", float_dtype=None
) -> MoEScheme:
    """The scheme for one MoE layer; ``config`` None (excluded or no config) gives the unquantized scheme,
    holding its weights in ``float_dtype`` (default bfloat16; a whole model passes its own dtype)."""
    where = f" (layer {layer})" if layer else ""
    if config is None or config.weight is None:
        if config is not None and config.input_tensors is not None:
            raise SchemeError(f"input_tensors are quantized but weight is not{where}: no MoE scheme does that")
        return UnquantizedScheme(semantics) if float_dtype is None else UnquantizedScheme(semantics, float_dtype)
    for key in ("output_tensors", "bias"):
        if getattr(config, key) is not None:
            raise SchemeError(
                f"{key} quantization is not supported for MoE layers{where} (vLLM refuses it too): expected "
                f"{key} null, found dtype {getattr(config, key).dtype!r}"
            )
    weight, act = config.weight, config.input_tensors
    if weight.dtype == "fp8_e4m3" and weight.qscheme in ("per_tensor", "per_channel"):
        return _w8a8(Fp8W8A8Scheme, "fp8_e4m3", config, semantics, where)
    if weight.dtype in MX_WEIGHT_DTYPES or (weight.dtype == MXFP8_DTYPE and weight.qscheme == "per_group"):
        return _ocp_mx(config, semantics, where)
    if weight.dtype == "int8":
        return _w8a8(Int8W8A8Scheme, "int8", config, semantics, where)
    if weight.dtype in ("int4", "uint4"):
        raise SchemeError(f"weight.dtype {weight.dtype!r}{where}: W4A16 INT4 MoE is not supported")
    raise SchemeError(
        f"unsupported MoE scheme{where}: weight.dtype {weight.dtype!r} with qscheme {weight.qscheme!r}, "
        f"input_tensors.dtype {act.dtype if act else None!r}; supported: fp8_e4m3 per_tensor/per_channel, "
        f"{sorted(MX_WEIGHT_DTYPES)} and {MXFP8_DTYPE} (MXFP8) per_group (group 32, e8m0), int8 per_tensor/per_channel"
    )


def _dynamic_granularity(act: TensorSpec, semantics: str) -> str:
    """Granularity of a dynamic FP8 / INT8 activation spec.

    vLLM reads ``per_channel`` as per token whatever ``ch_axis`` says. Quark's observer keeps one scale per
    ``ch_axis`` slice of the 2-D ``[tokens, H]`` expert input: ``ch_axis`` 0 is per token, 1 / -1 is per
    hidden channel over the tokens routed to the expert (its recipes write 1 or -1 meaning per token for
    3-D dense-layer inputs). ``Numerics.channel_scales_by_ch_axis`` (Quark's semantics) reproduces what Quark
    computes.
    """
    if act.qscheme != "per_channel":
        return "tensor"
    if Numerics.of(semantics).channel_scales_by_ch_axis and act.ch_axis in (1, -1):
        return "channel"
    return "token"


def _mx_scale_mode(act: TensorSpec, semantics: str) -> str:
    """MX activations' scale rounding: the config's mode under Quark's numerics, else ``"even"`` (vLLM)."""
    return (act.scale_calculation_mode or "even") if Numerics.of(semantics).mx_scale_mode_from_config else "even"


def _require(spec: TensorSpec, key: str, expected, scheme: str, where: str) -> None:
    found = getattr(spec, key)
    ok = found in expected if isinstance(expected, tuple) else found == expected
    if not ok:
        raise SchemeError(f"{scheme}{where}: {key} must be {expected!r}, found {found!r}")


def _ocp_mx(config: LayerQuantConfig, semantics: str, where: str) -> OcpMxScheme:
    weight, act = config.weight, config.input_tensors
    weight_format = mx_format(weight.dtype).name
    scheme = str(SchemeName(weight_format))
    _require(weight, "qscheme", "per_group", scheme, " weight" + where)
    _require(weight, "group_size", 32, scheme, " weight" + where)
    _require(weight, "scale_format", "e8m0", scheme, " weight" + where)
    if weight.is_dynamic:
        raise SchemeError(f"{scheme} weight{where}: is_dynamic must be false for stored weights, found True")
    if weight.ch_axis not in (None, -1, 1):
        raise SchemeError(
            f"{scheme} weight{where}: ch_axis must be -1 (blocks along the input axis), found {weight.ch_axis}"
        )
    if act is None:
        activation = ActivationQuant("none")
    elif act.dtype == "fp8_e4m3":
        if act.is_dynamic and act.qscheme == "per_group":  # MXFP8 activations (vLLM's Mxfp8Dynamic key)
            scheme = str(SchemeName(weight_format, MXFP8_E4M3.name))
            _require(act, "group_size", 32, scheme, " input_tensors" + where)
            _require(act, "scale_format", "e8m0", scheme, " input_tensors" + where)
            mode = _mx_scale_mode(act, semantics)
            activation = ActivationQuant("mx", "mxfp8_e4m3", dynamic=True, scale_mode=mode)
        elif act.is_dynamic:
            granularity = "token" if act.qscheme == "per_channel" else "tensor"
            scheme = str(SchemeName(weight_format, SchemeName.fp8_dynamic(granularity)))
            activation = ActivationQuant("fp8", dynamic=True, granularity=_dynamic_granularity(act, semantics))
        else:
            scheme = str(SchemeName(weight_format, "fp8"))
            _require(act, "qscheme", "per_tensor", scheme, " input_tensors" + where)
            if act.symmetric is False:
                raise SchemeError(f"{scheme} input_tensors{where}: symmetric must be true, found False")
            activation = ActivationQuant("fp8", dynamic=False, granularity="tensor")
    elif act.dtype in MX_WEIGHT_DTYPES:
        act_format = MX_WEIGHT_DTYPES[act.dtype]
        scheme = str(SchemeName(weight_format, act_format))
        if not act.is_dynamic:
            raise SchemeError(f"{scheme} input_tensors{where}: MX activations must be dynamic, found is_dynamic False")
        _require(act, "qscheme", "per_group", scheme, " input_tensors" + where)
        _require(act, "group_size", 32, scheme, " input_tensors" + where)
        mode = _mx_scale_mode(act, semantics)
        activation = ActivationQuant("mx", act_format, dynamic=True, scale_mode=mode)
    else:
        raise SchemeError(
            f"{scheme}{where}: input_tensors.dtype {act.dtype!r} cannot pair with MX weights; expected None, "
            f"fp8_e4m3 or one of {sorted(MX_WEIGHT_DTYPES)}"
        )
    return OcpMxScheme(config, semantics, weight_format, activation, scheme)


def _w8a8(cls, dtype: str, config: LayerQuantConfig, semantics: str, where: str):
    weight, act = config.weight, config.input_tensors
    kind = "int8" if dtype == "int8" else "fp8"
    scheme = SchemeName.w8a8_prefix(kind)
    _require(weight, "qscheme", ("per_tensor", "per_channel"), scheme, " weight" + where)
    if kind == "int8" and weight.symmetric is not True:
        raise SchemeError(
            f"{scheme} weight{where}: symmetric must be true (vLLM's INT8 MoE is symmetric), found {weight.symmetric!r}"
        )
    if weight.is_dynamic:
        raise SchemeError(f"{scheme} weight{where}: is_dynamic must be false for stored weights, found True")
    granularity = "channel" if weight.qscheme == "per_channel" else "tensor"
    if act is None:
        raise SchemeError(f"{scheme}{where}: input_tensors must be quantized ({dtype}); found none (weight-only)")
    _require(act, "dtype", dtype, scheme, " input_tensors" + where)
    if act.is_dynamic:
        _require(act, "qscheme", ("per_channel", "per_tensor"), scheme, " input_tensors" + where)
        act_granularity = "token" if act.qscheme == "per_channel" else "tensor"
        activation = ActivationQuant(kind, dynamic=True, granularity=_dynamic_granularity(act, semantics))
        scheme = str(SchemeName(kind, SchemeName.w8a8_dynamic(act_granularity), granularity))
    else:
        _require(act, "qscheme", "per_tensor", scheme, " input_tensors" + where)
        activation = ActivationQuant(kind, dynamic=False, granularity="tensor")
        scheme = str(SchemeName(kind, "static", granularity))
    if kind == "int8" and act.symmetric is not True and Numerics.of(semantics).asymmetric_int8_refused:
        raise SchemeError(
            f"{scheme} input_tensors{where}: asymmetric INT8 activations (symmetric {act.symmetric!r}) are only "
            "supported with semantics='vllm', which runs them as symmetric like vLLM"
        )
    if kind == "int8" and act.symmetric is not True:
        import warnings

        warnings.warn(f"{scheme}{where}: asymmetric INT8 activations run as symmetric (vLLM semantics)", stacklevel=3)
    return cls(config, semantics, granularity, activation, scheme)
