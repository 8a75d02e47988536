"""The jax-triton backend: the shared backend suite on a GPU with jax-triton; on CPU (CI) what must hold
without it: the module imports, a call says what is missing, and ``auto`` moves on."""

import jax
import jax.numpy as jnp
import pytest
from quarkmoe_jax.kernels.triton_grouped_gemm import unavailable_reason

from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES
from quarkmoe_jax.moe import op
from tests.moe.backend_suite import BackendSuite, inputs, random_experts

needs_triton = pytest.mark.skipif(unavailable_reason() is not None, reason=f"triton backend: {unavailable_reason()}")


@needs_triton
class TestTriton(BackendSuite):
    backend = "triton"
    schemes = EXPORT_SCHEMES

    @pytest.fixture(autouse=True)
    def _one_config(self, monkeypatch):
        """Compile one autotuner candidate per kernel (the candidates differ only in tile sizes)."""
        from quarkmoe_jax.kernels import triton_grouped_gemm

        monkeypatch.setattr(triton_grouped_gemm, "AUTOTUNE", False)


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
    assert configs.backend_order("GPU Y", config, 1) == configs.MXFP4_BACKEND_ORDER  # MXFP4: the v2 kernels first
    w6 = random_experts(key, scheme="w_mxfp6_e2m3").quant_config
    assert configs.scheme_family(w6) == "mxfp6/none"
    assert configs.backend_order("GPU X", w6, 1) == configs.DEFAULT_BACKEND_ORDER
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
