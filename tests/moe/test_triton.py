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
