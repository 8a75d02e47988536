"""The typed numerics (contracts.Numerics), the scheme family, the weights' config-versus-data check and the
MX formats' stored dtype."""

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES, scheme_layer_config
from quarkmoe_jax.contracts import SEMANTICS, ActivationQuant, MoEQuantConfig, MoEShape, Numerics, WeightQuant
from quarkmoe_jax.formats import MX_FORMATS, float_qarray, quantize, scaled_qarray
from quarkmoe_jax.moe import emulation
from quarkmoe_jax.nn import QuarkMoE
from quarkmoe_jax.schemes import get_moe_scheme


def test_numerics_of_each_semantics():
    vllm, quark = Numerics.of("vllm"), Numerics.of("quark")
    assert Numerics.of(vllm) is vllm and vllm.semantics == "vllm" and quark.semantics == "quark"
    flags = [f.name for f in dataclasses.fields(Numerics) if f.name != "semantics"]
    assert all(getattr(vllm, f) != getattr(quark, f) for f in flags)  # every flag is a real difference
    assert quark.fp8_fake_quant_of_mx and not vllm.fp8_fake_quant_of_mx
    assert vllm.int8_w8a16_for_dynamic_tensor and not quark.int8_w8a16_for_dynamic_tensor
    with pytest.raises(ValueError, match="unknown semantics 'torch'"):
        Numerics.of("torch")
    with pytest.raises(ValueError, match="unknown semantics"):
        MoEQuantConfig("w_mxfp4", WeightQuant("mx", "mxfp4"), ActivationQuant("none"), "torch")


def test_the_fp8_fake_quant_rule_is_one_predicate():
    fp8 = ActivationQuant("fp8", dynamic=False, granularity="tensor")
    for semantics in SEMANTICS:
        for weight in (
            WeightQuant("mx", "mxfp4"),
            WeightQuant("fp8", None, "channel"),
            WeightQuant("int8", None, "tensor"),
        ):
            for act in (fp8, ActivationQuant("mx", "mxfp4"), ActivationQuant("none")):
                config = MoEQuantConfig("s", weight, act, semantics)
                expected = semantics == "quark" and weight.kind == "mx" and act.kind == "fp8"
                assert config.fp8_input_fake_quant == expected
                assert Numerics.of(semantics).fp8_input_fake_quant(act, weight.kind) == expected


def test_quant_config_carries_its_numerics():
    config = MoEQuantConfig("w_mxfp4", WeightQuant("mx", "mxfp4"), ActivationQuant("none"), "quark")
    assert config.numerics is Numerics.of("quark")
    assert dataclasses.replace(config, semantics="vllm").numerics is Numerics.of("vllm")
    assert hash(config) == hash(MoEQuantConfig("w_mxfp4", WeightQuant("mx", "mxfp4"), ActivationQuant("none"), "quark"))


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_family_is_the_backend_tables_key(semantics):
    configs = [get_moe_scheme(scheme_layer_config(name), semantics).quant_config() for name in EXPORT_SCHEMES]
    configs.append(get_moe_scheme(None, semantics).quant_config())
    families = {c.family for c in configs}
    assert {c.family for c in configs if c.weight.kind == "mx" and c.weight.mx_format.startswith("mxfp6")} == {
        "mxfp6/none",
        "mxfp6/mx",
        "mxfp6/fp8",
    }  # both MXFP6 formats share a family
    assert {"mxfp4/mx", "mxfp6/none", "mxfp6/fp8", "mxfp8/mx", "int8/int8", "fp8/fp8", "bf16/none"} <= families
    assert ("int8/none" in families) == (semantics == "vllm")  # vLLM's W8A16 pair


def test_mx_codes_stored_dtype():
    assert MX_FORMATS["mxfp8_e4m3"].stored_dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert MX_FORMATS["mxfp8_e4m3"].code_dtypes == (np.dtype(np.uint8), np.dtype(ml_dtypes.float8_e4m3fn))
    for name in ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"):
        assert MX_FORMATS[name].stored_dtype == np.uint8 and MX_FORMATS[name].code_dtypes == (np.dtype(np.uint8),)


# The weights' QType must agree with the config's WeightQuant.

SHAPE = MoEShape(num_experts=2, hidden_size=64, intermediate_size=32)


def _mx_params(fmt):
    rng = np.random.default_rng(0)
    w13 = quantize(jnp.asarray(rng.normal(size=(2, 64, 64)), jnp.float32), fmt)
    w2 = quantize(jnp.asarray(rng.normal(size=(2, 64, 32)), jnp.float32), fmt)
    return {"w13": w13, "w2": w2}


def _int8_params(granularity):
    scales = {"channel": lambda n: np.ones((2, n), np.float32), "tensor": lambda n: np.ones((2,), np.float32)}
    return {
        "w13": scaled_qarray(np.ones((2, 64, 64), np.int8), scales[granularity](64), granularity),
        "w2": scaled_qarray(np.ones((2, 64, 32), np.int8), scales[granularity](64), granularity),
    }


MISMATCHES = [
    (WeightQuant("mx", "mxfp6_e2m3"), lambda: _mx_params("mxfp4"), "mxfp4"),
    (WeightQuant("int8", None, "channel"), lambda: _mx_params("mxfp4"), "mxfp4"),
    (WeightQuant("int8", None, "channel"), lambda: _int8_params("tensor"), "int8 with tensor scales"),
    (WeightQuant("fp8", None, "tensor"), lambda: _int8_params("tensor"), "int8 with tensor scales"),
    (WeightQuant("none"), lambda: _int8_params("channel"), "int8 with channel scales"),
    (
        WeightQuant("mx", "mxfp4"),
        lambda: {
            "w13": float_qarray(np.ones((2, 64, 64), np.float32)),
            "w2": float_qarray(np.ones((2, 64, 32), np.float32)),
        },
        "float32",
    ),
]


@pytest.mark.parametrize("weight, params, found", MISMATCHES)
def test_weights_that_disagree_with_the_config_are_refused(weight, params, found):
    config = MoEQuantConfig("s", weight, ActivationQuant("none"))
    pattern = rf"w13: the quant config says {weight!r}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern + rf" but the data is {found}"):
        QuarkMoE(config, SHAPE, params())
    x = jnp.ones((1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=pattern):
        emulation.moe_experts(x, jnp.ones((1, 1), jnp.float32), jnp.zeros((1, 1), jnp.int32), params(), config, SHAPE)


def test_weights_that_agree_are_taken():
    QuarkMoE(MoEQuantConfig("s", WeightQuant("mx", "mxfp4"), ActivationQuant("none")), SHAPE, _mx_params("mxfp4"))
    for granularity in ("channel", "tensor"):
        config = MoEQuantConfig("s", WeightQuant("int8", None, granularity), ActivationQuant("none"))
        QuarkMoE(config, SHAPE, _int8_params(granularity))
    # Quark's per-shard scales: w13 per shard, w2 (one shard) per tensor
    params = _int8_params("tensor")
    params["w13"] = scaled_qarray(np.ones((2, 64, 64), np.int8), np.ones((2, 2), np.float32), "shard")
    QuarkMoE(MoEQuantConfig("s", WeightQuant("int8", None, "shard"), ActivationQuant("none"), "quark"), SHAPE, params)
