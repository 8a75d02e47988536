"""kernels/triton/launch.py: the Triton kernels' two launchers. What holds without a GPU: the launcher setting
is checked, and (with the ``triton`` package installed) every MX kernel variant goes through Triton's front end
to TTIR, and a jitted call lowers for CUDA to XLA's own Triton custom call carrying that TTIR. That the XLA-
launched kernel computes what the jax-triton one does is tests/moe/test_triton.py's backend suite run on a GPU
with ``QUARKMOE_TRITON_LAUNCHER=xla`` (docs/performance.md, "GPU test runs")."""

import io
import re

import jax
import jax.numpy as jnp
import pytest

from quarkmoe_jax.kernels.triton import launch


def test_the_launcher_setting_is_checked(monkeypatch):
    monkeypatch.delenv(launch.LAUNCHER_ENV, raising=False)
    assert launch.launcher() == "jax_triton"
    monkeypatch.setenv(launch.LAUNCHER_ENV, "xla")
    assert launch.launcher() == "xla"
    monkeypatch.setenv(launch.LAUNCHER_ENV, "cuda_graphs")
    with pytest.raises(ValueError, match="QUARKMOE_TRITON_LAUNCHER='cuda_graphs': expected one of jax_triton, xla"):
        launch.launcher()


K_UNITS, N_UNITS, BLOCK_M, BLOCK_N, TILES = 4, 16, 16, 128, 2


def _mx_call(prefetch_l2: int, fp6: bool, split_k: int):
    from quarkmoe_jax.kernels.triton import mx_gemm

    m_pad = TILES * BLOCK_M

    def call(tile_expert, a, values, scales, low):
        return launch.triton_call(
            tile_expert,
            a,
            values,
            scales,
            low,
            kernel=mx_gemm._mx_fragment_gemm_kernel,
            out_shape=jax.ShapeDtypeStruct((split_k * m_pad, N_UNITS * 16), jnp.float32),
            grid=(TILES, N_UNITS * 16 // BLOCK_N, split_k),
            num_warps=4,
            num_stages=3,
            K_UNITS=K_UNITS,
            N_UNITS=N_UNITS,
            M_PAD=m_pad,
            N_OUT=N_UNITS * 16,
            INTERLEAVED=not fp6,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            SPLIT_K=split_k,
            EXACT=fp6,
            PREFETCH_L2=prefetch_l2,
            NUM_STAGES=1 if prefetch_l2 else 3,
            FP6=fp6,
            E3M2=fp6,
            ELEM_BIAS=3 if fp6 else 1,
        )

    units = 3 * N_UNITS * K_UNITS
    args = (
        jax.ShapeDtypeStruct((TILES,), jnp.int32),
        jax.ShapeDtypeStruct((m_pad, K_UNITS * 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((units * 1024,), jnp.uint8),
        jax.ShapeDtypeStruct((units * 64,), jnp.uint8),
        jax.ShapeDtypeStruct((units * (512 if fp6 else 1024),), jnp.uint8),
    )
    return call, args


@pytest.mark.parametrize(("prefetch_l2", "fp6", "split_k"), [(0, False, 1), (2, False, 2), (0, True, 1)])
def test_the_mx_kernel_lowers_to_xla_s_triton_custom_call(monkeypatch, prefetch_l2, fp6, split_k):
    """The v2 MX kernel (pipelined and L2-prefetch MXFP4, MXFP6, split-K) through Triton's front end, lowered
    for CUDA on this machine: one ``__gpu$xla.gpu.triton`` call with the launch's grid and warps, whose TTIR
    is the kernel's own (pointer arguments: the five operands, then the output) and parses back."""
    pytest.importorskip("triton")
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    monkeypatch.setenv(launch.LAUNCHER_ENV, "xla")
    monkeypatch.setattr(launch, "_compute_capability", lambda: 90)  # an H100 / H200, without one here
    made = []
    kernel_ttir = launch.kernel_ttir
    monkeypatch.setattr(launch, "kernel_ttir", lambda *a: made.append(kernel_ttir(*a)) or made[-1])
    call, args = _mx_call(prefetch_l2, fp6, split_k)
    hlo = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    assert f"grid_x = {TILES} : i32, grid_y = {N_UNITS * 16 // BLOCK_N} : i32, grid_z = {split_k} : i32" in hlo
    assert "num_warps = 4 : i32" in hlo and 'name = "_mx_fragment_gemm_kernel"' in hlo

    [(ttir, name)] = made
    assert name == "_mx_fragment_gemm_kernel"
    signature = re.search(r"tt\.func public @_mx_fragment_gemm_kernel\((.*?)\) attributes", ttir, re.S).group(1)
    assert re.findall(r"!tt\.ptr<(\w+)>", signature) == ["i32", "bf16", "i8", "i8", "i8", "f32"]
    assert "tt.elementwise_inline_asm" in ttir and "tt.dot" in ttir
    assert ("cp.async.bulk.prefetch.L2" in ttir) == bool(prefetch_l2)
    context = mlir.JaxIrContext()
    context.append_dialect_registry(mlir.upstream_dialects)
    tt_dialect.register_dialect(context)
    context.load_all_available_dialects()
    with context:
        ir.Module.parse(ttir).operation.write_bytecode(io.BytesIO())
