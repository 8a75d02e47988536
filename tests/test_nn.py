"""NNX modules built from arrays: validation, jit, split/merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quarkmoe_jax as qm
from quarkmoe_jax.checkpoint.exporter import scheme_layer_config
from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock, RoutingConfig
from quarkmoe_jax.schemes import MoEShape, get_moe_scheme


def mx_experts(key, e=4, h=64, i=32, scheme="w_mxfp4_a_mxfp4"):
    k1, k2 = jax.random.split(key)
    w13 = qm.quantize(jax.random.normal(k1, (e, 2 * i, h)) * 0.02, "mxfp4")
    w2 = qm.quantize(jax.random.normal(k2, (e, h, i)) * 0.02, "mxfp4")
    config = get_moe_scheme(scheme_layer_config(scheme)).quant_config()
    return QuarkMoE(config, MoEShape(e, h, i), {"w13": w13, "w2": w2})


def test_block_from_arrays_is_jittable_and_round_trips(key):
    experts = mx_experts(key)
    block = QuarkMoEBlock(experts, np.zeros((4, 64), np.float32), RoutingConfig(top_k=2))
    w13 = nnx.jit(lambda b: b.experts.dequantized_weights(jnp.bfloat16)[0])(block)
    np.testing.assert_array_equal(
        np.asarray(w13, np.float32), np.asarray(experts.w13.get_value().dequantize(jnp.float32))
    )
    graphdef, state = nnx.split(block)
    params = nnx.state(block, nnx.Param)
    assert {type(v) for v in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, qm.MXTensor))} >= {
        qm.MXTensor
    }
    merged = nnx.merge(graphdef, state)
    assert merged.experts.quant_config == experts.quant_config and merged.routing.top_k == 2


def test_int8_experts_from_arrays_apply_scales_per_channel(key):
    q13 = jax.random.randint(key, (2, 8, 32), -127, 128).astype(jnp.int8)
    q2 = jax.random.randint(key, (2, 32, 4), -127, 128).astype(jnp.int8)
    config = get_moe_scheme(scheme_layer_config("w8a8_int8_channel_dynamic_token")).quant_config()
    s13, s2 = jnp.full((2, 8), 0.5), jnp.full((2, 32), 0.25)
    params = {"w13": qm.scaled_qarray(q13, s13, "channel"), "w2": qm.scaled_qarray(q2, s2, "channel")}
    experts = QuarkMoE(config, MoEShape(2, 32, 4), params)
    w13, w2 = experts.dequantized_weights()
    np.testing.assert_array_equal(np.asarray(w13), np.asarray(q13, np.float32) * 0.5)
    np.testing.assert_array_equal(np.asarray(w2), np.asarray(q2, np.float32) * 0.25)


def test_construction_errors(key):
    experts = mx_experts(key)
    params = experts.params()
    config = experts.quant_config
    with pytest.raises(ValueError, match="missing \\['w2'\\]"):
        QuarkMoE(config, MoEShape(4, 64, 32), {"w13": params["w13"]})
    with pytest.raises(ValueError, match="unknown \\['w3'\\]"):
        QuarkMoE(config, MoEShape(4, 64, 32), {**params, "w3": params["w2"]})
    with pytest.raises(ValueError, match="do not fit 5 experts"):
        QuarkMoE(config, MoEShape(5, 64, 32), params)
    with pytest.raises(ValueError, match=r"router_weight shape \(4, 32\), expected \(4, 64\)"):
        QuarkMoEBlock(experts, np.zeros((4, 32)), RoutingConfig(top_k=2))
    with pytest.raises(ValueError, match="top_k 5 must be in 1..4"):
        QuarkMoEBlock(experts, np.zeros((4, 64)), RoutingConfig(top_k=5))
    with pytest.raises(ValueError, match="expert_map places 2 experts here, params hold 4"):
        QuarkMoE(config, MoEShape(4, 64, 32), params, expert_map=np.array([0, 1, -1, -1]), num_global_experts=4)


def test_eager_block_calls_compile_once_per_token_bucket(key):
    """An eager ``block(x)`` runs routing, top-k and the experts under one jit per token bucket (T padded on
    the host; as an eager ``experts.apply``): new token counts inside a compiled bucket compile no XLA
    program, and padding rows change nothing (the result for T rows equals a jitted call on them)."""
    k1, k2 = jax.random.split(key)
    experts = mx_experts(k1)
    router = jax.random.normal(k2, (4, 64)) * 0.1
    block = QuarkMoEBlock(experts, router, RoutingConfig(top_k=2))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    x = np.asarray(jax.random.normal(key, (16, 64), jnp.float32))  # host rows: slicing them compiles nothing
    block(x[:9])
    before = len(compiles)
    outs = {t: block(x[:t]) for t in (10, 13, 16)}
    assert len(compiles) == before, compiles[before:]
    ids = np.stack([np.arange(16) % 4, (np.arange(16) + 1) % 4], 1).astype(np.int32)
    weights = np.full((16, 2), 0.5, np.float32)
    experts.apply(x[:3], weights[:3], ids[:3])  # the experts alone: bucket 4
    before = len(compiles)
    experts.apply(x[:4], weights[:4], ids[:4])
    assert len(compiles) == before, compiles[before:]
    jitted = jax.jit(lambda state, x: nnx.merge(*state)(x))
    for t, out in outs.items():
        assert out.shape == (t, 64)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(jitted(nnx.split(block), x[:t])))
