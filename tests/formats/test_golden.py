"""quantize / quant_dequant against golden vectors produced by amd-quark 0.13 itself.

The vectors come from tests/golden/generate_quark_golden.py (Quark's observer, ``scaled_real_quantize``,
``Pack_fp4``/``Pack_fp6``, ``to_e8m0_uint8`` and its fake-quant module) and are committed as .npz.
"""

import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import quarkmoe_jax as qm
from quarkmoe_jax.formats import E8M0_NAN, MX_BLOCK_SIZE

DATA = pathlib.Path(__file__).parents[1] / "golden" / "data"
QUARK_TO_OURS = {"fp4": "mxfp4", "fp6_e3m2": "mxfp6_e3m2", "fp6_e2m3": "mxfp6_e2m3", "fp8_e4m3": "mxfp8_e4m3"}
DTYPES = {
    "float32": (np.float32, np.uint32),
    "bfloat16": (ml_dtypes.bfloat16, np.uint16),
    "float16": (np.float16, np.uint16),
}
CASES = [(q, m, d) for q in QUARK_TO_OURS for m in ("even", "floor", "ceil") for d in DTYPES]


_quantize = jax.jit(qm.quantize, static_argnums=(1, 2))
_quant_dequant = jax.jit(qm.quant_dequant, static_argnums=(1, 2))


def load(quark_dtype, mode, dtype_name, suffix=""):
    d = np.load(DATA / f"quark_mx_{quark_dtype}_{mode}_{dtype_name}{suffix}.npz")
    float_dtype, bits_dtype = DTYPES[dtype_name]
    x = d["x_bits"].view(float_dtype)
    return x, d["packed"], d["scales"], d["qdq_bits"].view(bits_dtype), d["case"]


def run(x, fmt, mode):
    t = _quantize(jnp.asarray(x), fmt, mode)
    qdq = np.asarray(_quant_dequant(jnp.asarray(x), fmt, mode))
    return np.asarray(t.packed), np.asarray(t.scales), qdq.view(np.uint32 if qdq.dtype == np.float32 else np.uint16)


def packed_per_block(packed, fmt):
    per_block = qm.MX_FORMATS[fmt].packed_length(MX_BLOCK_SIZE)
    return packed.reshape(*packed.shape[:-1], -1, per_block)


@pytest.mark.parametrize("quark_dtype,mode,dtype_name", CASES)
def test_finite_rows_bit_exact(quark_dtype, mode, dtype_name):
    x, packed, scales, qdq_bits, case = load(quark_dtype, mode, dtype_name)
    finite = np.isfinite(x.astype(np.float32)).all(axis=-1)
    assert finite.sum() > 100
    fmt = QUARK_TO_OURS[quark_dtype]
    got_packed, got_scales, got_qdq = run(x[finite], fmt, mode)
    for name, got, want in [("packed", got_packed, packed), ("scales", got_scales, scales), ("qdq", got_qdq, qdq_bits)]:
        bad = (got != want[finite]).reshape(finite.sum(), -1).any(axis=-1)
        assert not bad.any(), f"{name} differs from Quark on cases {sorted(set(case[finite][bad]))}"


@pytest.mark.parametrize("quark_dtype,mode,dtype_name", CASES)
def test_nonfinite_rows(quark_dtype, mode, dtype_name):
    """Blocks without NaN/Inf stay bit-exact; Inf in "even" mode is bit-exact; NaN blocks become E8M0 NaN."""
    x, packed, scales, qdq_bits, case = load(quark_dtype, mode, dtype_name, "_nonfinite")
    x = np.concatenate([x, load(quark_dtype, mode, dtype_name)[0][-3:]])  # plus rows that are finite
    fmt = QUARK_TO_OURS[quark_dtype]
    got_packed, got_scales, got_qdq = run(x, fmt, mode)
    got_packed, got_scales, got_qdq = got_packed[:3], got_scales[:3], got_qdq[:3]
    blocks = x[:3].astype(np.float32).reshape(3, -1, MX_BLOCK_SIZE)
    has_nan = np.isnan(blocks).any(-1)
    has_inf = np.isinf(blocks).any(-1)
    nonfinite_scale = has_nan | (has_inf if mode != "even" else False)
    quark_like = ~nonfinite_scale
    np.testing.assert_array_equal(got_scales[quark_like], scales[quark_like])
    np.testing.assert_array_equal(
        packed_per_block(got_packed, fmt)[quark_like], packed_per_block(packed, fmt)[quark_like]
    )
    assert (got_scales[nonfinite_scale] == E8M0_NAN).all()
    qdq = got_qdq.view(x.dtype).astype(np.float32).reshape(3, -1, MX_BLOCK_SIZE)
    want = qdq_bits.view(x.dtype).astype(np.float32).reshape(3, -1, MX_BLOCK_SIZE)
    np.testing.assert_array_equal(qdq, want)  # NaN == NaN here: Quark's fake-quant is NaN on those blocks too
    assert np.isnan(qdq[nonfinite_scale]).all()
    # The NaN blocks also dequantize to NaN from the stored bytes.
    deq = np.asarray(qm.dequantize(got_packed, got_scales, fmt, jnp.float32)).reshape(3, -1, MX_BLOCK_SIZE)
    assert np.isnan(deq[nonfinite_scale]).all()


def test_golden_files_cover_the_required_cases():
    _, _, _, _, case = load("fp4", "even", "float32")
    labels = set(case.tolist())
    for needed in ["ties_scale2^0", "amax_7", "all_zero", "subnormal_f32", "huge", "gauss_1"]:
        assert needed in labels
