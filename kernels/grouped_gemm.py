"""Pallas (Triton dialect) grouped GEMM over experts, MX weights dequantized in the kernel.

``out[r] = epilogue(a[r] @ W[tile_expert[r // block_m]]^T)`` for rows ``r`` of a tile-padded operand: the
dispatch (``quarkmoe_jax.moe.dispatch``) sorts the (token, expert) pairs by expert and pads every expert's
group to a multiple of ``block_m`` rows, so each row tile belongs to one expert (``tile_expert``, -1 for the
unused tiles at the end, which the kernel skips).

Weights are either MX in the kernel layout (:class:`quarkmoe_jax.formats.kernel_layout.MXKernelWeights`,
uint8 nibble planes + E8M0 scales, decoded tile by tile in registers) or a dense ``[E, N, K]`` bfloat16
array (the project's bf16 grouped matmul, the baseline the MX kernels are measured against). The math is
bfloat16 x bfloat16 on tensor cores with float32 accumulation; MX values are exact in bfloat16.

Epilogue, in the oracle's order: ``acc + bias[e]``; for GEMM1 cast to the activation dtype and apply the
gated activation on the gate / up accumulators (``w13`` rows ``[gate; up]`` or interleaved for
``swigluoai``); for GEMM2 multiply by the row's router weight in float32; cast to ``out_dtype``.

Grid ``(row tiles, N tiles)``, row tiles fastest: consecutive programs of one expert reuse the same weight
tile from L2. On CPU the same kernel runs with ``interpret=True`` (the tests compare it with the oracle).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from quarkmoe_jax.formats.kernel_layout import MXKernelWeights, chunk_sizes
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE
from quarkmoe_jax.moe.activations import gated_activation, unary_activation

__all__ = ["TileConfig", "Epilogue", "grouped_gemm", "dequantize_to_bfloat16", "decode_mx_piece", "DENSE_BLOCK_K"]

DENSE_BLOCK_K = 64
SCALE_LOAD = "broadcast"
"""How the fused kernel brings E8M0 scales to the elements: "broadcast" (load [bn, groups], broadcast in
registers) or "gather" (each element loads its block's byte). Chosen by measurement (docs/performance.md)."""


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static tiling of one kernel launch (``block_m``, ``block_n`` powers of two >= 16)."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What the kernel does after the K loop (static).

    ``activation``: None (write ``acc + bias``), a gated name (GEMM1 with two accumulators) or a non-gated
    one. ``row_scales``: multiply the accumulator by a per-row float32 scale first (FP8 activation scales).
    ``row_weights``: multiply by a per-row float32 weight last (GEMM2's router weight).
    """

    activation: str | None = None
    gated: bool = False
    interleaved: bool = False
    swiglu_limit: float | None = None
    activation_dtype: str = "bfloat16"
    has_bias: bool = False
    row_weights: bool = False
    row_scales: bool = False


def decode_mx_piece(codes, scales, fmt, repeat: int):
    """Decode element codes of one weight piece to exact bfloat16 values.

    Args:
      codes: int32 ``[bn, w]`` element codes (sign | magnitude bits of ``fmt.element``).
      scales: int32 ``[bn, g]`` E8M0 codes, each covering ``repeat`` consecutive columns (``g * repeat = w``).
      fmt: the MXFormat.

    The code's bits are placed in a float16 (exponent and mantissa fields line up, subnormals included, and
    float16 -> float32 is exact everywhere), giving ``value * 2^(bias - 15)``; two power-of-two multiplies
    restore ``value * 2^(s - 127)`` without leaving float32's normal range for any E8M0 code (the second is
    1 except for codes above ~240). Code 255 gives NaN.
    """
    element = fmt.element
    magnitude_bits = element.ebits + element.mbits
    sign = (codes >> magnitude_bits) & 1
    magnitude = codes & ((1 << magnitude_bits) - 1)
    half_bits = (sign << 15) | (magnitude << (10 - element.mbits))
    values = lax.bitcast_convert_type(half_bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)
    # value * 2^(s - 127) = half * 2^(s + 15 - bias - 127): exponent field s + 15 - bias, split at 254.
    field = scales + (15 - element.bias)
    first = jnp.minimum(field, 254)
    factor = lax.bitcast_convert_type(first << 23, jnp.float32)
    factor = jnp.where(scales == 255, jnp.float32(jnp.nan), factor)
    extra = lax.bitcast_convert_type(((field - first) + 127) << 23, jnp.float32)
    bn, g = scales.shape
    if repeat == 1:
        return (values * factor * extra).astype(jnp.bfloat16)
    factor = jnp.broadcast_to(factor[:, :, None], (bn, g, repeat)).reshape(bn, g * repeat)
    extra = jnp.broadcast_to(extra[:, :, None], (bn, g, repeat)).reshape(bn, g * repeat)
    return (values * factor * extra).astype(jnp.bfloat16)


def _mx_pieces(c: int, bits: int):
    """The pieces a chunk of ``c`` elements decodes into: (element offset, width, nibble byte offset,
    nibble shift, high-plane shift or None)."""
    if bits == 4:
        h = c // 2
        return [(0, h, 0, 0, None), (h, h, 0, 4, None)]
    q = c // 4
    return [
        (0, q, 0, 0, 0),
        (q, q, q, 0, 2),
        (2 * q, q, 0, 4, 4),
        (3 * q, q, q, 4, 6),
    ]


def _kernel(
    tile_expert_ref,
    a_ref,
    *refs,
    weight_kind,
    fmt,
    chunks,
    k_total,
    n_out,
    config,
    epilogue,
    out_dtype,
    has_out_input,
):
    refs = list(refs)
    if has_out_input:
        refs.pop(-2)  # the aliased output buffer arrives as an input too; the kernel only writes o_ref
    if weight_kind == "mx":
        nib_ref = refs.pop(0)
        high_ref = refs.pop(0) if fmt.bits == 6 else None
        scale_ref = refs.pop(0)
    else:
        w_ref = refs.pop(0)
    bias_ref = refs.pop(0) if epilogue.has_bias else None
    row_weight_ref = refs.pop(0) if epilogue.row_weights else None
    row_scale_ref = refs.pop(0) if epilogue.row_scales else None
    (o_ref,) = refs

    bm, bn = config.block_m, config.block_n
    m, n = pl.program_id(0), pl.program_id(1)
    expert = tile_expert_ref[m]
    shards = (0, 1) if epilogue.gated else (0,)

    def weight_rows(shard):
        if not epilogue.gated:
            return pl.ds(n * bn, bn)
        if epilogue.interleaved:
            return pl.ds(2 * n * bn + shard, bn, stride=2)
        return pl.ds(shard * n_out + n * bn, bn)

    rows = pl.ds(m * bm, bm)

    def scale_codes(shard, e0_abs, w):
        """E8M0 codes for weight rows x elements [e0_abs, e0_abs + w): ``[bn, w]`` int32 and repeat 1
        (SCALE_LOAD "gather": each element loads its block's byte, L1-resident), or ``[bn, groups]`` and
        the repeat for decode_mx_piece to broadcast ("broadcast")."""
        if SCALE_LOAD == "gather":
            stride, start = (2, 2 * n * bn + shard) if epilogue.interleaved and epilogue.gated else (1, None)
            if start is None:
                start = shard * n_out + n * bn if epilogue.gated else n * bn
            row_index = start + stride * lax.broadcasted_iota(jnp.int32, (bn, w), 0)
            col_index = (e0_abs + lax.broadcasted_iota(jnp.int32, (bn, w), 1)) // MX_BLOCK_SIZE
            return scale_ref[expert, row_index, col_index].astype(jnp.int32), 1
        groups, repeat = max(w // MX_BLOCK_SIZE, 1), min(w, MX_BLOCK_SIZE)
        return scale_ref[expert, weight_rows(shard), pl.ds(e0_abs // MX_BLOCK_SIZE, groups)].astype(jnp.int32), repeat

    def dot(a, w):
        return lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def mx_chunk(k0, c, accs):
        """Accumulate one chunk of c elements starting at element k0 (k0 a traced or static int)."""
        accs = list(accs)
        for e0, w, byte_off, nib_shift, high_shift in _mx_pieces(c, fmt.bits):
            a = a_ref[rows, pl.ds(k0 + e0, w)].astype(jnp.bfloat16)
            for i, shard in enumerate(shards):
                wrows = weight_rows(shard)
                nib = nib_ref[expert, wrows, pl.ds(k0 // 2 + byte_off, w)].astype(jnp.int32)
                codes = (nib >> nib_shift) & 0xF
                if high_shift is not None:
                    high = high_ref[expert, wrows, pl.ds(k0 // 4, w)].astype(jnp.int32)
                    codes = codes | (((high >> high_shift) & 0x3) << 4)
                scales, repeat = scale_codes(shard, k0 + e0, w)
                accs[i] = accs[i] + dot(a, decode_mx_piece(codes, scales, fmt, repeat))
        return tuple(accs)

    def dense_chunk(k0, c, accs):
        a = a_ref[rows, pl.ds(k0, c)].astype(jnp.bfloat16)
        weights = [w_ref[expert, weight_rows(s), pl.ds(k0, c)] for s in shards]
        return tuple(acc + dot(a, w) for acc, w in zip(accs, weights, strict=True))

    step = mx_chunk if weight_kind == "mx" else dense_chunk

    @pl.when(expert >= 0)
    def _():
        accs = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in shards)
        full = chunks[0]
        n_full = sum(1 for c in chunks if c == full)
        if n_full:
            accs = lax.fori_loop(0, n_full, lambda i, accs: step(pl.multiple_of(i * full, full), full, accs), accs)
        k0 = n_full * full
        for c in chunks[n_full:]:
            accs = step(k0, c, accs)
            k0 += c
        assert k0 == k_total
        if epilogue.row_scales:
            accs = tuple(acc * row_scale_ref[rows][:, None] for acc in accs)
        if epilogue.has_bias:
            accs = tuple(acc + bias_ref[expert, weight_rows(s)][None, :] for acc, s in zip(accs, shards, strict=True))
        act_dtype = jnp.dtype(epilogue.activation_dtype)
        if epilogue.gated:
            out = gated_activation(
                accs[0].astype(act_dtype), accs[1].astype(act_dtype), epilogue.activation, limit=epilogue.swiglu_limit
            )
        elif epilogue.activation is not None:
            out = unary_activation(accs[0].astype(act_dtype), epilogue.activation)
        else:
            out = accs[0]
        if epilogue.row_weights:
            out = out.astype(jnp.float32) * row_weight_ref[rows][:, None]
        o_ref[rows, pl.ds(n * bn, bn)] = out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("n_out", "config", "epilogue", "out_dtype", "interpret"))
def grouped_gemm(
    a,
    weight,
    tile_expert,
    bias=None,
    row_weights=None,
    row_scales=None,
    out=None,
    *,
    n_out: int,
    config: TileConfig,
    epilogue: Epilogue,
    out_dtype,
    interpret: bool = False,
):
    """Grouped GEMM with fused dequant and epilogue.

    Args:
      a: ``[M_pad, K]`` operand (any float dtype; cast to bfloat16 in the kernel, exact for MX / FP8 values),
        ``M_pad = len(tile_expert) * block_m``, rows grouped by expert in tiles of ``block_m``.
      weight: :class:`MXKernelWeights` ``[E, S*N, K]`` or a bfloat16 array ``[E, S*N, K]``.
      tile_expert: int32 ``[num_tiles]``, the local expert of each row tile, -1 for unused tiles.
      bias: float32 ``[E, S*N]`` or None. row_weights, row_scales: float32 ``[M_pad]`` or None (as
        ``epilogue`` says).
      out: optional ``[M_pad, N]`` buffer the result is written into (aliased, so rows of skipped tiles keep
        its values): successive calls over disjoint sets of tiles fill one output.
      n_out: output columns N (with a gated activation the weight has ``2 * N`` rows).
      config, epilogue: static kernel parameters.
      out_dtype: output dtype.
      interpret: run the kernel in the Pallas interpreter (CPU).

    Returns:
      ``[M_pad, N]`` of ``out_dtype``; rows of unused tiles are left unwritten.
    """
    num_tiles = tile_expert.shape[0]
    m_pad, k_total = a.shape
    bm, bn = config.block_m, config.block_n
    if m_pad != num_tiles * bm:
        raise ValueError(f"a has {m_pad} rows, expected {num_tiles} tiles x {bm}")
    if n_out % bn:
        raise ValueError(f"block_n {bn} must divide N = {n_out}")
    if isinstance(weight, MXKernelWeights):
        weight_kind, fmt = "mx", weight.fmt
        chunks = chunk_sizes(k_total, weight.chunk)
        weight_arrays = [weight.nibbles] + ([weight.high_bits] if fmt.bits == 6 else []) + [weight.scales]
    else:
        weight_kind, fmt = "dense", None
        chunks = chunk_sizes(k_total, DENSE_BLOCK_K)
        weight_arrays = [weight.astype(jnp.bfloat16)]
    args = [tile_expert, a, *weight_arrays]
    if epilogue.has_bias:
        args.append(jnp.asarray(bias, jnp.float32))
    if epilogue.row_weights:
        args.append(jnp.asarray(row_weights, jnp.float32))
    if epilogue.row_scales:
        args.append(jnp.asarray(row_scales, jnp.float32))
    aliases = {}
    if out is not None:
        aliases = {len(args): 0}
        args.append(out)
    kernel = functools.partial(
        _kernel,
        has_out_input=out is not None,
        weight_kind=weight_kind,
        fmt=fmt,
        chunks=chunks,
        k_total=k_total,
        n_out=n_out,
        config=config,
        epilogue=epilogue,
        out_dtype=jnp.dtype(out_dtype),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_out), out_dtype),
        grid=(num_tiles, n_out // bn),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        input_output_aliases=aliases,
        interpret=interpret,
    )(*args)


def _dequantize_kernel(nib_ref, *refs, fmt, chunks, block_n):
    refs = list(refs)
    high_ref = refs.pop(0) if fmt.bits == 6 else None
    scale_ref, o_ref = refs
    e, n, c_index = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(n * block_n, block_n)
    full = chunks[0]
    n_full = sum(1 for c in chunks if c == full)

    def decode_chunk(k0, c):
        for e0, w, byte_off, nib_shift, high_shift in _mx_pieces(c, fmt.bits):
            codes = (nib_ref[e, rows, pl.ds(k0 // 2 + byte_off, w)].astype(jnp.int32) >> nib_shift) & 0xF
            if high_shift is not None:
                high = high_ref[e, rows, pl.ds(k0 // 4, w)].astype(jnp.int32)
                codes = codes | (((high >> high_shift) & 0x3) << 4)
            groups, repeat = max(w // MX_BLOCK_SIZE, 1), min(w, MX_BLOCK_SIZE)
            scales = scale_ref[e, rows, pl.ds((k0 + e0) // MX_BLOCK_SIZE, groups)].astype(jnp.int32)
            o_ref[e, rows, pl.ds(k0 + e0, w)] = decode_mx_piece(codes, scales, fmt, repeat)

    if n_full:
        decode_chunk(pl.multiple_of(c_index * full, full), full)

    @pl.when(c_index == max(n_full, 1) - 1)
    def _tail():  # the smaller chunks after the last full one
        k0 = n_full * full
        for c in chunks[n_full:]:
            decode_chunk(k0, c)
            k0 += c


@functools.partial(jax.jit, static_argnames=("block_n", "interpret"))
def dequantize_to_bfloat16(weight: MXKernelWeights, *, block_n: int = 32, interpret: bool = False):
    """Kernel-layout MX weights ``[E, N, K]`` -> bfloat16 ``[E, N, K]`` (exact), one pass at memory speed.

    The prefill path's transient buffer: its caller bounds how many experts it dequantizes at a time.
    """
    num_experts, n, k = weight.shape
    while n % block_n:
        block_n //= 2
    fmt = weight.fmt
    arrays = [weight.nibbles] + ([weight.high_bits] if fmt.bits == 6 else []) + [weight.scales]
    kernel = functools.partial(_dequantize_kernel, fmt=fmt, chunks=chunk_sizes(k, weight.chunk), block_n=block_n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_experts, n, k), jnp.bfloat16),
        grid=(num_experts, n // block_n, max(1, k // weight.chunk)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(*arrays)
