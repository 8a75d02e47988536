"""The Mosaic GPU side of the v2 kernel decision (issue "MX kernels v2"): how fast JAX's own Hopper
mixed-type Mosaic GPU matmul (``jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu``: narrow
weights converted in registers, wgmma) streams weights at the size of Mixtral's GEMM1 at 16 tokens.

    python benchmarks/prototype_mosaic_mixed.py --json out.json

It computes ``W[8 * 28672, 4096] @ X^T[4096, 16]`` with int8 weights (the narrowest type that kernel ships;
its decode is one convert per element, so it bounds from above what an MXFP4 decode in Mosaic GPU would
reach before its extra integer work), over a few tile configs; CUPTI time after an L2 flush, TB/s over the
weight bytes. The Triton-language v2 kernel's figure for the same GEMM comes from
``benchmarks/tune_triton_mx.py`` (``mixtral`` T=16 ``gemm1``, MXFP4: half the bytes per weight).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.moe_bench import timeit  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8 * 2 * 14336)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    w = jax.random.randint(jax.random.key(0), (args.rows, args.k), -128, 127, jnp.int8)
    x_t = jax.random.normal(jax.random.key(1), (args.k, args.tokens), jnp.bfloat16)
    results = []
    for tile_m, tile_k, steps in ((64, 128, 4), (128, 128, 4), (128, 256, 3), (64, 256, 4)):
        config = mixed.TuningConfig(
            tile_m=tile_m,
            tile_n=args.tokens,
            tile_k=tile_k,
            max_concurrent_steps=steps,
            epi_tile_n=None,
            epi_tile_m=64,
            wg_dimension=mixed.MatmulDimension.M,
        )
        try:
            us = timeit(
                lambda w, x, config=config: mixed.mixed_matmul_kernel(w, x, out_dtype=jnp.float32, config=config),
                [(w, x_t)],
                repeats=args.repeats,
            )
        except Exception as e:  # noqa: BLE001 - configs the kernel rejects
            results.append({"config": [tile_m, tile_k, steps], "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(results[-1], flush=True)
            continue
        tbps = w.nbytes / us / 1e6
        results.append({"config": [tile_m, tile_k, steps], "us": us, "tbps_weights": tbps})
        print(f"mosaic mixed int8 x bf16 tile_m={tile_m} tile_k={tile_k} steps={steps}: {us:9.1f} us {tbps:.2f} TB/s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"device": jax.devices()[0].device_kind, "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
