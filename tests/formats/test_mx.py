"""MX block quantization: layouts, round trips, error statistics, errors, and MXTensor as a pytree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quarkmoe_jax as qm
from quarkmoe_jax.formats import elements as el
from quarkmoe_jax.formats import mx

FORMATS = list(qm.MX_FORMATS)


# ------------------------------------------------------------------------------------------- layouts


def test_fp4_low_nibble_is_even_index():
    codes = np.array([[0x1, 0x2, 0xF, 0x0]], np.uint8)
    assert np.asarray(mx.pack_codes(codes, "mxfp4")).tolist() == [[0x21, 0x0F]]


def test_fp6_is_a_little_endian_24_bit_word():
    v = np.array([[0b000001, 0b100010, 0b000011, 0b111100]], np.uint8)
    word = int(v[0, 0]) | int(v[0, 1]) << 6 | int(v[0, 2]) << 12 | int(v[0, 3]) << 18
    packed = np.asarray(mx.pack_codes(v, "mxfp6_e3m2"))
    assert packed.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]
    # byte0 = v0 | v1[1:0] << 6; byte1 = v1[5:2] | v2[3:0] << 4; byte2 = v2[5:4] | v3 << 2
    assert packed[0, 0] == (v[0, 0] | (v[0, 1] & 3) << 6)
    assert packed[0, 1] == ((v[0, 1] >> 2) | (v[0, 2] & 0xF) << 4)
    assert packed[0, 2] == ((v[0, 2] >> 4) | v[0, 3] << 2)


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    rows=st.integers(1, 3),
    groups=st.integers(1, 4),
    data=st.data(),
)
def test_unpack_pack_identity(fmt, rows, groups, data):
    bits = qm.MX_FORMATS[fmt].bits
    codes = data.draw(hnp.arrays(np.uint8, (rows, 4 * groups), elements=st.integers(0, (1 << bits) - 1)))
    packed = mx.pack_codes(codes, fmt)
    assert packed.shape == (rows, qm.MX_FORMATS[fmt].packed_length(4 * groups))
    np.testing.assert_array_equal(np.asarray(mx.unpack_codes(packed, fmt)), codes)
    raw = data.draw(hnp.arrays(np.uint8, (rows, qm.MX_FORMATS[fmt].packed_length(4 * groups))))
    np.testing.assert_array_equal(np.asarray(mx.pack_codes(mx.unpack_codes(raw, fmt), fmt)), raw)


# ------------------------------------------------------------------------------------------ numerics


def representable_blocks(fmt, key, rows=8, k=128):
    """Values exactly on the MX grid: element grid values times one power of two per block."""
    element = qm.MX_FORMATS[fmt].element
    grid = el.decode_table(element)
    grid = grid[np.isfinite(grid)]  # e4m3fn (MXFP8) has NaN codes
    k1, k2 = jax.random.split(key)
    picks = np.asarray(jax.random.randint(k1, (rows, k), 0, grid.size))
    exps = np.asarray(jax.random.randint(k2, (rows, k // 32), -20, 20))
    values = grid[picks] * np.repeat(np.exp2(exps.astype(np.float64)), 32, axis=-1)
    values[:, ::32] = element.max_value * np.exp2(exps)  # fix each block's amax so the scale is exactly 2^exp
    return values.astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", mx.SCALE_MODES)
def test_quant_dequant_is_identity_on_representable_values(fmt, mode, key):
    x = representable_blocks(fmt, key)
    y = np.asarray(qm.quant_dequant(x, fmt, mode))
    if mode == "even":
        np.testing.assert_array_equal(y, np.where(x == 0, 0, x))
    # idempotence holds in every mode: a second QDQ changes nothing
    np.testing.assert_array_equal(np.asarray(qm.quant_dequant(y, fmt, mode)), y)
    t = qm.quantize(y, fmt, mode)
    t2 = qm.quantize(t.dequantize(jnp.float32), fmt, mode)
    np.testing.assert_array_equal(np.asarray(t2.packed), np.asarray(t.packed))
    np.testing.assert_array_equal(np.asarray(t2.scales), np.asarray(t.scales))


@pytest.mark.parametrize("fmt,expected", [("mxfp4", 0.115), ("mxfp6_e3m2", 0.054), ("mxfp6_e2m3", 0.028)])
@pytest.mark.parametrize("mode", ["even", "floor"])
def test_gaussian_relative_rms_error(fmt, expected, mode, key):
    x = jax.random.normal(key, (1024, 1024), jnp.float32)
    y = qm.quant_dequant(x, fmt, mode)
    rel = float(jnp.sqrt(jnp.mean((y - x) ** 2) / jnp.mean(x**2)))
    assert abs(rel - expected) <= 0.03 * expected, rel


def test_even_scale_rounds_amax_up_7_becomes_8():
    # Quark's "even" rule: amax 7.0 rounds to 8 at one mantissa bit, so the scale is 2 and 7.0 -> 8.0.
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = 7.0, -6.9
    y = np.asarray(qm.quant_dequant(x, "mxfp4"))
    assert y[0, 0] == 8.0 and y[0, 1] == -6.0  # -6.9 / 2 = -3.45 -> -3
    x[0, 0] = 6.9  # amax 6.9 keeps scale 1: -6.9 saturates to -6
    y = np.asarray(qm.quant_dequant(x, "mxfp4"))
    assert y[0, 0] == 6.0 and y[0, 1] == -6.0
    assert np.asarray(qm.quant_dequant(x, "mxfp4", "floor"))[0, 0] == 6.0


def test_all_zero_block_and_extreme_scales():
    x = np.zeros((3, 64), np.float32)
    x[1, :32] = 2.0**100
    x[2, 32:] = 1.5 * 2.0**-126  # even-rounded amax 2^-126 -> scale exponent -128, clamped to -127
    t = qm.quantize(x, "mxfp4")
    scales = np.asarray(t.scales)
    assert scales[0].tolist() == [1, 1]  # Quark writes code 1 (2^-126) for a zero block, never 0
    assert scales[1, 0] == 127 + 98  # 2^100 = 4 * 2^98
    np.testing.assert_array_equal(np.asarray(t.dequantize(jnp.float32))[:2], x[:2])
    # A tiny block is quantized with 2^-127 (elements 3.0, exact) but stored with Quark's minimum code 1
    # (2^-126): fake-quant returns x, the stored bytes decode to twice x. Both are what Quark does.
    assert scales[2, 1] == 1
    assert np.asarray(qm.quant_dequant(x, "mxfp4"))[2, 32] == 1.5 * 2.0**-126
    assert np.asarray(t.dequantize(jnp.float32))[2, 32] == 3.0 * 2.0**-126


def test_bfloat16_and_float16_inputs_keep_their_dtype(key):
    x = jax.random.normal(key, (4, 64), jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        y = qm.quant_dequant(x.astype(dtype), "mxfp6_e2m3")
        assert y.dtype == dtype
        ref = qm.quant_dequant(x.astype(dtype).astype(jnp.float32), "mxfp6_e2m3", "even")
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref.astype(dtype), np.float32))


def test_dequantize_matches_mxtensor_and_e8m0_nan_code(key):
    x = jax.random.normal(key, (2, 3, 64), jnp.float32)
    t = qm.quantize(x, "mxfp4")
    np.testing.assert_array_equal(
        np.asarray(qm.dequantize(t.packed, t.scales, "fp4", jnp.bfloat16), np.float32),
        np.asarray(t.dequantize(jnp.bfloat16), np.float32),
    )
    scales = np.asarray(t.scales).copy()
    scales[0, 0, 1] = 255
    out = np.asarray(qm.dequantize(t.packed, scales, "mxfp4", jnp.float32))
    assert np.isnan(out[0, 0, 32:]).all() and np.isfinite(out[0, 0, :32]).all()


# -------------------------------------------------------------------------------------------- errors


def test_length_not_multiple_of_32_names_the_length():
    with pytest.raises(ValueError, match="multiple of 32, got length 48"):
        qm.quantize(np.ones((2, 48), np.float32), "mxfp4")
    with pytest.raises(ValueError, match="length 48"):
        qm.quant_dequant(np.ones((48,), np.float32), "mxfp6_e2m3")


def test_unknown_format_and_scale_mode():
    with pytest.raises(ValueError, match="unknown MX format 'mxfp5'.*mxfp4"):
        qm.quantize(np.ones((32,), np.float32), "mxfp5")
    with pytest.raises(ValueError, match="unknown scale_mode 'round'.*even"):
        qm.quantize(np.ones((32,), np.float32), "mxfp4", "round")
    with pytest.raises(TypeError, match="int32"):
        qm.quantize(np.ones((32,), np.int32), "mxfp4")


def test_from_arrays_checks_dtypes_and_shapes():
    packed = np.zeros((4, 32), np.uint8)  # 64 fp4 elements -> 2 scales per row
    with pytest.raises(ValueError, match=r"w13: scales shape \(4, 3\).*expected \(4, 2\)"):
        qm.MXTensor.from_arrays(packed, np.zeros((4, 3), np.uint8), "mxfp4", name="w13")
    with pytest.raises(TypeError, match="w2: E8M0 scales must be uint8, found float32"):
        qm.MXTensor.from_arrays(packed, np.zeros((4, 2), np.float32), "mxfp4", name="w2")
    with pytest.raises(TypeError, match="must be uint8, found int8"):
        qm.MXTensor.from_arrays(packed.astype(np.int8), np.zeros((4, 2), np.uint8), "mxfp4")
    with pytest.raises(ValueError, match="multiple of 32"):
        qm.MXTensor.from_arrays(np.zeros((4, 12), np.uint8), np.zeros((4, 1), np.uint8), "mxfp6_e3m2")


# ------------------------------------------------------------------------------------- MXTensor pytree


def test_mxtensor_is_a_pytree_with_static_format(key):
    t = qm.quantize(jax.random.normal(key, (3, 8, 64)), "mxfp6_e3m2")
    leaves, treedef = jax.tree_util.tree_flatten(t)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8]
    assert jax.tree_util.tree_unflatten(treedef, leaves).fmt is qm.MX_FORMATS["mxfp6_e3m2"]
    assert t.shape == (3, 8, 64) and t.packed.shape == (3, 8, 48) and t.scales.shape == (3, 8, 2)
    assert t[1].shape == (8, 64) and t[1:, 2].shape == (2, 64)
    with pytest.raises(IndexError):
        t[0, 0, 0]
    out = jax.jit(lambda m: m.dequantize(jnp.float32).sum(-1))(t)
    np.testing.assert_allclose(np.asarray(out), np.asarray(t.dequantize(jnp.float32).sum(-1)), rtol=1e-6)
    with pytest.raises(dataclasses_frozen_error()):
        t.fmt = None


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_mxtensor_as_flax_nnx_param_under_jit(key):
    class Experts(nnx.Module):
        def __init__(self, w):
            self.w = nnx.Param(qm.quantize(w, "mxfp4"))

        def __call__(self, x):
            return x @ self.w.get_value().dequantize(jnp.float32).T

    w = jax.random.normal(key, (16, 64))
    model = Experts(w)
    x = jnp.ones((2, 64))
    y = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ qm.quant_dequant(w, "mxfp4").T), rtol=1e-5)
    graphdef, state = nnx.split(model)
    restored = nnx.merge(graphdef, state)
    assert isinstance(restored.w.get_value(), qm.MXTensor)
    assert jax.tree_util.tree_leaves(state)[0].dtype == jnp.uint8


def test_quantize_is_jittable_and_vmappable(key):
    x = jax.random.normal(key, (4, 2, 64))
    eager = qm.quantize(x, "mxfp4")
    jitted = jax.jit(qm.quantize, static_argnums=(1, 2))(x, "mxfp4", "even")
    mapped = jax.vmap(lambda r: qm.quantize(r, "mxfp4"))(x)
    for other in (jitted, mapped):
        np.testing.assert_array_equal(np.asarray(other.packed), np.asarray(eager.packed))
        np.testing.assert_array_equal(np.asarray(other.scales), np.asarray(eager.scales))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_fast_rescale_path_is_bit_identical_to_the_exact_path(fmt, dtype, key, monkeypatch):
    x = jax.random.normal(key, (64, 256), jnp.float32) * jnp.exp2(jax.random.randint(key, (64, 1), -100, 100))
    t = qm.quantize(x, fmt)
    assert int(jnp.abs(t.scales.astype(jnp.int32) - 127).max()) > 60  # a wide spread of in-range scales
    fast_deq, fast_qdq = t.dequantize(dtype), qm.quant_dequant(x.astype(dtype), fmt)
    monkeypatch.setattr(mx, "_fast_exponent_range", lambda fmt: (0, -1))  # no exponent is in range: exact path only
    exact_deq, exact_qdq = t.dequantize(dtype), qm.quant_dequant(x.astype(dtype), fmt)
    for fast, exact in ((fast_deq, exact_deq), (fast_qdq, exact_qdq)):
        bits = np.uint32 if dtype == jnp.float32 else np.uint16
        np.testing.assert_array_equal(np.asarray(fast).view(bits), np.asarray(exact).view(bits))
