"""Element codecs against ml_dtypes and the OCP / Quark rules."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from quarkmoe_jax.formats import elements as el

ML_DTYPES = {
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e4m3fn": ml_dtypes.float8_e4m3fn,
}
FORMATS = [el.E2M1, el.E3M2, el.E2M3, el.E4M3FN]


def all_codes(fmt):
    return np.arange(1 << fmt.nbits, dtype=np.uint8)


def ml_values(fmt, codes):
    """ml_dtypes' value of each code (sub-byte floats are stored one per byte, code in the low bits)."""
    return codes.view(ML_DTYPES[fmt.name]).astype(np.float64)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_decode_every_code_matches_ml_dtypes(fmt, dtype):
    codes = all_codes(fmt)
    expected = ml_values(fmt, codes).astype(np.float32)
    got = np.asarray(jax.jit(el.decode, static_argnums=(1, 2))(codes, fmt, dtype)).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(got[finite], expected[finite].astype(dtype).astype(np.float32))
    # signed zeros decode with their sign
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(expected[finite]))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_decode_table_and_format_constants(fmt):
    table = el.decode_table(fmt)
    assert table[fmt.max_code] == fmt.max_value
    assert fmt.max_value == {"e2m1": 6.0, "e3m2": 28.0, "e2m3": 7.5, "e4m3fn": 448.0}[fmt.name]
    assert fmt.emax == {"e2m1": 2, "e3m2": 4, "e2m3": 2, "e4m3fn": 8}[fmt.name]
    assert fmt.max_value == float(ml_dtypes.finfo(ML_DTYPES[fmt.name]).max)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_encode_round_trips_every_finite_code(fmt):
    codes = all_codes(fmt)
    values = el.decode_table(fmt).astype(np.float32)
    finite = ~np.isnan(values)
    got = np.asarray(el.encode(values[finite], fmt))
    expected = codes[finite].copy()
    if fmt.nan_code is None:  # Quark writes -0 as +0 for the MX elements
        expected[values[finite] == 0] = 0
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_encode_matches_ml_dtypes_rne_on_random_and_midpoints(fmt, key):
    grid = np.unique(np.abs(el.decode_table(fmt)[~np.isnan(el.decode_table(fmt))]))
    mids = (grid[1:] + grid[:-1]) / 2
    near = np.concatenate([mids, np.nextafter(mids.astype(np.float32), 0), np.nextafter(mids.astype(np.float32), 1e9)])
    rand = np.asarray(jax.random.uniform(key, (4096,), minval=-1.2, maxval=1.2)) * fmt.max_value
    x = np.concatenate([near, -near, rand, grid, -grid]).astype(np.float32)
    got = np.asarray(el.encode(x, fmt))
    clipped = np.clip(x, -fmt.max_value, fmt.max_value)
    expected = clipped.astype(ML_DTYPES[fmt.name]).view(np.uint8) & ((1 << fmt.nbits) - 1)
    if fmt.nan_code is None:
        expected = np.where((expected & ((1 << (fmt.nbits - 1)) - 1)) == 0, 0, expected)
    np.testing.assert_array_equal(got, expected)


def test_e2m1_tie_table_and_saturation():
    # value -> expected decoded value (RNE ties to even mantissa, saturation at 6, sign of zero dropped)
    table = {
        0.25: 0.0,
        0.75: 1.0,
        1.25: 1.0,
        1.75: 2.0,
        2.5: 2.0,
        3.5: 4.0,
        5.0: 4.0,
        0.2499: 0.0,
        0.2501: 0.5,
        6.9: 6.0,
        7.0: 6.0,
        100.0: 6.0,
        1e30: 6.0,
        -5.0: -4.0,
        -7.0: -6.0,
        -0.1: 0.0,
        -0.0: 0.0,
    }
    x = np.array(list(table), np.float32)
    codes = el.encode(x, el.E2M1)
    decoded = np.asarray(el.decode(codes, el.E2M1))
    np.testing.assert_array_equal(decoded, np.array(list(table.values()), np.float32))
    assert not np.signbit(decoded[x <= 0][np.array(list(table.values()))[x <= 0] == 0]).any()


def test_e4m3fn_saturates_keeps_signed_zero_and_nan():
    x = np.array([500.0, -1e6, np.inf, -np.inf, -0.0, np.nan, 464.0, 463.9], np.float32)
    codes = np.asarray(el.encode(np.clip(x, -448, 448), el.E4M3FN))
    assert codes.tolist()[:5] == [0x7E, 0xFE, 0x7E, 0xFE, 0x80]
    assert codes[5] & 0x7F == 0x7F
    assert np.asarray(el.encode(np.float32([np.inf]), el.E4M3FN))[0] == 0x7E


def test_nonfinite_mx_element_codes_follow_quark_packers():
    x = np.array([np.inf, -np.inf, np.nan], np.float32)
    assert np.asarray(el.encode(x, el.E2M1)).tolist() == [0b0110, 0b1110, 0b0111]
    assert np.asarray(el.encode(x, el.E3M2)).tolist() == [0b011100, 0b111100, 0b011110]
    assert np.asarray(el.encode(x, el.E2M3)).tolist() == [0b011000, 0b111000, 0b011100]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_e8m0_decode_every_code(dtype):
    codes = np.arange(256, dtype=np.uint8)
    got = np.asarray(jax.jit(el.e8m0_decode, static_argnums=1)(codes, dtype)).astype(np.float64)
    with np.errstate(over="ignore"):
        expected = np.exp2(codes[:255].astype(np.float64) - 127).astype(np.float32).astype(dtype).astype(np.float64)
    np.testing.assert_array_equal(got[:255], expected)
    assert np.isnan(got[255])
    assert np.asarray(el.e8m0_is_nan(codes)).sum() == 1


def test_e8m0_code_zero_is_an_exact_subnormal_not_flushed():
    assert float(el.e8m0_decode(np.uint8([0]), jnp.float32)[0]) == 2.0**-127
    assert float(el.e8m0_decode(np.uint8([0]), jnp.bfloat16)[0]) == 2.0**-127


def test_e8m0_decode_rejects_non_uint8():
    with pytest.raises(TypeError, match="uint8"):
        el.e8m0_decode(np.array([127], np.int32))


def test_e8m0_encode_follows_quark_to_e8m0_uint8():
    scales = np.array([1.0, 2.0**-126, 2.0**-127, 2.0**-140, 2.0**127, 0.5, 2.0**-23, 1.4142, 1.4143, 3.0], np.float32)
    # Quark clamps log2 at -126: code 1 is the smallest it ever writes.
    assert np.asarray(el.e8m0_encode(scales)).tolist() == [127, 1, 1, 1, 254, 126, 104, 127, 128, 129]
    bad = np.array([0.0, -1.0, np.nan, np.inf], np.float32)
    assert (np.asarray(el.e8m0_encode(bad)) == el.E8M0_NAN).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_round_float32_to_is_correctly_rounded_including_subnormals(dtype, key):
    k1, k2 = jax.random.split(key)
    mant = np.asarray(jax.random.uniform(k1, (20000,), minval=1, maxval=2))
    exps = np.asarray(jax.random.randint(k2, (20000,), -149, 128))
    x = (mant * np.exp2(exps.astype(np.float64))).astype(np.float32)
    x = np.concatenate([x, -x, np.float32([0.0, -0.0, np.inf, -np.inf, 65520.0, 65519.0, 2.0**-25, 3 * 2.0**-26])])
    got = np.asarray(el.round_float32_to(x, dtype))
    with np.errstate(over="ignore"):
        expected = x.astype(np.dtype(dtype))
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_fp6_decode_runs_under_jit_on_cpu():
    # astype(float6_*) crashes XLA:CPU inside jit; our table/integer decode must not.
    codes = jnp.arange(64, dtype=jnp.uint8)
    out = jax.jit(lambda c: el.decode(c, el.E3M2) + el.decode(c, el.E2M3))(codes)
    assert out.shape == (64,) and np.isfinite(np.asarray(out)).all()


def test_unknown_element_format_names_the_choices():
    with pytest.raises(ValueError, match="unknown element format 'fp5'.*e2m1"):
        el.element_format("fp5")
    with pytest.raises(ValueError, match="float64"):
        el.target_format(jnp.float64)
