"""The kernel byte layout holds exactly the checkpoint's bits: round trips and the documented placement."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.formats import quantize
from quarkmoe_jax.formats.kernel_layout import (
    chunk_of,
    chunk_sizes,
    k_parts,
    one_part,
    split_into_parts,
    to_kernel_layout,
)
from quarkmoe_jax.kernels.pallas import PALLAS
from quarkmoe_jax.moe.fused import kernel_weights


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"])
@pytest.mark.parametrize("k", [64, 128, 192, 320, 2880])
def test_round_trip_is_bit_exact(key, fmt, k):
    if fmt != "mxfp4" and k % 64:
        pytest.skip("FP6 layout needs K % 64 == 0")
    t = quantize(jax.random.normal(key, (3, 5, k)), fmt)
    kl = to_kernel_layout(t)
    assert kl.nbytes == t.nbytes  # same storage as Quark's packing
    back = kl.to_checkpoint_layout()
    np.testing.assert_array_equal(np.asarray(back.packed), np.asarray(t.packed))
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(t.scales))
    np.testing.assert_array_equal(np.asarray(kl.dequantize(jnp.float32)), np.asarray(t.dequantize(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(kl[1].codes()), np.asarray(t[1].codes()))


def test_fp4_nibble_placement():
    codes = (jnp.arange(256) % 16).astype(jnp.uint8)[None]  # chunks 128 and 128
    from quarkmoe_jax.formats import MXTensor, pack_codes

    t = MXTensor.from_arrays(pack_codes(codes, "mxfp4"), jnp.full((1, 8), 127, jnp.uint8), "mxfp4")
    nib = np.asarray(to_kernel_layout(t).values[0])
    c = np.asarray(codes[0])
    for j in (0, 5, 63, 64 + 7):
        chunk, byte = divmod(j, 64)
        assert nib[j] & 0xF == c[chunk * 128 + byte] and nib[j] >> 4 == c[chunk * 128 + byte + 64]


def test_chunks_and_bad_input():
    assert chunk_sizes(2880) == (128,) * 22 + (64,)
    assert chunk_sizes(96) == (64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        chunk_sizes(100)
    with pytest.raises(ValueError, match="multiple of 64"):
        to_kernel_layout(quantize(jnp.ones((2, 96)), "mxfp6_e2m3"))
    with pytest.raises(TypeError, match="QArray"):
        to_kernel_layout(jnp.ones((2, 64)))
    assert to_kernel_layout(quantize(jnp.ones((2, 64)), "mxfp4")).layout == "chunk"


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3"])
def test_parts_laid_out_shard_by_shard(key, fmt):
    """A tensor-parallel w2: K = 3 shards x 192, each chunked on its own (128 + 64), so the whole differs from
    one array chunked over K = 576; the multi-part type converts back exactly, a kernel gets it re-laid whole,
    and one_part types a shard's piece as the single-part array it is."""
    t = quantize(jax.random.normal(key, (2, 16, 576)), fmt)
    pieces = []
    for s in range(3):
        packed = t.values[..., s * 192 * t.fmt.bits // 8 : (s + 1) * 192 * t.fmt.bits // 8]
        scales = t.scales[..., s * 6 : (s + 1) * 6]
        pieces.append(to_kernel_layout(dataclasses.replace(t, values=packed, scales=scales)))
    extra = None if pieces[0].extra is None else jnp.concatenate([p.extra for p in pieces], axis=-1)
    glued = dataclasses.replace(
        pieces[0],
        values=jnp.concatenate([p.values for p in pieces], axis=-1),
        scales=t.scales,
        extra=extra,
    )
    whole = split_into_parts(glued, 3)
    assert (k_parts(whole), chunk_of(whole), k_parts(glued)) == (3, 128, 1)
    assert not np.array_equal(np.asarray(glued.dequantize()), np.asarray(t.dequantize()))  # the trap
    np.testing.assert_array_equal(np.asarray(whole.to_checkpoint_layout().values), np.asarray(t.values))
    np.testing.assert_array_equal(np.asarray(whole.dequantize()), np.asarray(t.dequantize()))
    relaid = kernel_weights(whole, "w2", PALLAS)
    assert k_parts(relaid) == 1
    np.testing.assert_array_equal(np.asarray(relaid.values), np.asarray(to_kernel_layout(t).values))
    piece = one_part(
        dataclasses.replace(whole, values=pieces[1].values, scales=pieces[1].scales, extra=pieces[1].extra)
    )
    assert piece.qtype == pieces[1].qtype
    assert one_part(t) is t
    with pytest.raises(ValueError, match="single-part"):
        split_into_parts(whole, 3)
