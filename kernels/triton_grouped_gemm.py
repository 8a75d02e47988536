"""jax-triton grouped GEMM over experts (the ``triton`` backend): Triton kernels called with
``jax_triton.triton_call``.

The same contract as :func:`quarkmoe_jax.kernels.grouped_gemm.grouped_gemm` (row tiles of ``block_m`` rows,
``tile_expert`` per tile, MX weights in the kernel layout or dense int8 / e4m3 / bfloat16 weights, same
operand dtypes and tensor-core math), written in the Triton language instead of Pallas:

- MXFP4 tiles are decoded by the same packed PTX as the Pallas kernels (:func:`grouped_gemm._fp4_pairs_asm`,
  through ``tl.inline_asm_elementwise``); MXFP6 by integer ops and a float16 bit placement (as
  :func:`grouped_gemm.decode_mx_piece`).
- The kernel writes its float32 (int32 for int8 x int8) accumulators, shard-major; the epilogue (scales,
  bias, activation, router weight) is the Pallas kernels' own :func:`grouped_gemm.apply_epilogue`, run by
  XLA (:func:`grouped_gemm.epilogue_of_accumulators`). That costs a float32 round trip of the GEMM output
  (small in decode; ~10% of a Mixtral prefill GEMM1) and keeps one epilogue for every backend.
- ``block_m`` comes from the caller's tile table (the dispatch pads expert groups to it); ``block_n``,
  ``num_warps`` and ``num_stages`` are autotuned by Triton on the first call of every compiled shape.

Needs the optional extra ``quarkmoe-jax[triton]`` (``jax-triton==0.3.1``, ``triton==3.6.0``) and a CUDA GPU:
there is no CPU or interpreter path, so :func:`unavailable_reason` says why it cannot run and the backend
raises ``NotImplementedError`` (``backend="auto"`` moves on).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from quarkmoe_jax.kernels.grouped_gemm import (
    DENSE_BLOCK_BYTES,
    DENSE_MIN_K,
    Epilogue,
    TileConfig,
    _accumulator_dtype,
    _fp4_pairs_asm,
    dot_dtype,
    epilogue_of_accumulators,
)

from quarkmoe_jax.formats.fragment_layout import MXFragmentWeights
from quarkmoe_jax.formats.kernel_layout import MXKernelWeights, chunk_sizes

__all__ = ["triton_grouped_gemm", "unavailable_reason", "AUTOTUNE_BLOCK_N"]

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra is not installed
    triton = None

AUTOTUNE_BLOCK_N = (32, 64, 128)
"""``block_n`` candidates of the autotuner (each with 4 / 8 warps and 3 / 4 stages; 8 warps only for
``block_m`` >= 64)."""
AUTOTUNE = True
"""False: compile only the first candidate (tests: every candidate is the same kernel code, and autotuning
compiles each of them)."""


@functools.cache
def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here (``None`` when they can)."""
    if triton is None:
        return "triton is not installed (pip install 'quarkmoe-jax[triton]')"
    if jax.default_backend() != "gpu" or "NVIDIA" not in jax.devices()[0].device_kind.upper():
        return "jax-triton needs an NVIDIA GPU (it has no CPU or interpreter path)"
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:
        return f"jax-triton is not importable ({e}); pip install 'quarkmoe-jax[triton]'"
    return None


if triton is not None:
    _FP4_ASM_LOW = tl.constexpr(_fp4_pairs_asm("low"))
    _FP4_ASM_HIGH = tl.constexpr(_fp4_pairs_asm("high"))

    @triton.jit
    def _scale_factors_fp4(s, ELEM_BIAS: tl.constexpr):
        """E8M0 codes (int32) -> the two bfloat16 factors of grouped_gemm.scale_factors_bf16."""
        split = 127 + ELEM_BIAS
        first = ((tl.minimum(s, split) - ELEM_BIAS + 127) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        second = tl.where(s == 255, 0x7FC0, (tl.maximum(s, split) - split + 127) << 7)
        return first, second.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _decode_fp6(codes, s, ELEM_BIAS: tl.constexpr, MAG_BITS: tl.constexpr, MBITS: tl.constexpr):
        """FP6 codes and E8M0 codes (int32, same shape) -> exact bfloat16 values (grouped_gemm.decode_mx_piece)."""
        sign = (codes >> MAG_BITS) & 1
        magnitude = codes & ((1 << MAG_BITS) - 1)
        half = ((sign << 15) | (magnitude << (10 - MBITS))).to(tl.uint16).to(tl.float16, bitcast=True)
        field = s + (15 - ELEM_BIAS)
        first = tl.minimum(field, 254)
        factor = tl.where(s == 255, 0x7FC00000, first << 23).to(tl.float32, bitcast=True)  # code 255: NaN
        extra = (((field - first) + 127) << 23).to(tl.float32, bitcast=True)
        return (half.to(tl.float32) * factor * extra).to(tl.bfloat16)

    @triton.jit
    def _fp4_piece(acc, a_rows, packed, scale_rows, cols, ASM: tl.constexpr, ELEM_BIAS: tl.constexpr):
        """acc += a[:, cols] @ W[:, cols]^T, the piece of FP4 bytes ``packed`` that ``ASM`` decodes."""
        s = tl.load(scale_rows + (cols // 32)[None, :]).to(tl.int32)
        first, second = _scale_factors_fp4(s, ELEM_BIAS)
        w = tl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r,r", [packed, first, second], tl.bfloat16, True, 4)
        a = tl.load(a_rows + cols[None, :]).to(tl.bfloat16)
        return tl.dot(a, tl.trans(w), acc)

    @triton.jit
    def _mx_chunk(
        acc,
        a_rows,
        nib_rows,
        high_rows,
        scale_rows,
        k0,
        C: tl.constexpr,
        BITS: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
        MAG_BITS: tl.constexpr,
        MBITS: tl.constexpr,
    ):
        """acc += a[:, k0:k0+C] @ decode(W[:, k0:k0+C])^T for one chunk of the kernel layout."""
        if BITS == 4:
            H: tl.constexpr = C // 2
            j = tl.arange(0, H)
            packed = tl.load(nib_rows + (k0 // 2 + j)[None, :])
            acc = _fp4_piece(acc, a_rows, packed, scale_rows, k0 + j, _FP4_ASM_LOW, ELEM_BIAS)
            acc = _fp4_piece(acc, a_rows, packed, scale_rows, k0 + H + j, _FP4_ASM_HIGH, ELEM_BIAS)
        else:
            Q: tl.constexpr = C // 4
            j = tl.arange(0, Q)
            nib_low = tl.load(nib_rows + (k0 // 2 + j)[None, :]).to(tl.int32)
            nib_high = tl.load(nib_rows + (k0 // 2 + Q + j)[None, :]).to(tl.int32)
            high = tl.load(high_rows + (k0 // 4 + j)[None, :]).to(tl.int32)
            for piece in tl.static_range(4):
                if piece % 2 == 0:
                    src = nib_low
                else:
                    src = nib_high
                codes = ((src >> (4 * (piece // 2))) & 0xF) | (((high >> (2 * piece)) & 0x3) << 4)
                cols = k0 + piece * Q + j
                s = tl.load(scale_rows + (cols // 32)[None, :]).to(tl.int32)
                w = _decode_fp6(codes, s, ELEM_BIAS, MAG_BITS, MBITS)
                a = tl.load(a_rows + cols[None, :]).to(tl.bfloat16)
                acc = tl.dot(a, tl.trans(w), acc)
        return acc

    @triton.jit
    def _store_accumulator(
        out_ptr, acc, offs_m, offs_n, N_TOTAL: tl.constexpr, N_OUT: tl.constexpr, INTERLEAVED: tl.constexpr
    ):
        """Write a tile shard-major: an interleaved gated weight's row c is shard c % 2, column c // 2."""
        if INTERLEAVED:
            cols = (offs_n % 2) * N_OUT + offs_n // 2
        else:
            cols = offs_n
        tl.store(out_ptr + offs_m[:, None] * N_TOTAL + cols[None, :], acc)

    @triton.jit
    def _mx_gemm_kernel(
        tile_expert_ptr,
        a_ptr,
        nib_ptr,
        high_ptr,
        scale_ptr,
        out_ptr,
        K: tl.constexpr,
        N_TOTAL: tl.constexpr,
        N_OUT: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BITS: tl.constexpr,
        ELEM_BIAS: tl.constexpr,
        MAG_BITS: tl.constexpr,
        MBITS: tl.constexpr,
        CHUNK: tl.constexpr,
        FULL_CHUNKS: tl.constexpr,
        TAIL_1: tl.constexpr,
        TAIL_2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        expert = tl.load(tile_expert_ptr + pid_m)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.maximum(expert, 0).to(tl.int64)
        a_rows = a_ptr + offs_m[:, None] * K
        nib_rows = nib_ptr + e * (N_TOTAL * (K // 2)) + offs_n[:, None] * (K // 2)
        high_rows = high_ptr + e * (N_TOTAL * (K // 4)) + offs_n[:, None] * (K // 4)
        scale_rows = scale_ptr + e * (N_TOTAL * (K // 32)) + offs_n[:, None] * (K // 32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        iterations = tl.where(expert >= 0, FULL_CHUNKS, 0)
        for i in range(0, iterations):
            acc = _mx_chunk(
                acc, a_rows, nib_rows, high_rows, scale_rows, i * CHUNK, CHUNK, BITS, ELEM_BIAS, MAG_BITS, MBITS
            )
        if TAIL_1 > 0:
            k_tail = FULL_CHUNKS * CHUNK
            acc = _mx_chunk(
                acc, a_rows, nib_rows, high_rows, scale_rows, k_tail, TAIL_1, BITS, ELEM_BIAS, MAG_BITS, MBITS
            )
        if TAIL_2 > 0:
            k_tail = FULL_CHUNKS * CHUNK + TAIL_1
            acc = _mx_chunk(
                acc, a_rows, nib_rows, high_rows, scale_rows, k_tail, TAIL_2, BITS, ELEM_BIAS, MAG_BITS, MBITS
            )
        acc = tl.where(expert >= 0, acc, 0.0)
        _store_accumulator(out_ptr, acc, offs_m, offs_n, N_TOTAL, N_OUT, INTERLEAVED)

    @triton.jit
    def _dense_gemm_kernel(
        tile_expert_ptr,
        a_ptr,
        w_ptr,
        out_ptr,
        K: tl.constexpr,
        N_TOTAL: tl.constexpr,
        N_OUT: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        NATIVE_8BIT: tl.constexpr,
        INTEGER: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        expert = tl.load(tile_expert_ptr + pid_m)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        e = tl.maximum(expert, 0).to(tl.int64)
        a_rows = a_ptr + offs_m[:, None] * K
        w_rows = w_ptr + e * (N_TOTAL * K) + offs_n[:, None] * K
        if INTEGER:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        iterations = tl.where(expert >= 0, tl.cdiv(K, BLOCK_K), 0)
        for i in range(0, iterations):
            k = i * BLOCK_K + offs_k
            in_k = k[None, :] < K
            a = tl.load(a_rows + k[None, :], mask=in_k)
            w = tl.load(w_rows + k[None, :], mask=in_k)
            if K % BLOCK_K:  # zeros past K (no "other": there is no int -> fp8 constant cast)
                a = tl.where(in_k, a, tl.zeros_like(a))
                w = tl.where(in_k, w, tl.zeros_like(w))
            if INTEGER:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
            elif NATIVE_8BIT:
                acc = tl.dot(a, tl.trans(w), acc)
            else:
                acc = tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
        acc = tl.where(expert >= 0, acc, 0)
        _store_accumulator(out_ptr, acc, offs_m, offs_n, N_TOTAL, N_OUT, INTERLEAVED)


@functools.cache
def _autotuned(kernel_name: str, n_total: int, block_m: int, autotune: bool):
    """The kernel under Triton's autotuner, over the configs that fit: ``block_n`` dividing N, 4 or 8 warps
    (8 only for tiles of >= 64 rows), 3 or 4 stages."""
    kernel = {"mx": _mx_gemm_kernel, "dense": _dense_gemm_kernel}[kernel_name]
    configs = [
        triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bn in AUTOTUNE_BLOCK_N
        if n_total % bn == 0
        for warps in ((4, 8) if block_m >= 64 else (4,))
        for stages in (3, 4)
    ]
    if not configs:
        raise NotImplementedError(f"triton backend: N = {n_total} has no tile in {AUTOTUNE_BLOCK_N}")
    if not autotune:
        configs = configs[:1]
    return triton.autotune(configs=configs, key=["K", "N_TOTAL", "BLOCK_M"])(kernel)


def _chunk_plan(chunks: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(chunk size of the loop, its number of chunks, the first and second smaller tail chunks or 0) of a
    kernel-layout chunk list (K = 64 is one chunk of 64, K = 320 two of 128 and one of 64)."""
    full = sum(1 for c in chunks if c == chunks[0])
    tail = list(chunks[full:]) + [0, 0]
    if len(chunks) - full > 2:
        raise NotImplementedError(f"triton backend: K chunks {chunks} have more than two tail pieces")
    return chunks[0], full, tail[0], tail[1]


def triton_grouped_gemm(
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
    """:func:`quarkmoe_jax.kernels.grouped_gemm.grouped_gemm` on the Triton kernels (same arguments; only
    ``config.block_m`` is used, the rest is autotuned; no ``out`` buffer, no interpreter).

    Raises:
      NotImplementedError: Triton / jax-triton / a GPU is missing, an ``out`` buffer is given, or the
        weights' K does not fit the kernels (MX: more than two tail chunks; dense: not a multiple of 16).
    """
    reason = unavailable_reason()
    if reason is not None or interpret:
        raise NotImplementedError(f"triton backend: {reason or 'no interpreter'}")
    if out is not None:
        raise NotImplementedError("triton backend: no out buffer (the prefill dequantize path is Pallas-only)")
    num_tiles = tile_expert.shape[0]
    m_pad = a.shape[0]
    bm = config.block_m
    if m_pad != num_tiles * bm:
        raise ValueError(f"a has {m_pad} rows, expected {num_tiles} tiles x {bm}")
    shards = 2 if epilogue.gated else 1
    n_total = shards * n_out
    if isinstance(weight, MXFragmentWeights):
        acc = _fragment_accumulators(a, weight, tile_expert, config, epilogue)
    else:
        acc = _accumulators(a, weight, tile_expert, bm, n_out, n_total, epilogue)
    return epilogue_of_accumulators(
        acc,
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


def _fragment_accumulators(a, weight, tile_expert, config, epilogue):
    """The v2 MXFP4 kernel's float32 accumulators (block_n halved down to 64 until it tiles the rows)."""
    from quarkmoe_jax.kernels import triton_mx_gemm

    block_n = config.block_n
    while block_n > 64 and not triton_mx_gemm.fits(weight, block_n):
        block_n //= 2
    tile = dataclasses.replace(config, block_n=block_n)
    interleaved = bool(epilogue.gated and epilogue.interleaved)
    return triton_mx_gemm.mx_fragment_gemm(a, weight, tile_expert, config=tile, interleaved=interleaved)


def _accumulators(a, weight, tile_expert, bm, n_out, n_total, epilogue):
    """The first kernels' accumulators (chunk-layout MX weights, or dense int8 / e4m3 / bf16 weights)."""
    import jax_triton as jt

    num_tiles = tile_expert.shape[0]
    m_pad, k_total = a.shape
    common = dict(
        K=k_total,
        N_TOTAL=n_total,
        N_OUT=n_out,
        INTERLEAVED=bool(epilogue.gated and epilogue.interleaved),
        BLOCK_M=bm,
    )
    grid = lambda meta: (num_tiles, n_total // meta["BLOCK_N"])  # noqa: E731
    if isinstance(weight, MXKernelWeights):
        fmt = weight.fmt
        chunk, full, tail_1, tail_2 = _chunk_plan(chunk_sizes(k_total, weight.chunk))
        high = weight.high_bits if fmt.bits == 6 else weight.nibbles  # unused for FP4
        element = fmt.element
        acc = jt.triton_call(
            tile_expert,
            a,
            weight.nibbles,
            high,
            weight.scales,
            kernel=_autotuned("mx", n_total, bm, AUTOTUNE),
            out_shape=jax.ShapeDtypeStruct((m_pad, n_total), jnp.float32),
            grid=grid,
            BITS=fmt.bits,
            ELEM_BIAS=element.bias,
            MAG_BITS=element.ebits + element.mbits,
            MBITS=element.mbits,
            CHUNK=chunk,
            FULL_CHUNKS=full,
            TAIL_1=tail_1,
            TAIL_2=tail_2,
            **common,
        )
    else:
        if k_total % DENSE_MIN_K:
            raise NotImplementedError(f"triton backend: K = {k_total} is not a multiple of {DENSE_MIN_K}")
        if weight.dtype not in (jnp.int8, jnp.float8_e4m3fn, jnp.bfloat16):
            weight = weight.astype(jnp.bfloat16)
        operand = dot_dtype(a.dtype, weight.dtype)
        native = operand.itemsize == 1
        if not native and a.dtype != jnp.bfloat16:
            a = a.astype(jnp.bfloat16)
        acc = jt.triton_call(
            tile_expert,
            a,
            weight,
            kernel=_autotuned("dense", n_total, bm, AUTOTUNE),
            out_shape=jax.ShapeDtypeStruct((m_pad, n_total), _accumulator_dtype(operand)),
            grid=grid,
            NATIVE_8BIT=native,
            INTEGER=operand == jnp.int8,
            BLOCK_K=DENSE_BLOCK_BYTES // weight.dtype.itemsize,
            **common,
        )
    return acc
