"""The Pallas backend against the oracle (interpreter on CPU, compiled kernels on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quarkmoe_jax.kernels.grouped_gemm import decode_mx_piece

from quarkmoe_jax.formats import mx_format
from quarkmoe_jax.formats.kernel_layout import to_kernel_layout
from quarkmoe_jax.moe import pallas_backend
from tests.moe.backend_suite import BackendSuite, inputs, random_experts


class TestPallas(BackendSuite):
    backend = "pallas"

    def test_kernel_layout_weights_give_the_same_result(self, key):
        experts = random_experts(key, scheme="w_mxfp6_e3m2_a_mxfp4", bias=True)
        x, weights, ids = inputs(key)
        quark_layout = experts.apply(x, weights, ids, backend="pallas")
        params = dict(experts.params())
        params["w13"], params["w2"] = to_kernel_layout(params["w13"]), to_kernel_layout(params["w2"])
        out = pallas_backend.moe_experts(
            x, weights, ids, params, experts.quant_config, experts.shape, activation=experts.activation
        )
        np.testing.assert_array_equal(np.asarray(out), np.asarray(quark_layout))

    def test_w8a8_is_not_implemented(self, float_checkpoint, tmp_path, key):
        from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
        from tests.moe.backend_suite import AMAX

        path = export_quark_checkpoint(float_checkpoint, tmp_path / "q", "w8a8_int8_channel_static", input_amax=AMAX)
        with pytest.raises(NotImplementedError, match="W8A8"):
            self.load(path).apply(*inputs(key), backend="pallas")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"])
def test_in_kernel_decode_is_exact_for_every_code_and_scale(fmt):
    """decode_mx_piece (the kernel's decoder) against the oracle's dequantize: every element code times
    every E8M0 scale code 0..254 that keeps the result a normal bfloat16 (XLA:CPU flushes subnormals)."""
    f = mx_format(fmt)
    codes = jnp.arange(1 << f.bits, dtype=jnp.int32)
    scales = jnp.arange(255, dtype=jnp.int32)
    got = decode_mx_piece(jnp.tile(codes, (255, 32 // codes.size or 1))[:, :32], scales[:, None], f, 32)
    packed_codes = jnp.tile(codes, (255, 32 // codes.size or 1))[:, :32].astype(jnp.uint8)
    from quarkmoe_jax.formats.mx import MXTensor, pack_codes

    want = MXTensor(pack_codes(packed_codes, f), jnp.repeat(scales[:, None], 1, 1).astype(jnp.uint8), f).dequantize(
        jnp.bfloat16
    )
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    normal = (np.abs(want) >= 2.0**-126) | (want == 0)
    np.testing.assert_array_equal(got[normal], want[normal])
    nan = decode_mx_piece(codes[None, :16], jnp.full((1, 1), 255, jnp.int32), f, 16)
    assert np.isnan(np.asarray(nan, np.float32)).all()


def test_prefill_dequantize_path_in_bounded_chunks(key, monkeypatch):
    """The prefill path (experts dequantized to bfloat16 a chunk at a time, then dense tiles) matches the
    oracle; forced on CPU with one expert per chunk, so several chunks fill one output."""
    from quarkmoe_jax.kernels import configs
    from quarkmoe_jax.kernels.grouped_gemm import dequantize_to_bfloat16

    monkeypatch.setitem(configs.DEQUANT_MIN_ROWS, "cpu", 0)
    monkeypatch.setattr(pallas_backend, "PREFILL_DEQUANT_CAP_BYTES", 1)
    jax.clear_caches()
    for scheme in ("w_mxfp4_a_mxfp4", "w_mxfp6_e3m2"):
        experts = random_experts(key, scheme=scheme, h=128, i=192, bias=True)
        x, weights, ids = inputs(key, t=24, h=128)
        TestPallas().check(experts, x, weights, ids)
        w = to_kernel_layout(experts.params()["w13"])
        np.testing.assert_array_equal(
            np.asarray(dequantize_to_bfloat16(w, interpret=True), np.float32),
            np.asarray(w.dequantize(jnp.bfloat16), np.float32),
        )
    jax.clear_caches()


def test_prepare_for_kernels_keeps_every_backend_exact(key):
    experts = random_experts(key, scheme="w_mxfp4_a_mxfp6_e2m3", bias=True)
    x, weights, ids = inputs(key)
    before = {b: np.asarray(experts.apply(x, weights, ids, backend=b)) for b in ("emulation", "pallas")}
    dequantized = np.asarray(experts.dequantized_weights()[0])
    experts.prepare_for_kernels()
    assert type(experts.params()["w13"]).__name__ == "MXKernelWeights"
    for b, out in before.items():
        np.testing.assert_array_equal(np.asarray(experts.apply(x, weights, ids, backend=b)), out)
    np.testing.assert_array_equal(np.asarray(experts.dequantized_weights()[0]), dequantized)
