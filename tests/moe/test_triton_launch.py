"""kernels/triton/launch.py: the Triton kernels' two launchers, and the v2 MX kernel compiled for Hopper on
the CPU. What holds without a GPU (Triton's compiler and ptxas run anywhere): the launcher setting is checked;
the MX kernel's variants go through Triton's front end to TTIR and a jitted call lowers for CUDA to XLA's own
Triton custom call carrying it; every tile the tables launch compiles to sm_90a without spills, within shared
memory, with the weights as wgmma's register operand. That the XLA-launched kernel computes what the
jax-triton one does is tests/moe/test_triton.py's backend suite run on a GPU with
``QUARKMOE_TRITON_LAUNCHER=xla`` (docs/performance.md, "GPU test runs")."""

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


K_PAD, N_PAD, BLOCK_M, BLOCK_N, TILES = 512, 256, 16, 128, 2


def _mx_call(prefetch_l2: int, fp6: bool, split_k: int):
    """The v2 kernel's call through :func:`launch.triton_call` as ``mx_fragment_gemm`` launches it, and its
    operands' shapes (gpt-oss-like interleaved rows for MXFP4, MXFP6 e3m2 with its low plane)."""
    from quarkmoe_jax.kernels.base import TileConfig
    from quarkmoe_jax.kernels.triton import mx_gemm

    config = TileConfig(BLOCK_M, BLOCK_N, 4, 3, split_k=split_k, prefetch_l2=prefetch_l2)
    fmt_name = "mxfp6_e3m2" if fp6 else "mxfp4"
    params = mx_gemm.launch_parameters(
        num_tiles=TILES, n_pad=N_PAD, k_pad=K_PAD, fmt_name=fmt_name, exact=fp6, config=config, interleaved=not fp6
    )
    m_pad = TILES * BLOCK_M

    def call(*operands):
        out = jax.ShapeDtypeStruct((split_k * m_pad, N_PAD), jnp.float32)
        return launch.triton_call(*operands, kernel=mx_gemm._mx_fragment_gemm_kernel, out_shape=out, **params)

    units = 3 * (N_PAD // 16) * (K_PAD // 128)
    args = (
        jax.ShapeDtypeStruct((TILES,), jnp.int32),
        jax.ShapeDtypeStruct((m_pad, K_PAD), jnp.bfloat16),
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
    assert f"grid_x = {TILES} : i32, grid_y = {N_PAD // BLOCK_N} : i32, grid_z = {split_k} : i32" in hlo
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


def _table_tiles():
    """Every distinct v2 MX tile kernels/tiles.json gives an H100 or an H200, at every regime, for the
    contractions of the public shapes (gpt-oss 2880, Mixtral 4096 / 14336, DeepSeek-V3 7168 / 2048)."""
    import warnings

    from quarkmoe_jax.kernels import tiles
    from quarkmoe_jax.kernels.base import REGIMES

    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the H100 has no entry of its own: the architecture's tiles
        for device in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
            for regime in REGIMES:
                for contractions in ((2880, 2880), (4096, 14336), (7168, 2048)):
                    found.update(tiles.tile_options(device, tiles.TRITON_MX_TILES, regime, contractions, "sm90"))
    return sorted(found, key=repr)


@pytest.mark.parametrize("fmt_name", ["mxfp4", "mxfp6_e3m2"])
def test_every_table_tile_of_the_mx_kernel_compiles_for_hopper_without_spills(fmt_name):
    """Each v2 MX tile the tables launch on an H100 / H200 goes through Triton's compiler and ptxas for sm_90a
    here (no GPU needed): it compiles, spills no registers, fits the 227 KiB of shared memory a block may
    have, and every wgmma takes the decoded weights from registers (its A operand a register list, not a
    shared-memory descriptor: the v2 design, mx_gemm.py's docstring)."""
    pytest.importorskip("triton")
    from quarkmoe_jax.kernels.triton import mx_gemm

    wgmma = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16 \{[^}]*\}, (\S)")
    table = _table_tiles()
    assert len(table) >= 4
    for tile in table:
        launch_ = mx_gemm.launch_parameters(
            num_tiles=4, n_pad=4096, k_pad=4096, fmt_name=fmt_name, exact=fmt_name != "mxfp4", config=tile
        )
        launch_.pop("grid")
        pointers = ("int32", "bfloat16", "uint8", "uint8", "uint8", "float32")
        report = launch.compile_report(mx_gemm._mx_fragment_gemm_kernel, pointers, **launch_)
        assert report.spill_bytes == 0, (tile, report.registers, report.spill_bytes)
        assert report.shared_bytes <= 227 * 1024, (tile, report.shared_bytes)
        mmas = wgmma.findall(report.ptx)
        assert mmas and all(int(n) == tile.block_m and a == "{" for n, a in mmas), (tile, mmas[:2])


def test_the_v3_fused_epilogue_kernel_compiles_for_each_layer_epilogue():
    """The v3 kernel (epilogue and split-K sum in the kernel) for the epilogues the MoE layers launch —
    gpt-oss's interleaved swigluoai with bias, Mixtral's silu over gate / up halves (also MXFP6 with split-K
    and row scales), GEMM2 with bias and router weights, a 64-row prefill tile — compiles for sm_90a without
    spills, runs the v2 K loop (as many wgmma per program as v2 on the tile, twice for halves), and counts
    its splits with one atomic exactly when it splits K."""
    pytest.importorskip("triton")
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig
    from quarkmoe_jax.kernels.triton import mx_gemm

    swigluoai = Epilogue("swigluoai", True, True, None, "bfloat16", has_bias=True)
    silu = Epilogue("silu", True, False, None, "bfloat16")
    cases = [  # (tile, epilogue, N, N out, out dtype, format)
        (TileConfig(16, 128, 4, 3, split_k=2), swigluoai, 5760, 2880, "bfloat16", "mxfp4"),
        (
            TileConfig(16, 128, 4, 3, split_k=4),
            Epilogue(has_bias=True, row_weights=True),
            2944,
            2880,
            "bfloat16",
            "mxfp4",
        ),
        (TileConfig(16, 128, 4, 4), silu, 28672, 14336, "bfloat16", "mxfp4"),
        (
            TileConfig(16, 128, 4, 4, split_k=2),
            Epilogue("silu", True, row_scales=True),
            28672,
            14336,
            "bfloat16",
            "mxfp6_e3m2",
        ),
        (TileConfig(16, 256, 8, 1, prefetch_l2=3), Epilogue(row_weights=True), 4096, 4096, "float32", "mxfp4"),
        (TileConfig(64, 128, 4, 3), silu, 28672, 14336, "bfloat16", "mxfp4"),
    ]
    wgmma = re.compile(r"wgmma\.mma_async")
    pointers = ("int32", "bfloat16", "uint8", "uint8", "uint8", "float32", "float32", "float32", "int32")
    for tile, epilogue, n, n_out, out_dtype, fmt_name in cases:
        params = mx_gemm.fused_launch_parameters(
            num_tiles=4,
            n=n,
            n_pad=n,
            k_pad=4096,
            fmt_name=fmt_name,
            exact=False,
            config=tile,
            epilogue=epilogue,
            n_out=n_out,
            out_dtype=out_dtype,
        )
        params.pop("grid")
        fused = launch.compile_report(
            mx_gemm._mx_fused_gemm_kernel, pointers + (out_dtype, "float32", "int32"), **params
        )
        v2 = mx_gemm.launch_parameters(num_tiles=4, n_pad=n, k_pad=4096, fmt_name=fmt_name, exact=False, config=tile)
        v2.pop("grid")
        plain = launch.compile_report(
            mx_gemm._mx_fragment_gemm_kernel, ("int32", "bfloat16", "uint8", "uint8", "uint8", "float32"), **v2
        )
        halves = epilogue.gated and not epilogue.interleaved
        assert fused.spill_bytes == 0 and fused.shared_bytes <= 227 * 1024, (tile, epilogue, fused.registers)
        assert len(wgmma.findall(fused.ptx)) == (2 if halves else 1) * len(wgmma.findall(plain.ptx)), (tile, epilogue)
        atomic = fused.ptx.find("atom.global.gpu.acq_rel.add")
        assert (atomic >= 0) == (tile.split_k > 1), (tile, epilogue)
        if atomic >= 0:  # every thread's partial stored, then the barrier, then the count
            before = fused.ptx[:atomic]
            assert before.rfind("bar.sync") > before.rfind("st.global"), (tile, epilogue)


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_the_v3_kernel_lowers_with_its_split_counts_updated_in_place(monkeypatch, layout):
    """Through XLA's Triton call (its own Triton dialect parses the kernel: ``tt.join`` / ``tt.split`` /
    atomics included) the v3 kernel's split counters (zeros made by XLA) are an operand aliased to an
    output, so the kernel's atomics write a buffer XLA gave it to write, and the call returns the output."""
    pytest.importorskip("triton")
    import quarkmoe_jax as qm
    from quarkmoe_jax.formats.fragment_layout import to_fragment_layout
    from quarkmoe_jax.formats.mx import pack_codes
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig
    from quarkmoe_jax.kernels.triton import mx_gemm

    monkeypatch.setenv(launch.LAUNCHER_ENV, "xla")
    monkeypatch.setattr(launch, "_compute_capability", lambda: 90)
    fmt = qm.MX_FORMATS["mxfp4"]
    weight = to_fragment_layout(
        qm.MXTensor(pack_codes(jnp.zeros((2, 256, 512), jnp.uint8), fmt), jnp.zeros((2, 256, 16), jnp.uint8), fmt)
    )
    if layout == "interleaved":
        epilogue = Epilogue("swigluoai", True, True, None, "bfloat16", has_bias=True)
    else:
        epilogue = Epilogue("silu", True, False, 7.0, "bfloat16", has_bias=True, row_scales=True)

    def call(a, w, t, bias, row_scales):
        config = TileConfig(16, 128, 4, 3, split_k=2, fused_epilogue=True)
        row_scales = row_scales if epilogue.row_scales else None
        return mx_gemm.mx_fused_gemm(
            a, w, t, bias, None, row_scales, config=config, epilogue=epilogue, n_out=128, out_dtype=jnp.bfloat16
        )

    args = (
        jnp.ones((32, 512), jnp.bfloat16),
        weight,
        jnp.zeros((2,), jnp.int32),
        jnp.ones((2, 256), jnp.float32),
        jnp.ones((32,), jnp.float32),
    )
    lowered = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",))
    hlo = lowered.as_text()
    assert hlo.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    assert (
        "output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [2], operand_index = 8" in hlo
    )
    split = 2 if layout == "interleaved" else 4  # halves: half the programs, the split sized again (up to 2x)
    assert 'name = "_mx_fused_gemm_kernel"' in hlo and f"grid_z = {split} : i32" in hlo
    assert lowered.out_info.shape == (32, 128)


def test_the_v3_kernel_refuses_an_epilogue_input_it_was_not_given():
    import quarkmoe_jax as qm
    from quarkmoe_jax.formats.fragment_layout import to_fragment_layout
    from quarkmoe_jax.formats.mx import pack_codes
    from quarkmoe_jax.kernels.base import Epilogue, TileConfig
    from quarkmoe_jax.kernels.triton import mx_gemm

    fmt = qm.MX_FORMATS["mxfp4"]
    weight = to_fragment_layout(
        qm.MXTensor(pack_codes(jnp.zeros((1, 128, 256), jnp.uint8), fmt), jnp.zeros((1, 128, 8), jnp.uint8), fmt)
    )
    with pytest.raises(ValueError, match="applies row_weights but none was given"):
        mx_gemm.mx_fused_gemm(
            jnp.ones((16, 256), jnp.bfloat16),
            weight,
            jnp.zeros((1,), jnp.int32),
            config=TileConfig(16, 128, 4, 3, fused_epilogue=True),
            epilogue=Epilogue(row_weights=True),
            n_out=128,
            out_dtype=jnp.bfloat16,
        )
