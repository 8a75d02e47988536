"""The v2 kernels' fragment layout (MXFP4 and both MXFP6): exact both ways, and the kernel's decode
(rotate-and-mask words, FP6's low-plane bits, bf16x2 scale multiply), modelled in numpy, gives the
checkpoint's values; every backend accepts it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quarkmoe_jax as qm
from quarkmoe_jax.formats.fragment_layout import (
    FRAGMENT_FORMATS,
    LOW_SOURCE_BITS,
    SOURCE_BITS,
    decode_fragment_words,
    exact_scales,
    fast_scale_max,
    fragment_qarray,
    padded_shape,
    to_fragment_layout,
)
from quarkmoe_jax.formats.kernel_layout import to_kernel_layout


def random_mx(key, shape, scale_low=100, scale_high=140, fmt="mxfp4"):
    """Uniform random packed bytes (every code, every neighbour) and scale codes in [low, high)."""
    fmt = qm.MX_FORMATS[fmt]
    k1, k2 = jax.random.split(key)
    e, n, k = shape
    packed = jax.random.randint(k1, (e, n, k * fmt.bits // 8), 0, 256).astype(jnp.uint8)
    scales = jax.random.randint(k2, (e, n, k // 32), scale_low, scale_high).astype(jnp.uint8)
    return qm.MXTensor(packed, scales, fmt)


@pytest.mark.parametrize("fmt", FRAGMENT_FORMATS)
@pytest.mark.parametrize("shape", [(2, 64, 128), (3, 128, 2880 // 9), (1, 80, 96), (2, 16 * 9, 640)])
def test_round_trip_and_decode_are_exact(key, shape, fmt):
    """Quark bytes -> fragment layout -> Quark bytes, bit for bit (K and N padding included: gpt-oss-like
    K = 320, N not a multiple of 128); the numpy model of the kernel's decode equals ``dequantize``; the
    layout holds the packed bytes plus the padding (6 bits per FP6 element)."""
    weights = random_mx(key, shape, fmt=fmt)
    fragment = to_fragment_layout(weights)
    assert fragment.layout == "fragment" and fragment.shape == shape
    _, n_pad, k_pad = padded_shape(fragment)
    assert n_pad % 128 == 0 and k_pad % 128 == 0 and n_pad - shape[1] < 128 and k_pad - shape[2] < 128
    back = fragment.to_checkpoint_layout()
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(weights.packed))
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(weights.scales))
    np.testing.assert_array_equal(decode_fragment_words(fragment), np.asarray(weights.dequantize(jnp.float32)))
    bits = qm.MX_FORMATS[fmt].bits
    assert fragment.nbytes == shape[0] * (n_pad * k_pad * bits // 8 + n_pad * k_pad // 32)
    assert fragment.qtype.element == fmt and (fragment.extra is None) == (fmt == "mxfp4")


@pytest.mark.parametrize("fmt", FRAGMENT_FORMATS)
def test_every_scale_code_decodes_and_the_fast_path_flag(fmt):
    """Every element code next to every scale code 0..254 (the kernels' two-multiply path beyond
    fast_scale_max), subnormal results included (numpy model: float64); code 255 decodes as NaN. Small
    scales keep the one-multiply path."""
    fmt_ = qm.MX_FORMATS[fmt]
    codes = np.arange(255, dtype=np.uint8)
    scales = np.resize(codes, (1, 64, 4 * 64))  # [1, 64, K/32] with K = 8192
    element_codes = np.resize(np.arange(1 << fmt_.bits, dtype=np.uint8), (1, 64, 8192))
    packed = np.asarray(qm.formats.mx.pack_codes(element_codes, fmt_))
    weights = qm.MXTensor(jnp.asarray(packed), jnp.asarray(scales), fmt_)
    fragment = to_fragment_layout(weights)
    assert exact_scales(fragment)
    want = np.asarray(weights.dequantize(jnp.float32), np.float64)
    with np.errstate(over="ignore"):  # 6 * 2^127 overflows float32, as it does bf16 in the kernels
        got = decode_fragment_words(fragment).astype(np.float32)
    normal = (np.abs(want) >= 2.0**-126) | (want == 0)  # XLA:CPU flushes subnormal float32 in dequantize
    np.testing.assert_array_equal(got[normal], want[normal])
    nan = weights.scales.at[0, 0, 0].set(255)
    got_nan = decode_fragment_words(to_fragment_layout(qm.MXTensor(weights.packed, nan, weights.fmt)))
    assert np.isnan(got_nan[0, 0, :32]).all() and np.isfinite(got_nan[0, 0, 32:]).all()
    small = to_fragment_layout(random_mx(jax.random.key(1), (1, 64, 128), 100, fast_scale_max(fmt) + 1, fmt))
    assert not exact_scales(small)
    assert fast_scale_max(fmt) == (130 if fmt == "mxfp6_e3m2" else 128)


def test_source_bits_are_a_permutation_of_the_word():
    assert sorted(SOURCE_BITS.ravel().tolist()) == list(range(32))
    for table in LOW_SOURCE_BITS.values():
        assert sorted(table.ravel().tolist()) == list(range(16))


def test_layout_under_jit_takes_the_exact_scale_path(key):
    weights = random_mx(key, (2, 64, 128))
    fragment = jax.jit(to_fragment_layout)(weights)
    assert exact_scales(fragment)
    np.testing.assert_array_equal(np.asarray(fragment.to_checkpoint_layout().packed), np.asarray(weights.packed))


@pytest.mark.parametrize("fmt", FRAGMENT_FORMATS)
def test_layouts_convert_into_each_other(key, fmt):
    weights = random_mx(key, (2, 64, 256), fmt=fmt)
    fragment = to_fragment_layout(weights)
    chunked = to_kernel_layout(fragment)
    np.testing.assert_array_equal(np.asarray(chunked.to_checkpoint_layout().packed), np.asarray(weights.packed))
    np.testing.assert_array_equal(np.asarray(fragment[1:].packed), np.asarray(weights.packed[1:]))


def test_the_fragment_layout_refuses_what_it_cannot_hold(key):
    w4 = random_mx(key, (2, 64, 128))
    with pytest.raises(ValueError, match=r"\[E, N, K\]"):
        to_fragment_layout(qm.MXTensor(w4.packed[0], w4.scales[0], w4.fmt))
    with pytest.raises(TypeError, match="QArray"):
        to_fragment_layout(jnp.zeros((2, 64, 128)))
    fragment = to_fragment_layout(random_mx(key, (2, 64, 128), fmt="mxfp6_e3m2"))
    with pytest.raises(ValueError, match="need low_bits"):
        fragment_qarray(fragment.values, fragment.scales, 64, 128, fmt="mxfp6_e3m2")
    with pytest.raises(ValueError, match="one of"):
        fragment_qarray(fragment.values, fragment.scales, 64, 128, fmt="mxfp8_e4m3")


def test_layout_of_weights_captured_by_a_jit_reads_their_scales(key):
    """Concrete weights closed over by a jitted function (as QuarkMoE params are) keep the one-multiply path."""
    weights = random_mx(key, (2, 64, 128), 100, fast_scale_max("mxfp4") + 1)
    flags = []

    @jax.jit
    def f(x):
        fragment = to_fragment_layout(weights)
        flags.append(exact_scales(fragment))
        return x + fragment.values.sum()

    f(jnp.int32(0))
    assert flags == [False]
