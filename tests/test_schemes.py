"""Scheme dispatch in vLLM's order, the full OCP MX table, and refusals that name the key."""

import numpy as np
import pytest

from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES, scheme_layer_config
from quarkmoe_jax.quark_config import LayerQuantConfig
from quarkmoe_jax.schemes import MoEShape, OcpMxScheme, SchemeError, get_moe_scheme
from quarkmoe_jax.schemes.w8a8 import Fp8W8A8Scheme, Int8W8A8Scheme

VLLM_RUNS = {
    "w_mxfp4",
    "w_mxfp4_a_mxfp4",
    "w_mxfp4_a_mxfp6_e3m2",
    "w_mxfp4_a_mxfp6_e2m3",
    "w_mxfp4_a_fp8",
    "w_mxfp6_e3m2_a_mxfp6_e3m2",
    "w_mxfp6_e2m3_a_mxfp6_e2m3",
}
VLLM_REFUSES = {
    "w_mxfp6_e3m2",
    "w_mxfp6_e2m3",
    "w_mxfp6_e3m2_a_fp8",
    "w_mxfp6_e2m3_a_fp8",
    "w_mxfp4_a_fp8_dynamic_token",
}


@pytest.mark.parametrize("name", EXPORT_SCHEMES)
def test_every_named_scheme_dispatches_to_itself(name):
    scheme = get_moe_scheme(scheme_layer_config(name))
    assert scheme.name == name
    expected = OcpMxScheme if name.startswith("w_mx") else (Int8W8A8Scheme if "int8" in name else Fp8W8A8Scheme)
    assert type(scheme) is expected


def test_ocp_mx_table_covers_what_vllm_runs_and_refuses():
    assert VLLM_RUNS | VLLM_REFUSES <= set(EXPORT_SCHEMES)


def spec(**kw):
    return {
        "dtype": "fp4",
        "qscheme": "per_group",
        "group_size": 32,
        "ch_axis": -1,
        "scale_format": "e8m0",
        "is_dynamic": False,
        **kw,
    }


def cfg(weight=None, input_tensors=None, **kw):
    return LayerQuantConfig.from_dict({"weight": weight, "input_tensors": input_tensors, **kw}, "test")


@pytest.mark.parametrize(
    "config, message",
    [
        (
            cfg(spec(group_size=64)),
            r"w_mxfp4 weight \(layer model.layers.0.mlp.experts\): group_size must be 32, found 64",
        ),
        (cfg(spec(scale_format="float")), r"scale_format must be 'e8m0', found 'float'"),
        (cfg(spec(is_dynamic=True)), r"is_dynamic must be false"),
        (cfg(spec(), spec(is_dynamic=False)), r"w_mxfp4_a_mxfp4 input_tensors.*: MX activations must be dynamic"),
        (cfg(spec(), {"dtype": "int8", "qscheme": "per_tensor"}), r"input_tensors.dtype 'int8' cannot pair"),
        (cfg(spec(dtype="fp8_e4m3", group_size=16)), r"w_mxfp8_e4m3 weight.*group_size must be 32, found 16"),
        (
            cfg(spec(), {"dtype": "fp8_e4m3", "qscheme": "per_group", "is_dynamic": True, "group_size": 64}),
            r"w_mxfp4_a_mxfp8_e4m3 input_tensors.*group_size must be 32, found 64",
        ),
        (cfg({"dtype": "int4", "qscheme": "per_group", "group_size": 128}), r"W4A16 INT4"),
        (cfg(spec(), output_tensors={"dtype": "fp8_e4m3", "qscheme": "per_tensor"}), r"output_tensors quantization"),
        (cfg(spec(), bias={"dtype": "fp8_e4m3", "qscheme": "per_tensor"}), r"bias quantization"),
        (cfg({"dtype": "int8", "qscheme": "per_channel", "symmetric": False}), r"symmetric must be true"),
        (cfg({"dtype": "int8", "qscheme": "per_channel", "symmetric": True}), r"input_tensors must be quantized"),
        (cfg({"dtype": "int8", "qscheme": "per_group", "symmetric": True, "group_size": 32}), r"qscheme must be"),
        (
            cfg({"dtype": "fp8_e4m3", "qscheme": "per_tensor"}, {"dtype": "int8", "qscheme": "per_tensor"}),
            r"w8a8_fp8 input_tensors.*: dtype must be 'fp8_e4m3', found 'int8'",
        ),
        (cfg(None, {"dtype": "fp8_e4m3", "qscheme": "per_tensor"}), r"input_tensors are quantized but weight"),
        (cfg({"dtype": "uint8", "qscheme": "per_tensor"}), r"unsupported MoE scheme.*'uint8'"),
    ],
)
def test_refusals_name_the_key(config, message):
    with pytest.raises(SchemeError, match=message):
        get_moe_scheme(config, layer="model.layers.0.mlp.experts")


def test_mxfp8_weights_and_activations_are_ocp_mx():
    """fp8_e4m3 per_group (group 32, e8m0): MXFP8, vLLM's QuarkW8A8Mxfp8MoEMethod (weights, dynamic activations)."""
    mxfp8 = spec(dtype="fp8_e4m3")
    scheme = get_moe_scheme(cfg(mxfp8, {**mxfp8, "is_dynamic": True}))
    assert scheme.name == "w_mxfp8_e4m3_a_mxfp8_e4m3"
    q = scheme.quant_config()
    assert (q.weight.kind, q.weight.mx_format) == ("mx", "mxfp8_e4m3")
    assert (q.activation.kind, q.activation.mx_format, q.activation.dynamic) == ("mx", "mxfp8_e4m3", True)
    assert get_moe_scheme(cfg(mxfp8)).name == "w_mxfp8_e4m3"
    assert get_moe_scheme(cfg(spec(), {**mxfp8, "is_dynamic": True})).name == "w_mxfp4_a_mxfp8_e4m3"


def test_asymmetric_int8_activations():
    int8 = {"dtype": "int8", "qscheme": "per_channel", "symmetric": True}
    asym = {"dtype": "int8", "qscheme": "per_channel", "is_dynamic": True, "symmetric": False}
    with pytest.warns(UserWarning, match="run as symmetric"):
        assert get_moe_scheme(cfg(int8, asym), "vllm").name == "w8a8_int8_channel_dynamic_token"
    with pytest.raises(SchemeError, match="only supported with semantics='vllm'"):
        get_moe_scheme(cfg(int8, asym), "quark")


def test_unquantized_when_no_config():
    assert get_moe_scheme(None).name == "unquantized"


@pytest.mark.parametrize("fmt, packed", [("mxfp4", (8, 2 * 64, 48)), ("mxfp6_e2m3", (8, 2 * 64, 72))])
def test_create_weights_shapes_follow_vllm(fmt, packed):
    scheme = get_moe_scheme(scheme_layer_config(f"w_{fmt}_a_fp8"))
    specs = scheme.create_weights(MoEShape(8, hidden_size=96, intermediate_size=50, has_bias=True))
    i_pad, h = 64, 96  # intermediate padded up to a multiple of 32
    assert specs["w13_weight"].shape == packed and specs["w13_weight"].dtype == np.uint8
    assert specs["w2_weight"].shape == (8, h, i_pad * (4 if fmt == "mxfp4" else 6) // 8)
    assert specs["w13_weight_scale"].shape == (8, 2 * i_pad, h // 32) and specs["w13_weight_scale"].fill == 127
    assert specs["w2_weight_scale"].shape == (8, h, i_pad // 32)
    assert specs["w13_bias"].shape == (8, 2 * i_pad) and specs["w2_bias"].shape == (8, h)
    assert specs["w13_input_scale"].shape == (8,) and specs["w13_input_scale"].dtype == np.float32


@pytest.mark.parametrize(
    "name, w13_scale, w2_scale",
    [("w8a8_int8_channel_static", (4, 64), (4, 16)), ("w8a8_fp8_tensor_dynamic_token", (4, 2), (4,))],
)
def test_w8a8_create_weights(name, w13_scale, w2_scale):
    specs = get_moe_scheme(scheme_layer_config(name)).create_weights(MoEShape(4, 16, 32))
    assert specs["w13_weight"].shape == (4, 64, 16) and specs["w2_weight"].shape == (4, 16, 32)
    assert specs["w13_weight_scale"].shape == w13_scale and specs["w2_weight_scale"].shape == w2_scale
    assert ("w13_input_scale" in specs) == name.endswith("static")


def test_a_linear_weight_loads_through_its_scheme_as_one_expert():
    """LinearMethod: an MX weight [N, K] with N not a multiple of 32 comes back exactly [N, K] (the scheme's
    row padding dropped), the gate/up half holds nothing, and K that MX would pad is refused."""
    from quarkmoe_jax.errors import CheckpointError
    from quarkmoe_jax.schemes.linear import LinearMethod

    rng = np.random.default_rng(0)
    n, k = 40, 64
    method = LinearMethod(get_moe_scheme(scheme_layer_config("w_mxfp4")), n, k)
    specs = method.create_weights()
    assert all(0 in spec.shape for key, spec in specs.items() if key.startswith("w13_weight"))
    buffers = {key: spec.allocate() for key, spec in specs.items()}
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scales = rng.integers(100, 140, (n, k // 32), dtype=np.uint8)
    method.load_weights(buffers, "weight", codes, "q_proj.weight")
    method.load_weights(buffers, "weight_scale", scales, "q_proj.weight_scale")
    weight = method.process_weights_after_loading(buffers)["weight"]
    assert weight.shape == (n, k)
    np.testing.assert_array_equal(np.asarray(weight.values), codes)
    np.testing.assert_array_equal(np.asarray(weight.scales), scales)
    with pytest.raises(CheckpointError, match="in_features 48"):
        LinearMethod(get_moe_scheme(scheme_layer_config("w_mxfp4")), n, 48).create_weights()


def test_scheme_name_grammar_round_trips():
    from quarkmoe_jax.schemes.names import SchemeName

    for name in EXPORT_SCHEMES:
        parsed = SchemeName.parse(name)
        assert str(parsed) == name
        assert parsed.w8a8 == name.startswith("w8a8_")
    assert SchemeName.parse("w_mxfp6_e2m3_a_fp8") == SchemeName("mxfp6_e2m3", "fp8")
    assert SchemeName.parse("w8a8_int8_channel_dynamic_token") == SchemeName("int8", "dynamic_token", "channel")
    for bad in ("w8a8_int4_channel_static", "w8a8_int8_row_static", "mxfp4", "w_fp4"):
        with pytest.raises(ValueError, match="is not a scheme name"):
            SchemeName.parse(bad)
