"""The whole MoE block (router, routed experts, shared experts) on exported checkpoints."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
from quarkmoe_jax.nn import QuarkMoEBlock
from tests.moe.reference import reference_moe


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_block_forward_composes_router_experts_and_shared(tmp_path, key, model_type):
    src = write_float_checkpoint(tmp_path / "f", model_type)
    path = export_quark_checkpoint(src, tmp_path / "q", "w_mxfp4_a_mxfp6_e3m2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = QuarkMoEBlock.from_checkpoint(path, 1)
    x = jax.random.normal(key, (11, 64), jnp.float32)
    out = block(x)
    weights, ids = block.route(x)
    want = reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), block.experts).astype(np.float64)
    if block.shared is not None:
        ones, zeros = np.ones((11, 1), np.float32), np.zeros((11, 1), np.int32)
        shared = reference_moe(np.asarray(x), ones, zeros, block.shared).astype(np.float64)
        if block.shared_gate_weight is not None:
            gate = np.asarray(x, np.float64) @ np.asarray(block.shared_gate_weight.get_value(), np.float64).T
            shared = shared / (1 + np.exp(-gate))
        want = want + shared
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    logits = jax.random.normal(key, (11, 4))
    np.testing.assert_array_equal(
        np.asarray(block(x, logits)),
        np.asarray(block.experts.apply(x, *block.route(x, logits)) if block.shared is None else block(x, logits)),
    )


def test_float_checkpoint_runs_unquantized(tmp_path, key):
    src = write_float_checkpoint(tmp_path / "f", "mixtral")
    block = QuarkMoEBlock.from_checkpoint(src, 0)
    assert block.experts.quant_config.scheme == "unquantized"
    x = jax.random.normal(key, (5, 64), jnp.bfloat16)
    assert block(x).dtype == jnp.bfloat16
