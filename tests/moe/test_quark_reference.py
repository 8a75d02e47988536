"""The MoE block against amd-quark itself: checkpoints exported by Quark and its fake-quant forward output.

The data come from ``tests/golden/generate_quark_moe_golden.py`` (amd-quark 0.13, transformers 5, torch CPU):
a seeded one-layer ``transformers`` Mixtral (hidden 64, intermediate 64, 4 experts, top-2, float32) whose expert
linears Quark quantized; ``reference.npz`` holds the layer-0 MoE block input ``x``, Quark's fake-quant output
``y`` and the router logits. No torch here.

Quark's INT8 dynamic ``per_channel`` inputs: with ``ch_axis=1`` (its per-token convention for 3-D ``[B, S, H]``
activations) Quark's fake-quant of the 2-D ``[tokens, H]`` expert inputs scales per hidden channel over each
expert's tokens; ``semantics="quark"`` reproduces that, ``"vllm"`` quantizes per token. The ``_chaxis0`` folder
is the same model with ``ch_axis=0`` (per token in Quark too).
"""

import json
import pathlib
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.moe.routing import router_logits
from quarkmoe_jax.nn import QuarkMoEBlock

DATA = pathlib.Path(__file__).parent.parent / "golden" / "data"
FOLDERS = sorted(p for p in DATA.glob("quark_moe_*") if (p / "reference.npz").exists())
#: relative RMS error allowed against Quark's fake-quant output. MX and FP8 agree to float32 noise; Quark's
#: INT8 scale amax/127.5 puts each row (or column) maximum on a rounding tie, which summation-order noise flips.
TOL = {"int8": 5e-3, "default": 1e-5}


def _rel_rms(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


def _load(folder, semantics):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QuarkMoEBlock.from_checkpoint(folder, 0, semantics=semantics)


def test_reference_data_present():
    assert FOLDERS, f"no quark_moe_* reference folders under {DATA}"


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_quark_exported_checkpoint_loads(folder):
    meta = json.loads((folder / "versions.json").read_text())
    for semantics in ("quark", "vllm"):
        block = _load(folder, semantics)
        assert block.experts.shape.num_experts == 4
        assert block.experts.shape.hidden_size == 64
        assert block.experts.quant_config.semantics == semantics
    # the experts are stored quantized (not float) in what Quark wrote
    expert_dtypes = {d for name, (d, _) in meta["tensors"].items() if ".experts." in name and name.endswith(".weight")}
    assert expert_dtypes and not expert_dtypes & {"float32", "bfloat16", "float16"}


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_router_logits_match_quark(folder):
    ref = np.load(folder / "reference.npz")
    block = _load(folder, "quark")
    logits = router_logits(jnp.asarray(ref["x"]), block.router_weight.get_value())
    np.testing.assert_allclose(np.asarray(logits), ref["router_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_block_matches_quark_fake_quant(folder):
    ref = np.load(folder / "reference.npz")
    block = _load(folder, "quark")
    y = np.asarray(block(jnp.asarray(ref["x"], jnp.float32)))
    assert y.dtype == np.float32 and y.shape == ref["y"].shape
    err = _rel_rms(y, ref["y"])
    # the quantization itself moves the output much more than the tolerance, so the check has teeth
    quant_effect = _rel_rms(ref["y"], ref["y_float"])
    print(f"{folder.name}: rel RMS vs Quark {err:.3g} (quantization effect {quant_effect:.3g})")
    tol = TOL["int8"] if "int8" in folder.name else TOL["default"]
    assert err < tol, f"{folder.name}: rel RMS error {err:.4g} vs Quark's fake-quant output (tol {tol})"
