"""A quantized Linear on the kernel backend's grouped GEMM (one group) against the oracle's GEMM.

On the CPU the Pallas kernels run in the Pallas interpreter; on a GPU the same tests run the compiled kernels of
every available backend. The weight is laid out once (``Linear.prepare_for_kernels``), as ``from_pretrained``
does on a GPU; the result must equal the oracle's ``dense_gemm`` path to float32 summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quarkmoe_jax as qm
from quarkmoe_jax.checkpoint.exporter import scheme_layer_config
from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS
from quarkmoe_jax.models.layers import Linear
from quarkmoe_jax.schemes import get_moe_scheme

BACKENDS = [name for name, backend in KERNEL_BACKENDS.items() if backend.unavailable() is None]
SCHEMES = {  # scheme: (K, a static input scale where it takes one)
    "w_mxfp4": (96, None),  # K not a multiple of 128: the layouts pad it
    "w_mxfp6_e3m2_a_fp8": (128, 4.0 / 448.0),  # FP6 kernels take K in multiples of 64
    "w_mxfp4_a_fp8_dynamic_token": (96, None),
}


def _linear(key, scheme: str, n: int, k: int, bias: bool) -> Linear:
    k1, k2 = jax.random.split(key)
    quant = get_moe_scheme(scheme_layer_config(scheme)).quant_config()
    weight = qm.quantize(jax.random.normal(k1, (n, k)) * 0.1, quant.weight.mx_format)
    scale = SCHEMES[scheme][1]
    return Linear(
        weight,
        bias=jax.random.normal(k2, (n,)) * 0.1 if bias else None,
        input_scale=None if scale is None else jnp.float32(scale),
        quant=quant,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_a_prepared_linear_computes_what_the_oracle_computes(key, backend, scheme):
    """T = 1 (a decode step) and 40 rows (not a row tile's multiple) on the kernel, 200 rows (a prefill: the
    weight dequantized once, the oracle's GEMM, so bit for bit), a bias, bfloat16 inputs; padding rows
    (``valid`` False) zeroed before a dynamic scale."""
    n, k = 48, SCHEMES[scheme][0]
    oracle = _linear(key, scheme, n, k, bias=True)
    prepared = _linear(key, scheme, n, k, bias=True).prepare_for_kernels(backend)
    assert prepared.kernel_backend == backend and prepared.out_features == n
    assert prepared.weight.get_value().layout != "checkpoint"
    np.testing.assert_array_equal(prepared.dequantized_weight(), oracle.dequantized_weight())
    for t in (1, 40, 200):
        x = (jax.random.normal(jax.random.fold_in(key, t), (t, k)) * 2).astype(jnp.bfloat16)
        valid = jnp.arange(t) < max(1, t - 2)
        want = np.asarray(oracle(x, valid), np.float32)
        got = np.asarray(jax.jit(lambda x, valid: prepared(x, valid))(x, valid), np.float32)
        if t > 128:
            np.testing.assert_array_equal(got, want)
            continue
        # bfloat16 outputs: float32 sums in another order round to the same or a neighbouring bf16 value
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * float(np.abs(want).max()))
        assert np.sqrt(np.mean((got - want) ** 2)) <= 4e-3 * np.sqrt(np.mean(want**2)), (t, scheme)


def test_prepare_is_undone_exactly_and_skips_what_it_cannot_run(key):
    linear = _linear(key, "w_mxfp4", 48, 96, bias=False)
    before = linear.weight.get_value()
    if BACKENDS:
        linear.prepare_for_kernels(BACKENDS[0])
        assert linear.kernel_backend == BACKENDS[0]
    linear.restore_checkpoint_layout()
    after = linear.weight.get_value()
    assert linear.kernel_backend is None and after.layout == "checkpoint"
    np.testing.assert_array_equal(after.values, before.values)
    np.testing.assert_array_equal(after.scales, before.scales)
    float_linear = Linear(jax.random.normal(key, (8, 32)))  # float and 8-bit weights: XLA's dots read them
    assert float_linear.prepare_for_kernels("pallas").kernel_backend is None
    assert _linear(key, "w_mxfp4", 48, 96, False).prepare_for_kernels("emulation").kernel_backend is None
    fp6 = _linear(key, "w_mxfp6_e3m2_a_fp8", 48, 96, False)  # K % 64 != 0: no FP6 kernel takes it
    assert fp6.prepare_for_kernels("pallas").kernel_backend is None and fp6.weight.get_value().layout == "checkpoint"


@pytest.mark.skipif("pallas" not in BACKENDS, reason="the Pallas backend is unavailable")
def test_a_whole_model_s_projections_are_prepared_except_the_absorbed_one(tmp_path):
    """DeepSeek-V3 exported with every linear layer in MXFP4: the attention projections are laid out for the
    kernels, but ``kv_b_proj`` (read dequantized by the absorbed attention) keeps Quark's layout, and so does
    the tiny model's ``kv_a_proj_with_mqa`` (N = 40: no Pallas tile divides it, found when preparing, not at the
    first call); the logits stay the oracle model's to float32 summation order."""
    import pathlib

    from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
    from quarkmoe_jax.models import from_pretrained

    golden = pathlib.Path(__file__).resolve().parents[1] / "golden" / "data" / "hf_models" / "deepseek_v3"
    path = export_quark_checkpoint(golden, tmp_path / "q", "w_mxfp4", quantize_linears=True)
    oracle = from_pretrained(path, backend="emulation", dtype=jnp.float32)
    prepared = from_pretrained(path, backend="emulation", dtype=jnp.float32).prepare_linears_for_kernels("pallas")
    for layer in prepared.layers:
        attn = layer.self_attn
        linears = {name: v for name, v in vars(attn).items() if isinstance(v, Linear)}
        kept = {"kv_b_proj", "kv_a_proj_with_mqa"}
        assert linears["kv_a_proj_with_mqa"].out_features == 40 and len(linears) > len(kept)
        assert {name: v.kernel_backend for name, v in linears.items()} == {
            name: None if name in kept else "pallas" for name in linears
        }
    ids = np.array([[3, 17, 42, 5]])
    want, got = np.asarray(oracle(ids)), np.asarray(prepared(ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(np.abs(want).max()))
