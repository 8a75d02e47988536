"""Launching a ``@triton.jit`` kernel from a jitted JAX function, one of two ways (:data:`LAUNCHERS`):

- ``"jax_triton"``: ``jax_triton.triton_call`` — Triton compiles the kernel to a cubin at lowering time and
  jax-triton's own custom call launches it. That custom call uses XLA's legacy custom-call API, which XLA does
  not put into a command buffer (CUDA graph): every such kernel splits the step's command buffers and costs a
  host launch of its own (docs/performance.md, the eighteenth session's decode-step profile).
- ``"xla"``: the kernel's Triton IR (TTIR, from Triton's own front end, :func:`kernel_ttir`) handed to XLA's
  own Triton custom call (``__gpu$xla.gpu.triton``, the one Pallas lowers to), which XLA compiles with its
  bundled Triton and can capture in a command buffer like its own fusions.

The TTIR is Triton 3.6's and XLA reads it with its own Triton dialect, so an op whose syntax changed
between the two fails at lowering (jaxlib 0.12.1 no longer parses ``tt.load``'s ``cacheModifier = cg``: the
kernels use no cache modifiers); CI lowers the MX kernels' variants to XLA's Triton call in both venvs
(tests/moe/test_triton_launch.py; jax-triton's own lowering needs a GPU). Measured on an H100
(docs/performance.md, 2026-12-08): XLA's build of the v2 kernel runs 0.5-9 % slower per layer; what it may
save, the launches of a decode step outside command buffers, is not measured yet.

:func:`launcher` reads ``$QUARKMOE_TRITON_LAUNCHER`` (default ``"jax_triton"``). Both take the same kernel,
arguments, grid and constants; the kernel's pointer arguments are the call's operands then its outputs (as
jax-triton passes them), every other argument a ``tl.constexpr`` given by keyword.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir

__all__ = ["LAUNCHERS", "LAUNCHER_ENV", "launcher", "triton_call", "kernel_ttir", "CompileReport", "compile_report"]

LAUNCHERS = ("jax_triton", "xla")
LAUNCHER_ENV = "QUARKMOE_TRITON_LAUNCHER"
XLA_TRITON_TARGET = "__gpu$xla.gpu.triton"

_TRITON_TYPES = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float8_e4m3fn": "fp8e4nv",
    "int64": "i64",
    "int32": "i32",
    "uint32": "u32",
    "int8": "i8",
    "uint8": "u8",
}


def launcher() -> str:
    """The launcher in use: ``$QUARKMOE_TRITON_LAUNCHER`` (one of :data:`LAUNCHERS`), else ``"jax_triton"``."""
    name = os.environ.get(LAUNCHER_ENV, "").strip() or "jax_triton"
    if name not in LAUNCHERS:
        raise ValueError(f"{LAUNCHER_ENV}={name!r}: expected one of {', '.join(LAUNCHERS)}")
    return name


def triton_call(*args, kernel, out_shape, grid, num_warps: int, num_stages: int, input_output_aliases=None,
                **constants):
    """``kernel`` over ``grid`` on ``args`` (JAX arrays) -> one array of ``out_shape`` (a
    ``jax.ShapeDtypeStruct``), or a list of them for a list of shapes, launched by :func:`launcher`'s way.
    ``input_output_aliases``: ``{operand index: output index}``, the output written in place of the operand
    (the kernel sees its buffer twice, among the operands and among the outputs)."""
    aliases = dict(input_output_aliases or {})
    if launcher() == "jax_triton":
        import jax_triton as jt

        return jt.triton_call(
            *args,
            kernel=kernel,
            out_shape=out_shape,
            grid=grid,
            num_warps=num_warps,
            num_stages=num_stages,
            input_output_aliases=aliases,
            **constants,
        )
    several = isinstance(out_shape, (list, tuple))
    shapes = tuple(out_shape) if several else (out_shape,)
    outs = _xla_triton_p.bind(
        *args,
        kernel=kernel,
        out_shapes=tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes),
        grid=tuple(grid) + (1,) * (3 - len(grid)),
        num_warps=num_warps,
        num_stages=num_stages,
        aliases=tuple(sorted(aliases.items())),
        constants=tuple(sorted(constants.items())),
    )
    return list(outs) if several else outs[0]


def _source(kernel, pointer_dtypes: tuple[str, ...], constants: dict):
    """``kernel`` as Triton's front end takes it: its pointer arguments of ``pointer_dtypes`` (numpy dtype names)
    16-byte aligned, as jax-triton and XLA pass buffers, every other argument one of ``constants``."""
    from triton.compiler.compiler import ASTSource

    signature = {kernel.arg_names[i]: "*" + _TRITON_TYPES[d] for i, d in enumerate(pointer_dtypes)}
    signature.update({name: "constexpr" for name in constants})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(pointer_dtypes))}
    return ASTSource(kernel, signature, constants, aligned)


@functools.cache
def kernel_ttir(kernel, pointer_dtypes: tuple[str, ...], constants: tuple, num_warps: int, num_stages: int, cc: int):
    """``(ttir, name)``: ``kernel`` specialised to ``constants`` and to 16-byte-aligned pointers of
    ``pointer_dtypes`` (numpy dtype names), as Triton's front end and its TTIR passes for compute capability
    ``cc`` (e.g. 90) leave it, printed without locations; ``name`` is its function's symbol."""
    import triton._C.libtriton as libtriton
    from triton.backends.nvidia.compiler import CUDABackend, GPUTarget
    from triton.compiler.code_generator import ast_to_ttir

    backend = CUDABackend(GPUTarget("cuda", cc, 32))
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1})
    context = libtriton.ir.context()
    libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    module = ast_to_ttir(
        kernel,
        _source(kernel, pointer_dtypes, dict(constants)),
        options=options,
        codegen_fns=backend.get_codegen_implementation(options),
        context=context,
        module_map=backend.get_module_map(),
    )
    module = backend.make_ttir(module, {}, options, cc)
    name = module.get_entry_func_name()
    return module.str_nodebug(), name


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What Triton and ptxas made of a kernel for one launch: ``registers`` per thread, ``spill_bytes`` (spill
    stores + loads per thread), ``shared_bytes`` (dynamic shared memory), the ``ttgir`` and the ``ptx``."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    ttgir: str
    ptx: str


def compile_report(
    kernel, pointer_dtypes: tuple[str, ...], *, num_warps: int, num_stages: int, cc: int = 90, **constants
) -> CompileReport:
    """Compile ``kernel`` as a launch would (16-byte-aligned pointers of ``pointer_dtypes``, numpy dtype
    names: the operands then the outputs; ``constants`` its ``tl.constexpr`` arguments) for ``sm_{cc}a``, on
    any machine (Triton's compiler and ptxas need no GPU), and read ptxas's resource report."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    compiled = triton_compile(
        _source(kernel, pointer_dtypes, constants),
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    ptxas = get_ptxas(cc)
    ptxas = getattr(ptxas, "path", None) or ptxas[0]
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        command = [ptxas, "-v", "--gpu-name", arch, source, "-o", os.path.join(folder, "kernel.cubin")]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    spill_bytes = int(spills.group(1)) + int(spills.group(2))
    return CompileReport(registers, spill_bytes, compiled.metadata.shared, compiled.asm["ttgir"], ptx)


def _compute_capability() -> int:
    major, minor = str(jax.devices()[0].compute_capability).split(".")[:2]
    return 10 * int(major) + int(minor)


def _abstract_eval(*_, out_shapes, **__):
    return [jax_core.ShapedArray(s.shape, s.dtype) for s in out_shapes]


def _lowering(ctx, *operands, kernel, out_shapes, grid, num_warps, num_stages, aliases, constants):
    dtypes = tuple(jnp.dtype(a.dtype).name for a in (*ctx.avals_in, *ctx.avals_out))
    ttir, name = kernel_ttir(kernel, dtypes, constants, num_warps, num_stages, _compute_capability())
    context = mlir.JaxIrContext()
    context.append_dialect_registry(mlir.upstream_dialects)
    from jax._src.lib.triton import dialect as tt_dialect

    tt_dialect.register_dialect(context)
    context.load_all_available_dialects()
    with context:
        bytecode = io.BytesIO()
        ir.Module.parse(ttir).operation.write_bytecode(bytecode)
    result_types = [ir.RankedTensorType.get(s.shape, mlir.dtype_to_ir_type(jnp.dtype(s.dtype))) for s in out_shapes]
    row_major = lambda avals: [list(reversed(range(len(a.shape)))) for a in avals]  # noqa: E731
    return mlir.custom_call(
        call_target_name=XLA_TRITON_TARGET,
        result_types=result_types,
        operands=list(operands),
        backend_config=dict(
            name=ir.StringAttr.get(name),
            ir=ir.StringAttr.get(bytecode.getvalue()),
            num_stages=mlir.i32_attr(num_stages),
            num_warps=mlir.i32_attr(num_warps),
            grid_x=mlir.i32_attr(grid[0]),
            grid_y=mlir.i32_attr(grid[1]),
            grid_z=mlir.i32_attr(grid[2]),
            debug=ir.BoolAttr.get(False),
        ),
        api_version=4,
        operand_layouts=row_major(ctx.avals_in),
        result_layouts=row_major(ctx.avals_out),
        operand_output_aliases=dict(aliases),
    ).results


_xla_triton_p = jax_core.Primitive("quarkmoe_xla_triton_call")
_xla_triton_p.multiple_results = True
_xla_triton_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_xla_triton_p, _lowering, platform="cuda")
