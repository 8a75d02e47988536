"""The Pallas backend against the oracle (interpreter on CPU, compiled kernels on a GPU)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.checkpoint.loader import linear_expert_map
from quarkmoe_jax.formats import mx_format
from quarkmoe_jax.formats.kernel_layout import to_kernel_layout
from quarkmoe_jax.kernels.pallas.grouped_gemm import decode_mx_piece
from quarkmoe_jax.moe import fused, op
from tests.moe.backend_suite import AMAX, KERNEL_SCHEMES, BackendSuite, inputs, random_experts


class TestPallas(BackendSuite):
    backend = "pallas"
    schemes = KERNEL_SCHEMES  # every MXFP4 / MXFP6 scheme and every INT8 / FP8 W8A8 scheme

    def test_kernel_layout_weights_give_the_same_result(self, key):
        experts = random_experts(key, scheme="w_mxfp6_e3m2_a_mxfp4", bias=True)
        x, weights, ids = inputs(key)
        quark_layout = experts.apply(x, weights, ids, backend="pallas")
        params = dict(experts.params())
        params["w13"], params["w2"] = to_kernel_layout(params["w13"]), to_kernel_layout(params["w2"])
        out = op.BACKENDS["pallas"](
            x, weights, ids, params, experts.quant_config, experts.shape, activation=experts.activation
        )
        np.testing.assert_array_equal(np.asarray(out), np.asarray(quark_layout))

    def test_fp8_w8a8_with_codes_in_bfloat16(self, float_checkpoint, tmp_path, key, monkeypatch):
        """FP8 W8A8 on a device without fp8 tensor cores: the e4m3 codes go in as bfloat16 (exact)."""
        from quarkmoe_jax.kernels import base

        monkeypatch.setitem(base.FP8_TENSOR_CORES, jax.devices()[0].device_kind, False)
        jax.clear_caches()
        for scheme in ("w8a8_fp8_channel_dynamic_token", "w8a8_fp8_tensor_static"):
            path = export_quark_checkpoint(float_checkpoint, tmp_path / scheme, scheme, input_amax=AMAX)
            self.check(self.load(path), *inputs(key, t=32, dtype=jnp.bfloat16))
        jax.clear_caches()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"])
def test_in_kernel_decode_is_exact_for_every_code_and_scale(fmt):
    """decode_mx_piece (the kernel's decoder) against the oracle's dequantize: every element code times
    every E8M0 scale code 0..254 that keeps the result a normal bfloat16 (XLA:CPU flushes subnormals)."""
    f = mx_format(fmt)
    codes = jnp.arange(1 << f.bits, dtype=jnp.int32)
    scales = jnp.arange(255, dtype=jnp.int32)
    got = decode_mx_piece(jnp.tile(codes, (255, 32 // codes.size or 1))[:, :32], scales[:, None], f, 32)
    packed_codes = jnp.tile(codes, (255, 32 // codes.size or 1))[:, :32].astype(jnp.uint8)
    from quarkmoe_jax.formats import MXTensor, pack_codes

    want = MXTensor(pack_codes(packed_codes, f), jnp.repeat(scales[:, None], 1, 1).astype(jnp.uint8), f).dequantize(
        jnp.bfloat16
    )
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    normal = (np.abs(want) >= 2.0**-126) | (want == 0)
    np.testing.assert_array_equal(got[normal], want[normal])
    nan = decode_mx_piece(codes[None, :16], jnp.full((1, 1), 255, jnp.int32), f, 16)
    assert np.isnan(np.asarray(nan, np.float32)).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3"])
def test_tile_options_do_not_change_the_result(fmt, key):
    """k_unroll and swap_ab reorganise the K loop, never the summation order: bit-identical output
    (gated epilogue, K = 5 full chunks + a 64 tail so the unrolled loop leaves a remainder, an empty tile)."""
    from quarkmoe_jax.formats.kernel_layout import chunk_layout_qarray
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig
    from quarkmoe_jax.kernels.pallas.grouped_gemm import grouped_gemm

    f = mx_format(fmt)
    k_dim, n_rows = 704, 128
    k1, k2, k3, k4 = jax.random.split(key, 4)
    nibbles = jax.random.randint(k1, (2, n_rows, k_dim // 2), 0, 256).astype(jnp.uint8)
    high = jax.random.randint(k2, (2, n_rows, k_dim // 4), 0, 256).astype(jnp.uint8) if f.bits == 6 else None
    scales = jax.random.randint(k3, (2, n_rows, k_dim // 32), 118, 128).astype(jnp.uint8)
    weight = chunk_layout_qarray(nibbles, high, scales, f, 128)
    a = jax.random.normal(k4, (48, k_dim), jnp.float32)
    tile_expert = jnp.array([1, 0, -1], jnp.int32)
    results = [
        np.asarray(
            grouped_gemm(
                a,
                weight,
                tile_expert,
                n_out=n_rows // 2,
                config=config,
                epilogue=Epilogue("silu", gated=True),
                out_dtype=jnp.float32,
                interpret=True,
            )
        )[:32]
        for config in (
            TileConfig(16, 32),
            TileConfig(16, 32, k_unroll=2),
            TileConfig(16, 64, k_unroll=3, swap_ab=True),
            TileConfig(16, 32, k_unroll=4, swap_ab=True),
        )
    ]
    assert np.isfinite(results[0]).all() and np.abs(results[0]).max() > 0
    for got in results[1:]:
        np.testing.assert_array_equal(got, results[0])


def test_split_k_matches_one_pass(key):
    """split_k: float32 partial sums over K splits (the last one takes the 64-element tail), reduced and
    epilogued by XLA (row scales, bias, router weights; a gated activation on [gate; up] and on interleaved
    rows); equal to one pass up to summation order."""
    from quarkmoe_jax.formats.kernel_layout import chunk_layout_qarray
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig
    from quarkmoe_jax.kernels.pallas.grouped_gemm import grouped_gemm

    f = mx_format("mxfp4")
    k_dim, n_rows = 576, 64
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    weight = chunk_layout_qarray(
        jax.random.randint(k1, (2, n_rows, k_dim // 2), 0, 256).astype(jnp.uint8),
        None,
        jax.random.randint(k2, (2, n_rows, k_dim // 32), 118, 128).astype(jnp.uint8),
        f,
        128,
    )
    a = jax.random.normal(k3, (48, k_dim), jnp.float32)
    bias = jax.random.normal(k4, (2, n_rows))
    row_weights, row_scales = jax.random.uniform(k5, (2, 48))
    tile_expert = jnp.array([1, 0, -1], jnp.int32)
    epilogue = Epilogue(has_bias=True, row_weights=True, row_scales=True)

    def run(config, epilogue, n_out):
        out = grouped_gemm(
            a,
            weight,
            tile_expert,
            bias,
            row_weights,
            row_scales,
            n_out=n_out,
            config=config,
            epilogue=epilogue,
            out_dtype=jnp.float32,
            interpret=True,
        )
        return np.asarray(out)[:32]

    # float32 activations: a bf16 rounding of the summed partials would turn summation-order noise into ulps
    gated = Epilogue("silu", gated=True, has_bias=True, row_scales=True, activation_dtype="float32")
    interleaved = Epilogue(
        "swigluoai", gated=True, interleaved=True, swiglu_limit=7.0, has_bias=True, activation_dtype="float32"
    )
    for epilogue_ in (epilogue, gated, interleaved):
        n_out = n_rows // 2 if epilogue_.gated else n_rows
        want = run(TileConfig(16, 32), epilogue_, n_out)
        assert np.isfinite(want).all() and np.abs(want).max() > 0
        for config in (TileConfig(16, 32, split_k=4), TileConfig(16, 32, k_unroll=2, swap_ab=True, split_k=2)):
            np.testing.assert_allclose(run(config, epilogue_, n_out), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_backend_with_split_k_decode_tiles(key, monkeypatch):
    """The backend with split-K decode tiles (as the H100 table uses for few touched experts): both GEMMs'
    partial sums reduced and epilogued by XLA, interleaved swigluoai with bias, against the oracle."""
    import dataclasses

    from quarkmoe_jax.kernels import tiles

    decode = tuple(tuple((k, dataclasses.replace(c, split_k=2)) for k, c in o) for o in tiles.DEFAULT["decode"])
    monkeypatch.setitem(tiles.DEFAULT, "decode", decode)
    jax.clear_caches()
    experts = random_experts(key, activation="swigluoai", h=256, i=256, bias=True, limit=7.0)
    x, weights, ids = inputs(key, t=2, h=256)
    TestPallas().check(experts, x, weights, ids)
    jax.clear_caches()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas kernels need a GPU")
@pytest.mark.parametrize("decoder", ["asm", "jnp"])
def test_compiled_decode_is_bit_exact_including_subnormals(decoder, monkeypatch):
    """Compiled dequantize kernel: every FP4 byte under every E8M0 code 0..255 (row n holds scale codes
    n..n+3, byte j of row n is (n + j) mod 256) against an exact numpy decode, subnormal bfloat16 results and
    overflow to inf included; code 255 gives NaN. "asm" is the packed PTX decode the fused kernels use."""
    from quarkmoe_jax.formats.kernel_layout import chunk_layout_qarray
    from quarkmoe_jax.kernels.pallas import grouped_gemm as kernel_module

    monkeypatch.setattr(kernel_module, "DECODE", decoder)
    jax.clear_caches()
    f = mx_format("mxfp4")
    rows = np.arange(256)
    nibbles = ((rows[:, None] + np.arange(64)[None, :]) % 256).astype(np.uint8)[None]
    scales = ((rows[:, None] + np.arange(4)[None, :]) % 256).astype(np.uint8)[None]
    weight = chunk_layout_qarray(jnp.asarray(nibbles), None, jnp.asarray(scales), f, 128)
    got = np.asarray(kernel_module.dequantize_to_bfloat16(weight))
    codes = np.asarray(weight.codes()).astype(np.int64)
    magnitude = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7] * np.where(codes & 8, -1.0, 1.0)
    scale_codes = np.repeat(scales.astype(np.int64), 32, axis=-1)
    with np.errstate(over="ignore"):
        want = (magnitude * np.exp2(scale_codes - 127.0)).astype(ml_dtypes.bfloat16)
    want = np.where(scale_codes == 255, np.nan, want).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(want)], want.view(np.uint16)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)].astype(np.float32)).all()
    jax.clear_caches()


def test_prefill_dequantize_path_in_bounded_chunks(key, monkeypatch):
    """The prefill path (experts dequantized to bfloat16 a chunk at a time, then dense tiles) matches the
    oracle; forced on CPU with one expert per chunk, so several chunks fill one output."""
    from quarkmoe_jax.kernels import tiles
    from quarkmoe_jax.kernels.pallas.grouped_gemm import dequantize_to_bfloat16

    monkeypatch.setitem(tiles.DEQUANT_MIN_ROWS, "cpu", 0)
    monkeypatch.setattr(fused, "PREFILL_DEQUANT_CAP_BYTES", 1)
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
    experts.prepare_for_kernels("pallas")  # the default is the triton backend's layout where it can run
    assert experts.params()["w13"].layout == "chunk"
    for b, out in before.items():
        np.testing.assert_array_equal(np.asarray(experts.apply(x, weights, ids, backend=b)), out)
    np.testing.assert_array_equal(np.asarray(experts.dequantized_weights()[0]), dequantized)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_8bit_tensor_core_gemm_is_exact(dtype, key):
    """int8 x int8 -> int32 (bit-exact) and e4m3 x e4m3 -> float32 grouped GEMMs against exact sums: saturating
    codes (-128 / 127, +-448), an all-zero block, K = 1168 so int8 sums pass 2^24 (the int32 accumulator is
    exact, its float32 conversion is the oracle's) and end in a 16-wide tail (below the 8-bit MMA's K: run in
    bfloat16); one pass, split-K (int32 / float32 partials) and swapped tiles; row and column scales."""
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig
    from quarkmoe_jax.kernels.pallas.grouped_gemm import grouped_gemm

    k_dim, n_rows = 1168, 64
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if dtype == "int8":
        a = jax.random.randint(k1, (48, k_dim), -128, 128).astype(jnp.int8)
        w = jax.random.randint(k2, (2, n_rows, k_dim), -128, 128).astype(jnp.int8)
        saturating = jnp.where(jnp.arange(k_dim) % 2, 127, -128).astype(jnp.int8)
        a, w = a.at[:16].set(saturating), w.at[1, :8].set(saturating)  # sums of 1.9e7 > 2^24
    else:
        a = (jax.random.normal(k1, (48, k_dim)) * 64).astype(jnp.float8_e4m3fn)
        w = (jax.random.normal(k2, (2, n_rows, k_dim)) * 2).astype(jnp.float8_e4m3fn)
        a = a.at[:16, :64].set(448.0).astype(jnp.float8_e4m3fn)
    w = w.at[0, :, 128:256].set(0)
    row_scales = jax.random.uniform(k3, (48,), minval=0.5, maxval=2.0)
    col_scales = jax.random.uniform(k4, (2, n_rows), minval=0.5, maxval=2.0)
    tile_expert = jnp.array([1, 0, -1], jnp.int32)
    a64 = np.asarray(a.astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    exact = np.concatenate([a64[:16] @ w64[1].T, a64[16:32] @ w64[0].T])
    want = exact.astype(np.float32) * np.asarray(row_scales)[:32, None]
    want = want * np.asarray(col_scales)[np.repeat([1, 0], 16)]
    if dtype == "int8":
        assert np.abs(exact).max() > 2**24
    for config in (TileConfig(16, 32), TileConfig(16, 32, split_k=3), TileConfig(16, 64, swap_ab=True, k_unroll=2)):
        got = grouped_gemm(
            a,
            w,
            tile_expert,
            row_scales=row_scales,
            col_scales=col_scales,
            n_out=n_rows,
            config=config,
            epilogue=Epilogue(row_scales=True, col_scales=True),
            out_dtype=jnp.float32,
            interpret=jax.default_backend() == "cpu",
        )
        got = np.asarray(got)[:32]
        if dtype == "int8":
            np.testing.assert_array_equal(got, want, err_msg=str(config))
        else:  # float32 sums in another order; on Hopper each 32-element K slice is summed in reduced precision
            rtol = 1e-5 if jax.default_backend() == "cpu" else 1e-3
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=str(config))


def test_an_expert_parallel_call_sizes_its_tiles_for_the_local_share(key, monkeypatch):
    """The fused forward passes the expert map's global expert count to ``expected_load`` (the formula itself
    is tested in test_pair_sort.py): 2 of 8 experts here, 16 tokens x top-2."""
    seen = []

    class Traced(Exception):
        pass

    def recording(num_pairs, num_local, num_global):
        seen.append((num_pairs, num_local, num_global))
        raise Traced  # stop at trace time: the kernels need not run

    monkeypatch.setattr(fused, "expected_load", recording)
    experts = random_experts(key, e=2)
    x, weights, ids = inputs(key, t=16, k=2, e=8)
    expert_map = linear_expert_map(8, 4, 1)
    with pytest.raises(Traced):
        op.BACKENDS["pallas"](
            x,
            weights,
            ids,
            experts.params(),
            experts.quant_config,
            experts.shape,
            expert_map=expert_map,
            num_global_experts=8,
        )
    assert seen == [(32, 2, 8)]


@pytest.mark.parametrize("scheme", ["w_mxfp4", "w_mxfp6_e3m2"])
def test_fragment_layout_weights_run_on_every_backend(key, scheme):
    """MX weights re-laid for the v2 Triton kernels give the same result on the emulation and the Pallas
    backends (each converts what it cannot read)."""
    from quarkmoe_jax.formats.fragment_layout import to_fragment_layout
    from quarkmoe_jax.moe import emulation

    experts = random_experts(key, scheme=scheme, bias=True)
    x, weights, ids = inputs(key)
    params = dict(experts.params())
    relaid = {**params, "w13": to_fragment_layout(params["w13"]), "w2": to_fragment_layout(params["w2"])}
    args = (experts.quant_config, experts.shape)
    for moe_experts in (emulation.moe_experts, op.BACKENDS["pallas"]):
        want = moe_experts(x, weights, ids, params, *args, activation=experts.activation)
        got = moe_experts(x, weights, ids, relaid, *args, activation=experts.activation)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
