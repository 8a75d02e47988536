"""The jax-triton backend: the shared backend suite on a GPU with jax-triton; on CPU (CI) what must hold
without it: the module imports, a call says what is missing, and ``auto`` moves on."""

import jax
import jax.numpy as jnp
import pytest

from quarkmoe_jax.kernels.triton.grouped_gemm import unavailable_reason
from quarkmoe_jax.moe import op
from tests.moe.backend_suite import KERNEL_SCHEMES, BackendSuite, inputs, random_experts

needs_triton = pytest.mark.skipif(unavailable_reason() is not None, reason=f"triton backend: {unavailable_reason()}")


@needs_triton
class TestTriton(BackendSuite):
    backend = "triton"
    schemes = KERNEL_SCHEMES

    @pytest.fixture(autouse=True)
    def _one_config(self, monkeypatch):
        """Compile one autotuner candidate per kernel (the candidates differ only in tile sizes)."""
        from quarkmoe_jax.kernels.triton import grouped_gemm

        monkeypatch.setattr(grouped_gemm, "AUTOTUNE", False)

    @pytest.mark.parametrize("weight_scheme", ["w_mxfp4", "w_mxfp6_e2m3"])
    def test_interleaved_gate_and_up_with_padded_rows(self, key, weight_scheme):
        """gpt-oss's interleaved gate / up rows when 2I (192) is not a multiple of the fragment layout's 128
        rows: the padded rows' zeros close each shard of the kernel's shard-major output."""
        experts = random_experts(key, "swigluoai", i=96, scheme=weight_scheme, bias=True, limit=7.0)
        self.check(experts, *inputs(key, dtype=jnp.bfloat16))


@pytest.mark.skipif(unavailable_reason() is None, reason="jax-triton runs here")
def test_unavailable_triton_says_why_and_auto_moves_on(key, monkeypatch):
    experts = random_experts(key)
    x, weights, ids = inputs(key)
    with pytest.raises(NotImplementedError, match="triton backend: .*(triton|GPU)"):
        experts.apply(x, weights, ids, backend="triton")
    # auto with the kernels first (as on a GPU) falls through to the emulation
    monkeypatch.setattr(op, "auto_order", lambda config, tokens: ("triton", "emulation"))
    out = experts.apply(x, weights, ids, backend="auto")
    want = experts.apply(x, weights, ids, backend="emulation")
    assert jnp.array_equal(out, want)


def _every_code_and_scale(fmt_name: str, max_scale: int):
    """MX weights ``[1, 64, 8192]`` whose 32-element groups run through every E8M0 code ``0..max_scale`` and,
    within the groups of each code, every element code."""
    import numpy as np

    import quarkmoe_jax as qm
    from quarkmoe_jax.formats.mx import pack_codes

    fmt = qm.MX_FORMATS[fmt_name]
    n, k = 64, 8192
    rows, cols = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    codes = ((7 * rows + cols) % (1 << fmt.bits)).astype(np.uint8)
    groups = np.arange(k // 32)
    scales = ((groups[None, :] + 3 * np.arange(n)[:, None]) % (max_scale + 1)).astype(np.uint8)
    return qm.MXTensor(pack_codes(codes[None], fmt), jnp.asarray(scales[None]), fmt)


@needs_triton
@pytest.mark.parametrize("fmt_name", ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"])
@pytest.mark.parametrize("max_scale", [128, 250])
def test_v2_kernel_decodes_every_code_at_every_scale_exactly(fmt_name, max_scale):
    """The v2 kernel times an identity activation returns its decoded weights: bit-equal to the numpy model
    of the decode (float64: bf16 subnormals exact) for every element code next to every scale code, on the
    one-multiply scale path (codes <= 128) and the two-multiply one (up to 250: no product overflows)."""
    import numpy as np

    from quarkmoe_jax.formats.fragment_layout import decode_fragment_words, exact_scales, to_fragment_layout
    from quarkmoe_jax.kernels.base import TileConfig
    from quarkmoe_jax.kernels.triton.mx_gemm import mx_fragment_gemm

    fragment = to_fragment_layout(_every_code_and_scale(fmt_name, max_scale))
    assert exact_scales(fragment) == (max_scale > 128)
    k = fragment.shape[-1]
    config = TileConfig(16, 64, 4, 3, split_k=1)
    identity = jnp.eye(k, dtype=jnp.bfloat16)
    tile_expert = jnp.zeros((k // config.block_m,), jnp.int32)
    got = np.asarray(jax.jit(lambda a, w, t: mx_fragment_gemm(a, w, t, config=config))(identity, fragment, tile_expert))
    want = decode_fragment_words(fragment)[0].T.astype(np.float32)
    np.testing.assert_array_equal(got, want)


@needs_triton
@pytest.mark.parametrize(
    ("case", "split_k", "fmt_name"),
    [
        ("interleaved_swigluoai_bias", 1, "mxfp4"),
        ("interleaved_swigluoai_bias", 4, "mxfp4"),
        ("halves_silu_limit_row_scales", 1, "mxfp4"),
        ("halves_silu_limit_row_scales", 2, "mxfp6_e3m2"),
        ("gemm2_bias_router_weights", 4, "mxfp6_e2m3"),
        ("gemm2_float32_out", 1, "mxfp4"),
    ],
)
def test_v3_epilogue_in_the_kernel_equals_the_v2_accumulators_epilogued_by_xla(key, case, split_k, fmt_name):
    """The v3 kernel (epilogue and split-K sum in the kernel) against the v2 kernel's float32 accumulators
    run through the shared XLA epilogue, on the same launch: unused row tiles zero, every other element
    within two roundings of the output dtype (the sums in another order; the activation's last float32 bit may
    differ) — gpt-oss's interleaved swigluoai with bias, Mixtral's silu on gate / up halves with a clamp
    and FP8 row scales, GEMM2's bias and router weights, split-K by the last split (``split_k`` is the
    table's: gate / up halves size theirs again on their halved grid)."""
    import numpy as np

    import quarkmoe_jax as qm
    from quarkmoe_jax.formats.fragment_layout import to_fragment_layout
    from quarkmoe_jax.formats.mx import pack_codes
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig, epilogue_of_accumulators
    from quarkmoe_jax.kernels.triton.mx_gemm import mx_fragment_gemm, mx_fused_gemm

    fmt = qm.MX_FORMATS[fmt_name]
    experts, n, k, block_m = 3, 512, 1024, 16
    gated = not case.startswith("gemm2")
    epilogue = {
        "interleaved_swigluoai_bias": Epilogue("swigluoai", True, True, None, "bfloat16", has_bias=True),
        "halves_silu_limit_row_scales": Epilogue("silu", True, False, 3.0, "bfloat16", row_scales=True),
        "gemm2_bias_router_weights": Epilogue(has_bias=True, row_weights=True),
        "gemm2_float32_out": Epilogue(activation_dtype="float32"),
    }[case]
    out_dtype = jnp.float32 if case == "gemm2_float32_out" else jnp.bfloat16
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    codes = rng.integers(0, 1 << fmt.bits, (experts, n, k), dtype=np.uint8)
    scales = rng.integers(118, 128, (experts, n, k // 32), dtype=np.uint8)
    weight = to_fragment_layout(qm.MXTensor(pack_codes(codes, fmt), jnp.asarray(scales), fmt))
    tile_expert = jnp.asarray([2, 0, -1, 1, 0], jnp.int32)  # one unused tile
    m_pad = tile_expert.shape[0] * block_m
    a = jnp.asarray(rng.standard_normal((m_pad, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((experts, n)), jnp.float32) if epilogue.has_bias else None
    row_scales = jnp.asarray(rng.uniform(0.5, 2.0, m_pad), jnp.float32) if epilogue.row_scales else None
    row_weights = jnp.asarray(rng.uniform(0.1, 1.0, m_pad), jnp.float32) if epilogue.row_weights else None
    n_out = n // 2 if gated else n
    config = TileConfig(block_m, 128, 4, 3, split_k=split_k, fused_epilogue=True)

    def v2(a, w, t):
        acc = mx_fragment_gemm(a, w, t, config=config, interleaved=epilogue.interleaved)
        return epilogue_of_accumulators(
            acc,
            t,
            block_m,
            n_out=n_out,
            epilogue=epilogue,
            out_dtype=out_dtype,
            bias=bias,
            row_weights=row_weights,
            row_scales=row_scales,
            col_scales=None,
        )

    def v3(a, w, t):
        return mx_fused_gemm(
            a,
            w,
            t,
            bias,
            row_weights,
            row_scales,
            config=config,
            epilogue=epilogue,
            n_out=n_out,
            out_dtype=out_dtype,
        )

    want = np.asarray(jax.jit(v2)(a, weight, tile_expert), np.float32)
    out = jax.jit(v3)(a, weight, tile_expert)
    assert out.shape == (m_pad, n_out) and out.dtype == out_dtype
    got = np.asarray(out, np.float32)
    unused = slice(2 * block_m, 3 * block_m)
    np.testing.assert_array_equal(got[unused], 0)
    used = np.r_[0 : 2 * block_m, 3 * block_m : m_pad]
    one_ulp = 2.0 ** (np.floor(np.log2(np.abs(want[used]) + 1e-30)) - (7 if out_dtype == jnp.bfloat16 else 23))
    assert np.all(np.abs(got[used] - want[used]) <= 2 * one_ulp + 1e-30), np.max(np.abs(got[used] - want[used]))
    assert np.mean(got[used] == want[used]) > 0.98
