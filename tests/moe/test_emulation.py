"""The emulation oracle against the independent float64 loop, for every scheme and the forward's options."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quarkmoe_jax as qm
from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES, export_quark_checkpoint, scheme_layer_config
from quarkmoe_jax.checkpoint.loader import linear_expert_map, round_robin_expert_map
from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
from quarkmoe_jax.moe import buckets, emulation
from quarkmoe_jax.moe.op import moe_experts
from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock
from quarkmoe_jax.schemes import MoEShape, get_moe_scheme
from tests.moe.backend_suite import ACTIVATION_CASES
from tests.moe.reference import reference_moe

AMAX = {layer: {"w13": np.array([3.0, 3.5, 4.0, 3.2]), "w2": np.array([0.05, 0.04, 0.06, 0.05])} for layer in (0, 1)}


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    return write_float_checkpoint(
        tmp_path_factory.mktemp("float") / "mixtral", "mixtral", hidden_size=64, intermediate_size=48
    )


def load(path, semantics="vllm", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuarkMoEBlock.from_checkpoint(path, 1, semantics=semantics, **kwargs)


def inputs(key, t=13, k=2, e=4, h=64):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (t, h), jnp.float32)
    ids = jnp.argsort(jax.random.uniform(k2, (t, e)), axis=-1)[:, :k].astype(jnp.int32)
    weights = jax.random.uniform(k3, (t, k), minval=0.1, maxval=1.0)
    return x, weights, ids


def assert_close(got, want, rtol=2e-5, activation_quantized=False):
    """Relative RMS and max error against the float64 loop, normalized by the output's RMS.

    With activation quantization, the float32 (oracle) and float64 (loop) GEMM1 sums can land on either
    side of a quantizer rounding boundary for a GEMM2 input element: that moves one token's whole output row
    by about one quantization step. Then a few rows (at most 10% and at least 1) may differ by up to 3e-2;
    every other row must agree to ``rtol``.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.sqrt(np.mean(want**2)) + 1e-30
    err = np.abs(got - want)
    if activation_quantized and got.ndim == 2 and got.shape[0] > 1:
        row_err = np.sqrt(np.mean(err**2, axis=1)) / scale
        flipped = row_err > rtol
        assert flipped.sum() <= max(1, got.shape[0] // 10) and row_err.max() < 3e-2, row_err
        err = err[~flipped]
        if err.size == 0:
            return
    assert np.sqrt(np.mean(err**2)) / scale < rtol and err.max() / scale < 50 * rtol, err.max() / scale


def quantizes_activations(experts) -> bool:
    return experts.quant_config.activation.kind != "none"


@pytest.mark.parametrize("semantics", ["vllm", "quark"])
@pytest.mark.parametrize("scheme", EXPORT_SCHEMES)
def test_every_scheme_matches_the_float64_loop(float_checkpoint, tmp_path, scheme, semantics, key):
    path = export_quark_checkpoint(float_checkpoint, tmp_path / "q", scheme, input_amax=AMAX)
    experts = load(path, semantics).experts
    x, weights, ids = inputs(key)
    out = experts.apply(x, weights, ids)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Quark's INT8 scale amax/127.5 puts each row maximum exactly on a rounding tie, so the last ulp of the
    # GEMM1 sum (float32 here, float64 in the loop) can flip that element by one step (docs/formats.md).
    tie_sensitive = semantics == "quark" and "int8" in scheme and "dynamic" in scheme
    assert_close(
        out,
        reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts),
        rtol=5e-3 if tie_sensitive else 2e-5,
        activation_quantized=quantizes_activations(experts) and not tie_sensitive,
    )


def random_mx_experts(key, activation, e=4, h=64, i=32, scheme="w_mxfp4_a_mxfp6_e2m3", bias=False, limit=None):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shards = 2 if activation in ("silu", "gelu", "gelu_tanh", "swigluoai", "swigluoai_uninterleave") else 1
    w13 = qm.quantize(jax.random.normal(k1, (e, shards * i, h)) * 0.1, "mxfp4")
    w2 = qm.quantize(jax.random.normal(k2, (e, h, i)) * 0.1, "mxfp4")
    params = {"w13": w13, "w2": w2}
    if bias:
        params["w13_bias"] = jax.random.normal(k3, (e, shards * i)) * 0.1
        params["w2_bias"] = jax.random.normal(k4, (e, h)) * 0.1
    config = get_moe_scheme(scheme_layer_config(scheme)).quant_config()
    shape = MoEShape(e, h, i, has_bias=bias, gated=shards == 2, interleaved=activation == "swigluoai")
    return QuarkMoE(config, shape, params, activation=activation, swiglu_limit=limit)


@pytest.mark.parametrize("activation, limit", ACTIVATION_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_activations_and_biases(key, activation, limit, bias):
    experts = random_mx_experts(key, activation, bias=bias, limit=limit)
    x, weights, ids = inputs(key)
    assert_close(
        experts.apply(x, weights, ids),
        reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts),
        activation_quantized=quantizes_activations(experts),
    )


@pytest.mark.parametrize("placement", [linear_expert_map, round_robin_expert_map])
def test_expert_map_non_local_pairs_contribute_zero(float_checkpoint, tmp_path, key, placement):
    path = export_quark_checkpoint(float_checkpoint, tmp_path / "q", "w_mxfp4_a_mxfp4")
    full = load(path).experts
    x, weights, ids = inputs(key)
    outs = []
    for rank in range(2):
        experts = load(path, expert_map=placement(4, 2, rank)).experts
        out = experts.apply(x, weights, ids)
        assert_close(
            out,
            reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts),
            activation_quantized=quantizes_activations(experts),
        )
        outs.append(np.asarray(out, np.float64))
    assert_close(outs[0] + outs[1], full.apply(x, weights, ids))  # the shards sum to the whole


def test_apply_router_weight_on_input(key):
    experts = random_mx_experts(key, "silu", scheme="w_mxfp4_a_mxfp4")
    x, weights, ids = inputs(key, k=1)
    out = experts.apply(x, weights, ids, apply_router_weight_on_input=True)
    assert_close(
        out,
        reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts, apply_router_weight_on_input=True),
        activation_quantized=True,
    )
    with pytest.raises(ValueError, match="top_k == 1"):
        experts.apply(*inputs(key, k=2), apply_router_weight_on_input=True)


def test_bfloat16_activations_run_in_bfloat16(key):
    import ml_dtypes

    experts = random_mx_experts(key, "silu", scheme="w_mxfp4")  # W4A16: no activation fake-quant to flip
    x, weights, ids = inputs(key)
    x = x.astype(jnp.bfloat16)
    out = experts.apply(x, weights, ids)
    assert out.dtype == jnp.bfloat16
    ref = reference_moe(
        np.asarray(x, np.float32), np.asarray(weights), np.asarray(ids), experts, dtype=ml_dtypes.bfloat16
    )
    assert_close(out, ref, rtol=4e-3)  # one bf16 ulp (2^-8) where summation order flips a rounding


def test_zero_tokens_and_experts_without_tokens(key):
    experts = random_mx_experts(key, "silu")
    empty = experts.apply(jnp.zeros((0, 64)), jnp.zeros((0, 2)), jnp.zeros((0, 2), jnp.int32))
    assert empty.shape == (0, 64)
    x, weights, _ = inputs(key)
    ids = jnp.zeros((13, 2), jnp.int32).at[:, 1].set(3)  # experts 1 and 2 receive nothing
    assert_close(
        experts.apply(x, weights, ids),
        reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts),
        activation_quantized=quantizes_activations(experts),
    )


def test_token_buckets_compile_once_per_bucket(key):
    assert [buckets.token_bucket(t) for t in (1, 3, 8, 9, 100, 8192, 8193)] == [1, 4, 8, 16, 128, 8192, 16384]
    experts = random_mx_experts(key, "gelu_tanh")
    sizes = []
    for t in (33, 40, 64):  # all in the 64-token bucket
        experts.apply(*inputs(key, t=t))
        sizes.append(emulation.moe_experts.cache_size())
    assert sizes[0] == sizes[1] == sizes[2]
    experts.apply(*inputs(key, t=65))
    assert emulation.moe_experts.cache_size() == sizes[0] + 1


def test_under_nnx_jit(key):
    from flax import nnx

    experts = random_mx_experts(key, "silu")
    x, weights, ids = inputs(key)
    jitted = nnx.jit(lambda m, x, w, i: m.apply(x, w, i))(experts, x, weights, ids)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(experts.apply(x, weights, ids)))


def test_nan_and_inf_stay_in_their_token(key):
    """Non-finite values never poison other tokens. With per-token / MX block scales the other tokens are
    bit-identical to a clean run; with a per-tensor dynamic scale they stay finite (the poisoned token's
    values leave the shared amax, so their scale may legitimately change)."""
    others = np.setdiff1d(np.arange(13), [3, 7])
    for scheme, identical in (("w_mxfp4_a_mxfp4", True), ("w_mxfp4_a_fp8_dynamic_tensor", False)):
        experts = random_mx_experts(key, "silu", scheme=scheme)
        x, weights, ids = inputs(key)
        clean = np.asarray(experts.apply(x, weights, ids))
        bad = x.at[3, 5].set(jnp.nan).at[7, 40].set(jnp.inf)
        out = np.asarray(experts.apply(bad, weights, ids))
        assert np.isfinite(out[others]).all()
        if identical:
            np.testing.assert_array_equal(out[others], clean[others])
        assert not np.isfinite(out[3]).all()


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((jnp.ones((4, 63)), jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32)), ValueError, r"x must be \[T, 64\]"),
        ((jnp.ones((4,)), jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32)), ValueError, r"x must be \[T, 64\]"),
        ((jnp.ones((4, 64), jnp.int32), jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32)), TypeError, "float array"),
        ((jnp.ones((4, 64)), jnp.ones((4, 2)), jnp.full((4, 2), 4, jnp.int32)), ValueError, r"in \[0, 4\)"),
        ((jnp.ones((4, 64)), jnp.ones((4, 2)), jnp.full((4, 2), -1, jnp.int32)), ValueError, r"in \[0, 4\)"),
        ((jnp.ones((4, 64)), jnp.ones((4, 3)), jnp.zeros((4, 2), jnp.int32)), ValueError, "topk_weights shape"),
        ((jnp.ones((4, 64)), jnp.ones((4, 2)), jnp.zeros((3, 2), jnp.int32)), ValueError, "topk_ids must be"),
        ((jnp.ones((4, 64)), jnp.ones((4, 2)), jnp.zeros((4, 2))), TypeError, "integers"),
    ],
)
def test_bad_inputs(key, args, error, match):
    with pytest.raises(error, match=match):
        random_mx_experts(key, "silu").apply(*args)


def test_bare_array_weights_are_refused(key):
    experts = random_mx_experts(key, "silu")
    params = {**experts.params(), "w2": jnp.zeros((4, 64, 32), jnp.float32)}
    with pytest.raises(TypeError, match=r"found a QArray and a bare float32 \[4, 64, 32\]"):
        moe_experts(*inputs(key), params, experts.quant_config, experts.shape, backend="emulation")


@pytest.mark.parametrize(
    "scheme", ["w_mxfp4_a_mxfp4", "w_mxfp6_e2m3_a_fp8", "w8a8_int8_channel_static", "w8a8_fp8_tensor_dynamic_token"]
)
def test_decode_path_gathers_only_the_touched_experts(float_checkpoint, tmp_path, key, scheme):
    # one token, top-2 of 4 experts: 2 pairs < 4 experts, so each pair's expert is gathered (no ragged_dot)
    experts = load(export_quark_checkpoint(float_checkpoint, tmp_path / "q", scheme, input_amax=AMAX), "quark").experts
    for t in (1, 2):
        x, weights, ids = inputs(key, t=t)
        out = experts.apply(x, weights, ids)
        assert_close(
            out,
            reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts),
            activation_quantized=quantizes_activations(experts),
        )


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quark_per_channel_over_tokens_activations(float_checkpoint, tmp_path, key, kind):
    """Dynamic per_channel inputs with ch_axis -1 under Quark semantics: one scale per channel per expert.

    INT8: every column maximum sits on Quark's amax/127.5 rounding tie, so summation-order noise flips more
    elements than per token; the tolerance is the one used against Quark's own output (test_quark_reference).
    """
    import json

    path = export_quark_checkpoint(float_checkpoint, tmp_path / "q", f"w8a8_{kind}_channel_dynamic_token")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["global_quant_config"]["input_tensors"]["ch_axis"] = -1
    (path / "config.json").write_text(json.dumps(config))
    experts = load(path, "quark").experts
    assert experts.quant_config.activation.granularity == "channel"
    assert load(path, "vllm").experts.quant_config.activation.granularity == "token"
    x, weights, ids = inputs(key)
    out = experts.apply(x, weights, ids)
    assert_close(
        out,
        reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts),
        rtol=1e-2 if kind == "int8" else 2e-5,  # tie flips: a few rows reach ~8e-3 at some seeds
        activation_quantized=True,
    )


MXFP8_SPEC = {"dtype": "fp8_e4m3", "qscheme": "per_group", "group_size": 32, "ch_axis": -1, "scale_format": "e8m0"}


@pytest.mark.parametrize("activation_spec", [None, {**MXFP8_SPEC, "is_dynamic": True}], ids=["w8a16", "a_mxfp8"])
def test_mxfp8_weights_match_the_float64_loop_and_the_kernels_fall_through(activation_spec, key):
    """MXFP8 (e4m3 elements, E8M0 scales): the oracle against the float64 loop; the kernel backends have no MXFP8
    path yet and say so with NotImplementedError, so ``auto`` runs the oracle."""
    from quarkmoe_jax.quark_config import LayerQuantConfig

    config = LayerQuantConfig.from_dict(
        {"weight": {**MXFP8_SPEC, "is_dynamic": False}, "input_tensors": activation_spec}, "test"
    )
    quant = get_moe_scheme(config).quant_config()
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "w13": qm.quantize(jax.random.normal(k1, (4, 64, 64)) * 0.1, "mxfp8_e4m3"),
        "w2": qm.quantize(jax.random.normal(k2, (4, 64, 32)) * 0.1, "mxfp8_e4m3"),
        "w13_bias": jax.random.normal(k3, (4, 64)) * 0.1,
        "w2_bias": jnp.zeros((4, 64)),
    }
    experts = QuarkMoE(quant, MoEShape(4, 64, 32, has_bias=True), params)
    x, weights, ids = inputs(key)
    got = experts.apply(x, weights, ids)
    want = reference_moe(np.asarray(x), np.asarray(weights), np.asarray(ids), experts)
    assert_close(got, want, activation_quantized=activation_spec is not None)
    for backend in ("pallas", "triton"):
        with pytest.raises(NotImplementedError):
            experts.apply(x, weights, ids, backend=backend)
