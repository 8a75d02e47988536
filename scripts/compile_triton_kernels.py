"""Compile the v2 MX (MXFP4, MXFP6) Triton kernel for sm_90a without a GPU and report what the compiler made of it.

Triton (the GPU image's 3.6.0) is in the dev extra, so the project's venv runs it:

    .venv/bin/python scripts/compile_triton_kernels.py [--out /tmp/ttgir]

Per tile config it prints registers / spills (ptxas -v), shared memory, whether the main loop has wgmma, the
weight-path shared-memory ops, and the widest weight loads, so a layout regression (a decoded tile going
through shared memory, byte loads, spills) is caught before any device time is spent. Each launch is
``mx_gemm.launch_parameters``'s and each compile ``launch.compile_report``'s (tests/moe/test_triton_launch.py
checks the tables' tiles the same way in CI).
"""

from __future__ import annotations

import argparse
import os
import re

from quarkmoe_jax.kernels.base import TileConfig
from quarkmoe_jax.kernels.triton import launch
from quarkmoe_jax.kernels.triton import mx_gemm as mx

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
POINTERS = ("int32", "bfloat16", "uint8", "uint8", "uint8", "float32")  # tile_expert, a, w, s, low, out


def compile_one(block_m, block_n, warps, stages, prefetch, exact, fmt, out_dir=None):
    """The report of one tile: Mixtral's GEMM1 (N = 28672, K = 4096), 4 row tiles, no split."""
    config = TileConfig(block_m, block_n, warps, stages, prefetch_l2=prefetch)
    params = mx.launch_parameters(num_tiles=4, n_pad=28672, k_pad=4096, fmt_name=fmt, exact=exact, config=config)
    params.pop("grid")
    report = launch.compile_report(mx._mx_fragment_gemm_kernel, POINTERS, **params)
    ttgir, ptx = report.ttgir, report.ptx
    tag = f"{fmt}_m{block_m}_n{block_n}_w{warps}_s{stages}_pf{prefetch}_{'exact' if exact else 'fast'}"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for kind, text in (("ttgir", ttgir), ("ptx", ptx)):
            with open(os.path.join(out_dir, f"{tag}.{kind}"), "w") as f:
                f.write(text)
    loop = ttgir[ttgir.find("scf.for") :]
    return {
        "config": tag,
        "registers": report.registers,
        "spill_bytes": report.spill_bytes,
        "shared_bytes": report.shared_bytes,
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
