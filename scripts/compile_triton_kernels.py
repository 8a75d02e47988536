"""Compile the v2 MX (MXFP4, MXFP6) Triton kernel for sm_90 without a GPU and report what the compiler made of it.

Needs a venv with ``triton==3.6.0`` (the GPU image's) and jax installed (no GPU needed), e.g.

    python3.12 -m venv /tmp/tri && /tmp/tri/bin/pip install triton==3.6.0 -c constraints.txt jax jaxlib flax \\
        ml_dtypes safetensors tqdm && /tmp/tri/bin/pip install --no-deps -e .
    /tmp/tri/bin/python scripts/compile_triton_kernels.py [--out /tmp/ttgir]

Per tile config it prints registers / spills (ptxas -v), shared memory, whether the main loop has wgmma, the
weight-path shared-memory ops, and the widest weight loads, so a layout regression (a decoded tile going
through shared memory, byte loads, spills) is caught before any device time is spent.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quarkmoe_jax.kernels.triton import mx_gemm as mx

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
CONFIGS = [  # (block_m, block_n, num_warps, num_stages, prefetch_l2, exact, format)
    (16, 128, 4, 4, 0, False, "mxfp4"),
    (16, 128, 4, 3, 0, True, "mxfp4"),
    (16, 128, 4, 1, 3, False, "mxfp4"),
    (16, 256, 8, 4, 0, False, "mxfp4"),
    (16, 64, 4, 4, 0, False, "mxfp4"),
    (32, 128, 4, 4, 0, False, "mxfp4"),
    (64, 128, 4, 3, 0, False, "mxfp4"),
    (64, 256, 8, 3, 0, False, "mxfp4"),
    (16, 128, 4, 4, 0, False, "mxfp6_e3m2"),
    (16, 128, 4, 3, 0, True, "mxfp6_e2m3"),
    (16, 256, 8, 4, 0, False, "mxfp6_e2m3"),
    (64, 128, 4, 3, 0, False, "mxfp6_e3m2"),
]


def compile_one(block_m, block_n, warps, stages, prefetch, exact, fmt, out_dir=None):
    kernel = mx._mx_fragment_gemm_kernel
    pointers = {
        "tile_expert_ptr": "*i32",
        "a_ptr": "*bf16",
        "w_ptr": "*u8",
        "s_ptr": "*u8",
        "low_ptr": "*u8",
        "out_ptr": "*fp32",
    }
    constexprs = dict(
        K_UNITS=32,
        N_UNITS=28672 // 16,
        M_PAD=64,
        N_OUT=28672,
        INTERLEAVED=False,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT_K=1,
        EXACT=exact,
        PREFETCH_L2=prefetch,
        NUM_STAGES=stages,
        FP6=fmt != "mxfp4",
        E3M2=fmt == "mxfp6_e3m2",
        ELEM_BIAS=3 if fmt == "mxfp6_e3m2" else 1,
    )
    signature = {**pointers, **{k: "constexpr" for k in constexprs}}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    ptxas = subprocess.run(
        [os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", "-", "-o", "/dev/null"],
        input=ptx,
        capture_output=True,
        text=True,
    ).stderr
    tag = f"{fmt}_m{block_m}_n{block_n}_w{warps}_s{stages}_pf{prefetch}_{'exact' if exact else 'fast'}"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for kind in ("ttgir", "ptx"):
            with open(os.path.join(out_dir, f"{tag}.{kind}"), "w") as f:
                f.write(compiled.asm[kind])
    loop = ttgir[ttgir.find("scf.for") :]
    return {
        "config": tag,
        "registers": re.findall(r"Used (\d+) registers", ptxas),
        "spills": re.findall(r"(\d+) bytes spill stores", ptxas),
        "shared_bytes": compiled.metadata.shared,
        "wgmma": len(re.findall(r"wgmma.mma_async", ptx)),
        "loop_local_alloc": loop.count("ttg.local_alloc"),
        "loop_bf16_converts": len(re.findall(r"convert_layout %\S+ : tensor<\d+x\d+xbf16", loop)),
        "global_loads": sorted(set(re.findall(r"ld\.global[\.\w]*", ptx))),
        "async_copies": sorted(set(re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x\w+", ptx)))[:2],
        "shared_loads": sorted(set(re.findall(r"ld\.shared[\.\w]*", ptx))),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write each config's TTGIR and PTX here")
    args = parser.parse_args(argv)
    for config in CONFIGS:
        print(compile_one(*config, out_dir=args.out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
