"""jax-triton grouped GEMM over experts (the ``triton`` backend's GEMM): Triton kernels called with
``jax_triton.triton_call``.

The contract of :func:`quarkmoe_jax.kernels.pallas.grouped_gemm.grouped_gemm` (row tiles of ``block_m``
rows, ``tile_expert`` per tile, MX weights or dense int8 / e4m3 / bfloat16 weights, same operand dtypes and
tensor-core math), written in the Triton language instead of Pallas:

- MX weights (MXFP4, MXFP6) run the v2 kernel (:mod:`quarkmoe_jax.kernels.triton.mx_gemm`) in the fragment
  layout, on the tile :meth:`TritonBackend.fit_tile <quarkmoe_jax.kernels.triton.backend.TritonBackend>`
  made from the ``triton_mx`` tile table.
- Dense weights run :func:`_dense_gemm_kernel`.
- The kernels write their float32 (int32 for int8 x int8) accumulators, shard-major; the epilogue (scales,
  bias, activation, router weight) is the shared :func:`quarkmoe_jax.kernels.base.apply_epilogue`, run by
  XLA (:func:`quarkmoe_jax.kernels.base.epilogue_of_accumulators`). That costs a float32 round trip of the
  GEMM output (small in decode; ~10% of a Mixtral prefill GEMM1) and keeps one epilogue for every backend.
- ``block_m`` comes from the caller's tile (the dispatch pads expert groups to it); the dense kernel's
  ``block_n``, ``num_warps`` and ``num_stages`` are autotuned by Triton on the first call of every compiled
  shape.

Needs the optional extra ``quarkmoe-jax[triton]`` (``jax-triton==0.3.1``, ``triton==3.6.0``) and a CUDA GPU:
there is no CPU or interpreter path, so :func:`unavailable_reason` says why it cannot run and the backend
raises ``NotImplementedError`` (``backend="auto"`` moves on)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.fragment_layout import FRAGMENT_LAYOUT
from quarkmoe_jax.kernels.base import (
    DENSE_BLOCK_BYTES,
    DENSE_MIN_K,
    DENSE_WEIGHT_DTYPES,
    Epilogue,
    TileConfig,
    accumulator_dtype,
    dot_dtype,
    epilogue_of_accumulators,
)

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
def _autotuned_dense(n_total: int, block_m: int, autotune: bool):
    """The dense kernel under Triton's autotuner, over the configs that fit: ``block_n`` dividing N, 4 or 8
    warps (8 only for tiles of >= 64 rows), 3 or 4 stages."""
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
    return triton.autotune(configs=configs, key=["K", "N_TOTAL", "BLOCK_M"])(_dense_gemm_kernel)


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
    """:func:`quarkmoe_jax.kernels.pallas.grouped_gemm.grouped_gemm` on the Triton kernels (same arguments; MX
    weights run ``config``'s tile, dense ones only its ``block_m``, the rest autotuned; no ``out`` buffer,
    no interpreter).

    Raises:
      NotImplementedError: Triton / jax-triton / a GPU is missing, an ``out`` buffer is given, or the
        weights do not fit the kernels (dense: K not a multiple of 16; MX: N not tiled by 64 rows where the
        gate and up rows interleave).
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
    if isinstance(weight, QArray) and weight.kind == "mx":
        if config.fused_epilogue and _fused_unsupported(weight, epilogue, config, out_dtype) is None:
            from quarkmoe_jax.kernels.triton import mx_gemm

            return mx_gemm.mx_fused_gemm(
                a,
                weight,
                tile_expert,
                bias,
                row_weights,
                row_scales,
                config=config,
                epilogue=epilogue,
                n_out=n_out,
                out_dtype=out_dtype,
            )
        acc = _fragment_accumulators(a, weight, tile_expert, config, epilogue)
    else:
        acc = _dense_accumulators(a, weight, tile_expert, bm, n_out, n_total, epilogue)
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


def _fused_unsupported(weight, epilogue, config, out_dtype):
    from quarkmoe_jax.kernels.triton import mx_gemm

    if weight.layout != FRAGMENT_LAYOUT:
        return "not in the fragment layout"
    return mx_gemm.fused_unsupported(weight, epilogue, config, out_dtype)


def _fragment_accumulators(a, weight, tile_expert, config, epilogue):
    """The v2 MX kernel's float32 accumulators."""
    from quarkmoe_jax.kernels.triton import mx_gemm

    if weight.layout != FRAGMENT_LAYOUT:
        raise TypeError(f"the v2 MX kernels read MX weights in the fragment layout, got {weight!r}")
    interleaved = bool(epilogue.gated and epilogue.interleaved)
    return mx_gemm.mx_fragment_gemm(a, weight, tile_expert, config=config, interleaved=interleaved)


def _dense_accumulators(a, weight, tile_expert, bm, n_out, n_total, epilogue):
    """The dense kernel's accumulators (int8 / e4m3 / bf16 weights ``[E, N, K]``)."""
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
    if k_total % DENSE_MIN_K:
        raise NotImplementedError(f"triton backend: K = {k_total} is not a multiple of {DENSE_MIN_K}")
    if weight.dtype not in DENSE_WEIGHT_DTYPES:
        weight = weight.astype(jnp.bfloat16)
    operand = dot_dtype(a.dtype, weight.dtype)
    native = operand.itemsize == 1
    if not native and a.dtype != jnp.bfloat16:
        a = a.astype(jnp.bfloat16)
    acc = jt.triton_call(
        tile_expert,
        a,
        weight,
        kernel=_autotuned_dense(n_total, bm, AUTOTUNE),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_total), accumulator_dtype(operand)),
        grid=grid,
        NATIVE_8BIT=native,
        INTEGER=operand == jnp.int8,
        BLOCK_K=DENSE_BLOCK_BYTES // weight.dtype.itemsize,
        **common,
    )
    return acc
