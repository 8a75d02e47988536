"""QArray: one quantized-array type for every format, granularity and layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import quarkmoe_jax as qm
from quarkmoe_jax.formats import QArray, QType, float_qarray, scaled_qarray
from quarkmoe_jax.formats.fragment_layout import to_fragment_layout
from quarkmoe_jax.formats.kernel_layout import to_kernel_layout


def test_the_static_type_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="unknown QArray element 'int4'"):
        QType("int4", "channel")
    with pytest.raises(ValueError, match=r"mxfp4 takes granularity \('block32',\), got 'channel'"):
        QType("mxfp4", "channel")
    with pytest.raises(ValueError, match="int8 takes granularity"):
        QType("int8", "block32")
    with pytest.raises(ValueError, match="unknown layout 'tiles'"):
        QType("mxfp4", "block32", "tiles")


@pytest.mark.parametrize(
    "granularity, scale_shape",
    [("channel", (3, 8)), ("tensor", (3,)), ("shard", (3, 2))],
)
def test_8bit_scales_apply_by_their_granularity_not_their_shape(key, granularity, scale_shape):
    codes = jax.random.randint(key, (3, 8, 32), -127, 128).astype(jnp.int8)
    scales = jax.random.uniform(key, scale_shape, minval=0.5, maxval=2.0)
    q = scaled_qarray(codes, scales, granularity)
    per_row = {
        "channel": lambda: scales,
        "tensor": lambda: jnp.repeat(scales[:, None], 8, 1),
        "shard": lambda: jnp.repeat(scales, 4, 1),  # two shards of four rows
    }[granularity]()
    np.testing.assert_array_equal(np.asarray(q.row_scales()), np.asarray(per_row))
    want = np.asarray(codes, np.float32) * np.asarray(per_row)[..., None]
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), want)
    one = q[1]  # an expert: its scales come along
    np.testing.assert_array_equal(np.asarray(one.dequantize(jnp.float32)), want[1])
    picked = q[np.array([0, 2])]  # a numpy index array too
    np.testing.assert_array_equal(np.asarray(picked.dequantize(jnp.float32)), want[[0, 2]])
    with pytest.raises(IndexError, match="1 leading axes"):
        q[1, 2]  # a row of an expert: its scale is not a row's alone


def test_scale_shapes_that_do_not_fit_are_refused():
    codes = jnp.zeros((3, 8, 32), jnp.int8)
    with pytest.raises(ValueError, match=r"channel scales of shape \(3, 4\) do not fit weights of shape \(3, 8, 32\)"):
        scaled_qarray(codes, jnp.ones((3, 4)), "channel")
    with pytest.raises(ValueError, match="shard scales"):
        scaled_qarray(codes, jnp.ones((3, 3)), "shard")  # 3 shards do not divide 8 rows
    with pytest.raises(ValueError, match="tensor scales"):
        scaled_qarray(codes, jnp.ones((3, 8)), "tensor")


def test_float_weights_are_qarrays_too(key):
    w = jax.random.normal(key, (2, 16, 32), jnp.bfloat16)
    q = float_qarray(w)
    assert (q.kind, q.qtype.granularity, q.scales) == ("none", "none", None)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), np.asarray(w, np.float32))
    with pytest.raises(ValueError, match="no per-row float scales"):
        q.row_scales()
    with pytest.raises(AttributeError, match="no MX format"):
        _ = q.fmt


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3"])
def test_every_layout_is_the_same_values_and_passes_through_jit(key, fmt):
    w = jax.random.normal(key, (2, 128, 256)) * 0.1
    checkpoint = qm.quantize(w, fmt)
    again = qm.MXTensor(checkpoint.packed, checkpoint.scales, fmt)  # the MX name of a QArray
    assert again.qtype == checkpoint.qtype and again.layout == "checkpoint"
    want = np.asarray(checkpoint.dequantize(jnp.float32))
    for q in (checkpoint, to_kernel_layout(checkpoint), to_fragment_layout(checkpoint)):
        assert q.shape == (2, 128, 256) and q.kind == "mx"
        got = jax.jit(lambda q: q.dequantize(jnp.float32))(q)
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(q[1:].codes()), np.asarray(checkpoint.codes())[1:])
    with pytest.raises(IndexError, match="leading axes"):
        checkpoint[0, 0, 0]


def test_bfloat16_exactness_of_the_gemm_operand():
    assert QType("mxfp4", "block32").operand_exact_in_bfloat16
    assert QType("int8", "channel").operand_exact_in_bfloat16
    assert QType("bfloat16", "none").operand_exact_in_bfloat16
    assert not QType("mxfp8_e4m3", "block32").operand_exact_in_bfloat16  # e4m3 subnormals x 2^-127
    assert not QType("float32", "none").operand_exact_in_bfloat16
    assert isinstance(qm.quantize(jnp.ones((1, 32)), "mxfp8_e4m3"), QArray)
