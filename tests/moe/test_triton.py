"""The jax-triton backend: the shared backend suite on a GPU with jax-triton; on CPU (CI) what must hold
without it: the module imports, a call says what is missing, and ``auto`` moves on."""

import jax
import jax.numpy as jnp
import pytest

from quarkmoe_jax.checkpoint.exporter import scheme_layer_config
from quarkmoe_jax.kernels.triton_grouped_gemm import unavailable_reason
from quarkmoe_jax.moe import op
from quarkmoe_jax.schemes import get_moe_scheme
from tests.moe.backend_suite import KERNEL_SCHEMES, BackendSuite, inputs, random_experts

needs_triton = pytest.mark.skipif(unavailable_reason() is not None, reason=f"triton backend: {unavailable_reason()}")


@needs_triton
class TestTriton(BackendSuite):
    backend = "triton"
    schemes = KERNEL_SCHEMES

    @pytest.fixture(autouse=True)
    def _one_config(self, monkeypatch):
        """Compile one autotuner candidate per kernel (the candidates differ only in tile sizes)."""
        from quarkmoe_jax.kernels import triton_grouped_gemm

        monkeypatch.setattr(triton_grouped_gemm, "AUTOTUNE", False)

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


def test_auto_follows_the_measured_table(key, monkeypatch):
    """``backend_order`` reads the shipped table (nearest measured token count) and appends the defaults;
    ``auto_order`` puts the emulation last and only the emulation on CPU."""
    from quarkmoe_jax.kernels import configs

    table = {"GPU X": {"mxfp4/mx": {"1": ["triton", "pallas"], "4096": ["pallas"]}}}
    monkeypatch.setattr(configs, "_backend_table", lambda: table)
    config = random_experts(key, scheme="w_mxfp4_a_mxfp4").quant_config
    assert configs.scheme_family(config) == "mxfp4/mx"
    assert configs.backend_order("GPU X", config, 1) == ("triton", "pallas")
    assert configs.backend_order("GPU X", config, 2) == ("triton", "pallas")
    assert configs.backend_order("GPU X", config, 8192) == ("pallas", "triton")
    assert configs.backend_order("GPU Y", config, 1) == configs.MX_BACKEND_ORDER  # MX weights: the v2 kernels first
    w6 = random_experts(key, scheme="w_mxfp6_e2m3").quant_config
    assert configs.scheme_family(w6) == "mxfp6/none"
    assert configs.backend_order("GPU X", w6, 1) == configs.MX_BACKEND_ORDER
    w8 = get_moe_scheme(scheme_layer_config("w_mxfp8_e4m3_a_mxfp8_e4m3")).quant_config()
    assert configs.scheme_family(w8) == "mxfp8/mx"  # its own family, not MXFP6's
    int8 = get_moe_scheme(scheme_layer_config("w8a8_int8_channel_dynamic_token")).quant_config()
    assert configs.backend_order("GPU X", int8, 1) == configs.DEFAULT_BACKEND_ORDER
    if jax.default_backend() == "cpu":
        assert op.auto_order(config, 1) == ("emulation",)
    else:
        assert op.auto_order(config, 1)[-1] == "emulation"


def test_shipped_table_names_known_backends_and_families():
    import json

    from quarkmoe_jax.kernels import configs

    if not configs.BACKEND_TABLE_PATH.exists():
        pytest.skip("no table shipped")
    table = json.loads(configs.BACKEND_TABLE_PATH.read_text())
    assert {"meta", "order"} <= set(table)
    families = {"mxfp4", "mxfp6", "int8", "fp8", "bf16"}
    for device, per_family in table["order"].items():
        for family, by_tokens in per_family.items():
            assert family.split("/")[0] in families and family.split("/")[1] in ("none", "mx", "fp8", "int8"), family
            for tokens, order in by_tokens.items():
                assert int(tokens) > 0 and order and set(order) <= set(op.BACKENDS) - {"emulation"}, (device, order)


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
    from quarkmoe_jax.kernels.grouped_gemm import TileConfig
    from quarkmoe_jax.kernels.triton_mx_gemm import mx_fragment_gemm

    fragment = to_fragment_layout(_every_code_and_scale(fmt_name, max_scale))
    assert exact_scales(fragment) == (max_scale > 128)
    k = fragment.shape[-1]
    config = TileConfig(16, 64, 4, 3, split_k=1)
    identity = jnp.eye(k, dtype=jnp.bfloat16)
    tile_expert = jnp.zeros((k // config.block_m,), jnp.int32)
    got = np.asarray(jax.jit(lambda a, w, t: mx_fragment_gemm(a, w, t, config=config))(identity, fragment, tile_expert))
    want = decode_fragment_words(fragment)[0].T.astype(np.float32)
    np.testing.assert_array_equal(got, want)
