"""Whole models on a GPU: the kernel backends, named explicitly, inside every architecture agree with the
emulation oracle. Skipped without a GPU (CI); run on the device and recorded in docs/performance.md:

    JAX_PLATFORMS=cuda XLA_FLAGS=--xla_allow_excess_precision=false python -m pytest tests/models/test_models_gpu.py

(without the flag XLA:GPU skips bfloat16 roundings the oracle writes, as tests/moe/backend_suite.py explains;
with it, on an H200 on 2026-12-03, every case below gave logits bit-identical to the oracle's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
from quarkmoe_jax.models import from_pretrained
from tests.models.test_models import ARCHS, GOLDEN, golden, relative_error, rms_relative_error

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the MoE kernels)")

CASES = [(arch, "w_mxfp4_a_mxfp4", "pallas") for arch in ARCHS] + [
    ("mixtral", "w8a8_int8_channel_dynamic_token", "pallas"),
    ("mixtral", "w_mxfp4", "triton"),
    ("gpt_oss", "w_mxfp4", "triton"),
]


@pytest.mark.parametrize("arch, scheme, backend", CASES)
def test_kernels_match_the_emulation_in_a_whole_model(arch, scheme, backend, tmp_path):
    if backend == "triton":
        pytest.importorskip("jax_triton")
    path = export_quark_checkpoint(GOLDEN / arch, tmp_path / "q", scheme, quantize_linears=True)
    ids = golden(arch)["input_ids"]
    kernels = from_pretrained(path, dtype=jnp.bfloat16, backend=backend)
    oracle = from_pretrained(path, dtype=jnp.bfloat16, backend="emulation")
    got, want = kernels(ids), oracle(ids)
    rms, worst = rms_relative_error(got, want), relative_error(got, want)
    print(f"{arch} {scheme} {backend}: logits max relative error {worst:.2e}, RMS relative {rms:.2e}")
    # bfloat16 activations through two decoder layers; MX-quantized activations (8 magnitudes per element)
    # turn the kernels' last-bit differences into whole-step differences of a few elements
    assert rms <= (5e-2 if "_a_mx" in scheme else 1e-2)
    out = kernels.generate(ids[:, :5], 4, eos_token_id=[])
    assert out.shape == (2, 9) and (out[:, :5] == ids[:, :5]).all()
    assert np.isfinite(np.asarray(kernels(out))).all()
