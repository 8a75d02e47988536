"""Pallas (Triton dialect) grouped GEMM over experts, MX weights dequantized in the kernel.

``out[r] = epilogue(a[r] @ W[tile_expert[r // block_m]]^T)`` for rows ``r`` of a tile-padded operand: the
dispatch (``quarkmoe_jax.moe.pair_sort``) sorts the (token, expert) pairs by expert and pads every expert's
group to a multiple of ``block_m`` rows, so each row tile belongs to one expert (``tile_expert``, -1 for the
unused tiles at the end, which the kernel skips).

Weights are either MX in the chunk layout (a :class:`~quarkmoe_jax.formats.QArray`, see
:mod:`quarkmoe_jax.formats.kernel_layout`: uint8 nibble planes + E8M0 scales, decoded tile by tile in
registers) or a dense ``[E, N, K]`` array: bfloat16 (the project's bf16 grouped matmul, the baseline the MX
kernels are measured against), int8 or float8_e4m3fn (W8A8 / W8A16). The tensor-core math:

- int8 weights x int8 operand: int8 x int8 with int32 accumulation (exact);
- float8_e4m3fn weights x float8_e4m3fn operand: e4m3 x e4m3 with float32 accumulation (Hopper's fp8 MMA
  adds the products of one instruction's 32-element K slice in reduced precision before the float32 sum);
- everything else: bfloat16 x bfloat16 with float32 accumulation; MX values, int8 and e4m3 codes are exact
  in bfloat16, so the weights are cast in registers (W4A16, W6A16, W8A16).

Epilogue, in the oracle's order: ``acc * row_scale * col_scale + bias[e]`` (the activation scale of the row,
the weight scale of the output column); for GEMM1 cast to the activation dtype and apply the gated
activation on the gate / up accumulators (``w13`` rows ``[gate; up]`` or interleaved for ``swigluoai``); for
GEMM2 multiply by the row's router weight in float32; cast to ``out_dtype``.

Grid ``(row tiles, N tiles)``, row tiles fastest: consecutive programs of one expert reuse the same weight
tile from L2. On CPU the same kernel runs with ``interpret=True`` (the tests compare it with the oracle).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.kernel_layout import CHUNK_LAYOUT, chunk_of, chunk_sizes
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE
from quarkmoe_jax.kernels.base import (
    DENSE_BLOCK_BYTES,
    DENSE_MIN_K,
    DENSE_WEIGHT_DTYPES,
    Epilogue,
    TileConfig,
    accumulator_dtype,
    apply_epilogue,
    dot_dtype,
    epilogue_of_accumulators,
)

__all__ = [
    "grouped_gemm",
    "k_iterations",
    "dequantize_to_bfloat16",
    "decode_mx_piece",
    "decode_fp4_pairs_asm",
    "EIGHT_BIT_MMA_K",
]

EIGHT_BIT_MMA_K = 32
"""The smallest K of an int8 / e4m3 tensor-core dot (a 16-wide K tail of 8-bit operands runs in bfloat16)."""

DECODE = "asm"
"""How compiled GPU kernels decode MXFP4 tiles: "asm" (packed PTX, :func:`decode_fp4_pairs_asm`) or "jnp"
(:func:`decode_mx_piece`, one element per lane). The interpreter always runs "jnp"; FP6 always runs "jnp"."""


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


def scale_factors_bf16(scales, fmt, repeat: int):
    """E8M0 codes ``[bn, g]`` (int32) -> two bfloat16 power-of-two factors ``[bn, g * repeat]`` whose product
    is ``2^(s - bias)`` (``bias`` of the element format), NaN for code 255.

    An element whose magnitude bits sit at the bottom of a bfloat16 mantissa reads as ``value * 2^(bias-127)``
    (subnormals included); times ``first * second`` it is ``value * 2^(s - 127)``, exactly. ``first`` holds
    the factor up to ``2^127`` and ``second`` the rest (1 below code ``127 + bias``), so neither leaves
    bfloat16's normal range.
    """
    bias = fmt.element.bias
    split = 127 + bias
    first = ((jnp.minimum(scales, split) - bias + 127) << 7).astype(jnp.uint16)
    second = jnp.where(scales == 255, 0x7FC0, (jnp.maximum(scales, split) - split + 127) << 7).astype(jnp.uint16)
    bn, g = scales.shape
    out = []
    for factor in (first, second):
        factor = lax.bitcast_convert_type(factor, jnp.bfloat16)
        if repeat > 1:
            factor = jnp.broadcast_to(factor[:, :, None], (bn, g, repeat)).reshape(bn, g * repeat)
        out.append(factor)
    return out


# One instance decodes 4 bytes into 4 elements of one piece: byte i holds element i of the low piece (low
# nibble) and element i of the high piece (high nibble). A byte permute puts elements i and i+1 16 bits
# apart, so each bf16x2 pair is built with two shifts, an and and a lop3 ((a & b) | c, LUT 0xEA): magnitude
# bits to bf16 bits 6-8 (value * 2^-126, subnormal for code 1), sign to bit 15. Two bf16x2 multiplies apply
# scale_factors_bf16. Operands: $0-$1 the two output pairs, $2 the 4 bytes, $3-$4 / $5-$6 the first /
# second factors. (One output per asm: JAX 0.11's lowering drops all but the first result of a
# multi-result elementwise_inline_asm.)
_FP4_PAIRS_ASM = {
    # piece: (shift bringing the magnitude bits of elements 0 / 1 to bit 6, shift bringing their sign bits
    # to bit 15, the same for elements 2 / 3); negative = right shift
    "low": ((6, 12), (-2, 4)),
    "high": ((2, 8), (-6, 0)),
}


def _shift(dst: str, src: str, amount: int) -> str:
    if amount == 0:
        return f"mov.b32 {dst}, {src};"
    return f"shl.b32 {dst}, {src}, {amount};" if amount > 0 else f"shr.b32 {dst}, {src}, {-amount};"


def _fp4_pairs_asm(piece: str) -> str:
    lines = [
        "{",
        ".reg .b32 y, t, u, em, sg;",
        "mov.b32 em, 0x01C001C0;",
        "mov.b32 sg, 0x80008000;",
        "prmt.b32 y, $2, $2, 0x3120;",
    ]
    for out, (magnitude_shift, sign_shift) in enumerate(_FP4_PAIRS_ASM[piece]):
        lines += [
            _shift("t", "y", magnitude_shift),
            _shift("u", "y", sign_shift),
            "and.b32 u, u, sg;",
            "lop3.b32 t, t, em, u, 0xEA;",
            f"mul.rn.bf16x2 t, t, ${3 + out};",
            f"mul.rn.bf16x2 ${out}, t, ${5 + out};",
        ]
    return "\n".join(lines + ["}"])


def decode_fp4_pairs_asm(packed, factors, piece: str):
    """Decode one piece of FP4 bytes to bfloat16 with packed PTX (compiled GPU kernels only).

    Args:
      packed: uint8 ``[bn, w]``; byte ``j`` holds element ``j`` of the low piece (low nibble) and element
        ``j`` of the high piece (high nibble), the kernel layout's two halves of a chunk.
      factors: the piece's two bfloat16 ``[bn, w]`` factors (:func:`scale_factors_bf16`).
      piece: ``"low"`` or ``"high"``.

    Returns:
      bfloat16 ``[bn, w]``, bit-identical to :func:`decode_mx_piece` (subnormal results included).
    """
    (out,) = plgpu.elementwise_inline_asm(
        _fp4_pairs_asm(piece),
        args=[packed, *factors],
        constraints="=r,=r,r,r,r,r,r",
        pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.bfloat16)],
    )
    return out


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
    packed_decode,
    dot_dtype,
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
    col_scale_ref = refs.pop(0) if epilogue.col_scales else None
    row_weight_ref = refs.pop(0) if epilogue.row_weights else None
    row_scale_ref = refs.pop(0) if epilogue.row_scales else None
    (o_ref,) = refs

    bm, bn = config.block_m, config.block_n
    m, n = pl.program_id(0), pl.program_id(1)
    split = pl.program_id(2) if config.split_k > 1 else 0
    expert = tile_expert_ref[m]
    shards = (0, 1) if epilogue.gated else (0,)

    def weight_rows(shard):
        if not epilogue.gated:
            return pl.ds(n * bn, bn)
        if epilogue.interleaved:
            return pl.ds(2 * n * bn + shard, bn, stride=2)
        return pl.ds(shard * n_out + n * bn, bn)

    rows = pl.ds(m * bm, bm)

    def expert_columns(ref):
        """``[1, bn]`` per shard: the expert's values ``[E, S*N]`` of this tile's output columns."""
        return [ref[expert, weight_rows(s)][None, :] for s in shards]

    def scale_codes(shard, e0_abs, w):
        """uint8 E8M0 codes ``[bn, max(w // 32, 1)]`` of the weight rows x elements [e0_abs, e0_abs + w)."""
        groups = max(w // MX_BLOCK_SIZE, 1)
        return scale_ref[expert, weight_rows(shard), pl.ds(e0_abs // MX_BLOCK_SIZE, groups)]

    acc_dtype = accumulator_dtype(dot_dtype)

    def dot(a, w, result_dtype=acc_dtype):
        lhs, rhs = (w, a) if config.swap_ab else (a, w)
        return lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), preferred_element_type=result_dtype)

    # Each chunk is split into what it reads (load_chunk) and what it computes (compute_chunk): an iteration of
    # k_unroll chunks issues all its loads before the first decode. (Carrying the next iteration's loads
    # through the loop by hand measured 1.2-7x slower: docs/performance.md.)
    def load_chunk(k0, c):
        """The memory a chunk of c elements at element k0 reads: activation pieces and, per shard, weights."""
        if weight_kind == "dense":
            return a_ref[rows, pl.ds(k0, c)], [w_ref[expert, weight_rows(s), pl.ds(k0, c)] for s in shards]
        if packed_decode:
            h = c // 2
            pieces = [(0, h), (h, h)]
            weights = [
                (nib_ref[expert, weight_rows(s), pl.ds(k0 // 2, h)],)
                + tuple(scale_codes(s, k0 + e0, h) for e0, _ in pieces)
                for s in shards
            ]
        else:
            pieces = [(e0, w) for e0, w, *_ in _mx_pieces(c, fmt.bits)]
            weights = []
            for s in shards:
                wrows, loaded = weight_rows(s), []
                for e0, w, byte_off, _, high_shift in _mx_pieces(c, fmt.bits):
                    loaded.append(nib_ref[expert, wrows, pl.ds(k0 // 2 + byte_off, w)])
                    if high_shift is not None:
                        loaded.append(high_ref[expert, wrows, pl.ds(k0 // 4, w)])
                    loaded.append(scale_codes(s, k0 + e0, w))
                weights.append(tuple(loaded))
        return tuple(a_ref[rows, pl.ds(k0 + e0, w)] for e0, w in pieces), weights

    def compute_chunk(loaded, c, accs):
        """Decode a loaded chunk and accumulate its products."""
        a_pieces, weights = loaded
        if weight_kind == "dense":
            if dot_dtype.itemsize == 1 and c % EIGHT_BIT_MMA_K:
                # An 8-bit MMA needs K >= 32: a 16-wide tail runs in bfloat16 (int8 / e4m3 codes are exact there;
                # 16 int8 products sum exactly in float32 and convert exactly to the int32 accumulator).
                a = a_pieces.astype(jnp.bfloat16)
                products = [dot(a, w.astype(jnp.bfloat16), jnp.float32).astype(acc_dtype) for w in weights]
                return tuple(acc + prod for acc, prod in zip(accs, products, strict=True))
            a = a_pieces.astype(dot_dtype)
            return tuple(acc + dot(a, w.astype(dot_dtype)) for acc, w in zip(accs, weights, strict=True))
        a_pieces = [a.astype(jnp.bfloat16) for a in a_pieces]
        accs = list(accs)
        for i, shard_loaded in enumerate(weights):
            if packed_decode:
                packed, low_scales, high_scales = shard_loaded
                repeat = min(c // 2, MX_BLOCK_SIZE)
                for a, scales, piece in ((a_pieces[0], low_scales, "low"), (a_pieces[1], high_scales, "high")):
                    factors = scale_factors_bf16(scales.astype(jnp.int32), fmt, repeat)
                    accs[i] = accs[i] + dot(a, decode_fp4_pairs_asm(packed, factors, piece))
                continue
            loaded = list(shard_loaded)
            for a, (_, w, _, nib_shift, high_shift) in zip(a_pieces, _mx_pieces(c, fmt.bits), strict=True):
                codes = (loaded.pop(0).astype(jnp.int32) >> nib_shift) & 0xF
                if high_shift is not None:
                    codes = codes | (((loaded.pop(0).astype(jnp.int32) >> high_shift) & 0x3) << 4)
                scales = loaded.pop(0).astype(jnp.int32)
                accs[i] = accs[i] + dot(a, decode_mx_piece(codes, scales, fmt, min(w, MX_BLOCK_SIZE)))
        return tuple(accs)

    @pl.when(expert >= 0)
    def _():
        accs = tuple(jnp.zeros((bn, bm) if config.swap_ab else (bm, bn), acc_dtype) for _ in shards)
        full, unroll = chunks[0], config.k_unroll
        iterations = sum(1 for c in chunks if c == full) // unroll

        def load_iteration(i):
            starts = [(i * unroll + j) * full for j in range(unroll)]
            if not isinstance(i, int):  # Triton's multiple_of needs a traced value
                starts = [pl.multiple_of(k0, full) for k0 in starts]
            return [load_chunk(k0, full) for k0 in starts]

        def compute_iteration(loaded, accs):
            for chunk in loaded:
                accs = compute_chunk(chunk, full, accs)
            return accs

        per_split = iterations // config.split_k
        first = 0 if config.split_k == 1 else split * per_split
        if per_split:
            accs = lax.fori_loop(0, per_split, lambda i, accs: compute_iteration(load_iteration(first + i), accs), accs)
        k0 = iterations * unroll * full
        tail = accs
        for c in chunks[iterations * unroll :]:
            tail = compute_chunk(load_chunk(k0, c), c, tail)
            k0 += c
        assert k0 == k_total
        if config.split_k == 1:
            accs = tail
        elif k0 > iterations * unroll * full:  # the last split takes the tail (a select: no NaN * 0)
            accs = tuple(jnp.where(split == config.split_k - 1, t, acc) for t, acc in zip(tail, accs, strict=True))
        if config.swap_ab:
            accs = tuple(acc.T for acc in accs)
        if config.split_k > 1:  # partial sums; gated: gate columns [0, N), up columns [N, 2N)
            for i, acc in enumerate(accs):
                o_ref[split, rows, pl.ds(i * n_out + n * bn, bn)] = acc
            return
        o_ref[rows, pl.ds(n * bn, bn)] = apply_epilogue(
            accs,
            epilogue,
            out_dtype,
            row_scales=row_scale_ref[rows][:, None] if epilogue.row_scales else None,
            biases=expert_columns(bias_ref) if epilogue.has_bias else None,
            row_weights=row_weight_ref[rows][:, None] if epilogue.row_weights else None,
            col_scales=expert_columns(col_scale_ref) if epilogue.col_scales else None,
        )


def _weight_chunks(weight, k_total: int) -> tuple[int, ...]:
    """The K chunks the kernel loops over: the chunk layout's for MX weights, 128 bytes for dense ones."""
    if isinstance(weight, QArray):
        return chunk_sizes(k_total, chunk_of(weight))
    itemsize = weight.dtype.itemsize if weight.dtype in DENSE_WEIGHT_DTYPES else 2
    return chunk_sizes(k_total, DENSE_BLOCK_BYTES // itemsize, granule=DENSE_MIN_K)


def _iterations(chunks: tuple[int, ...], k_unroll: int) -> int:
    return sum(1 for c in chunks if c == chunks[0]) // k_unroll


def k_iterations(weight, k_unroll: int = 1) -> int:
    """Iterations of the kernel's K loop over ``weight`` (MX chunk layout ``[E, N, K]`` or a dense
    ``[E, N, K]`` array): ``split_k`` must divide it."""
    return _iterations(_weight_chunks(weight, weight.shape[-1]), k_unroll)


@functools.partial(jax.jit, static_argnames=("n_out", "config", "epilogue", "out_dtype", "interpret"))
def grouped_gemm(
    a,
    weight,
    tile_expert,
    bias=None,
    row_weights=None,
    row_scales=None,
    out=None,
    col_scales=None,
    *,
    n_out: int,
    config: TileConfig,
    epilogue: Epilogue,
    out_dtype,
    interpret: bool = False,
):
    """Grouped GEMM with fused dequant and epilogue.

    Args:
      a: ``[M_pad, K]`` operand, ``M_pad = len(tile_expert) * block_m``, rows grouped by expert in tiles of
        ``block_m``: int8 codes (with int8 weights: int8 tensor cores), float8_e4m3fn codes (with e4m3
        weights: fp8 tensor cores), or any float dtype (cast to bfloat16 in the kernel; exact for MX / FP8
        values).
      weight: MX :class:`QArray` in the chunk layout ``[E, S*N, K]``, or an ``[E, S*N, K]`` array: bfloat16, int8 or
        float8_e4m3fn (other floats are cast to bfloat16).
      tile_expert: int32 ``[num_tiles]``, the local expert of each row tile, -1 for unused tiles.
      bias, col_scales: float32 ``[E, S*N]`` or None. row_weights, row_scales: float32 ``[M_pad]`` or None
        (as ``epilogue`` says).
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
    if isinstance(weight, QArray):
        if weight.layout != CHUNK_LAYOUT:
            raise TypeError(f"grouped_gemm reads MX weights in the chunk layout, got {weight!r}")
        weight_kind, fmt = "mx", weight.fmt
        weight_arrays = [weight.values] + ([weight.extra] if fmt.bits == 6 else []) + [weight.scales]
    else:
        weight_kind, fmt = "dense", None
        if weight.dtype not in DENSE_WEIGHT_DTYPES:
            weight = weight.astype(jnp.bfloat16)
        weight_arrays = [weight]
    chunks = _weight_chunks(weight, k_total)
    operand_dtype = dot_dtype(a.dtype, weight_arrays[0].dtype if weight_kind == "dense" else None)
    splits, iterations = config.split_k, _iterations(chunks, config.k_unroll)
    if iterations % splits:  # PallasBackend.fit_tile picks a divisor
        raise ValueError(f"split_k {splits} does not divide the K loop's {iterations} iterations")
    if splits > 1 and out is not None:
        raise ValueError("split_k > 1 writes a new output: no out buffer")
    args = [tile_expert, a, *weight_arrays]
    for wanted, values in (
        (epilogue.has_bias, bias),
        (epilogue.col_scales, col_scales),
        (epilogue.row_weights, row_weights),
        (epilogue.row_scales, row_scales),
    ):
        if wanted:
            args.append(jnp.asarray(values, jnp.float32))
    aliases = {}
    if out is not None:
        aliases = {len(args): 0}
        args.append(out)
    kernel = functools.partial(
        _kernel,
        has_out_input=out is not None,
        packed_decode=_packed_decode(fmt, interpret),
        dot_dtype=operand_dtype,
        weight_kind=weight_kind,
        fmt=fmt,
        chunks=chunks,
        k_total=k_total,
        n_out=n_out,
        config=config,
        epilogue=epilogue,
        out_dtype=jnp.dtype(out_dtype),
    )
    shards = 2 if epilogue.gated else 1
    kernel_out = (splits, m_pad, shards * n_out) if splits > 1 else (m_pad, n_out)
    result = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(kernel_out, accumulator_dtype(operand_dtype) if splits > 1 else out_dtype),
        grid=(num_tiles, n_out // bn, splits),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        input_output_aliases=aliases,
        interpret=interpret,
    )(*args)
    if splits == 1:
        return result
    return epilogue_of_accumulators(
        result.sum(axis=0),
        tile_expert,
        bm,
        n_out=n_out,
        epilogue=epilogue,
        out_dtype=out_dtype,
        bias=bias,
        row_weights=row_weights,
        row_scales=row_scales,
        col_scales=col_scales,
    )


def _packed_decode(fmt, interpret: bool) -> bool:
    """Whether a launch decodes with :func:`decode_fp4_pairs_asm` (MXFP4, compiled, ``DECODE == "asm"``)."""
    return fmt is not None and fmt.bits == 4 and not interpret and DECODE == "asm"


def _dequantize_kernel(nib_ref, *refs, fmt, chunks, block_n, packed_decode):
    refs = list(refs)
    high_ref = refs.pop(0) if fmt.bits == 6 else None
    scale_ref, o_ref = refs
    e, n, c_index = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(n * block_n, block_n)
    full = chunks[0]
    n_full = sum(1 for c in chunks if c == full)

    def piece_scales(k0, w):
        groups, repeat = max(w // MX_BLOCK_SIZE, 1), min(w, MX_BLOCK_SIZE)
        return scale_ref[e, rows, pl.ds(k0 // MX_BLOCK_SIZE, groups)].astype(jnp.int32), repeat

    def decode_chunk(k0, c):
        if packed_decode:
            h = c // 2
            factors = []
            for e0 in (0, h):
                scales, repeat = piece_scales(k0 + e0, h)
                factors.append(scale_factors_bf16(scales, fmt, repeat))
            packed = nib_ref[e, rows, pl.ds(k0 // 2, h)]
            o_ref[e, rows, pl.ds(k0, h)] = decode_fp4_pairs_asm(packed, factors[0], "low")
            o_ref[e, rows, pl.ds(k0 + h, h)] = decode_fp4_pairs_asm(packed, factors[1], "high")
            return
        for e0, w, byte_off, nib_shift, high_shift in _mx_pieces(c, fmt.bits):
            codes = (nib_ref[e, rows, pl.ds(k0 // 2 + byte_off, w)].astype(jnp.int32) >> nib_shift) & 0xF
            if high_shift is not None:
                high = high_ref[e, rows, pl.ds(k0 // 4, w)].astype(jnp.int32)
                codes = codes | (((high >> high_shift) & 0x3) << 4)
            scales, repeat = piece_scales(k0 + e0, w)
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
def dequantize_to_bfloat16(weight: QArray, *, block_n: int = 32, interpret: bool = False):
    """Kernel-layout MX weights ``[E, N, K]`` -> bfloat16 ``[E, N, K]`` (exact), one pass at memory speed.

    The prefill path's transient buffer: its caller bounds how many experts it dequantizes at a time.
    """
    num_experts, n, k = weight.shape
    while n % block_n:
        block_n //= 2
    fmt = weight.fmt
    arrays = [weight.values] + ([weight.extra] if fmt.bits == 6 else []) + [weight.scales]
    kernel = functools.partial(
        _dequantize_kernel,
        fmt=fmt,
        chunks=chunk_sizes(k, chunk_of(weight)),
        block_n=block_n,
        packed_decode=_packed_decode(fmt, interpret),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_experts, n, k), jnp.bfloat16),
        grid=(num_experts, n // block_n, max(1, k // chunk_of(weight))),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(*arrays)
