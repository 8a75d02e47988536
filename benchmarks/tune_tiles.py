"""Tile sweep for the Pallas grouped-GEMM kernels on one GPU: the numbers behind ``kernels/tiles.json``'s Pallas rows.

    python benchmarks/tune_tiles.py --shapes mixtral gpt_oss --tokens 1 16 256 4096 --json out.json

For each shape and token count it builds the real dispatch (uniform random routing) and times GEMM1
(gated silu epilogue) and GEMM2 (router-weight epilogue) separately, for MXFP4 weights in the kernel layout
and for bfloat16 weights (the same kernel with dense tiles: our bf16 grouped matmul), over a small grid of
tile configs per regime. CUPTI kernel time, median of ``--repeats``; weights rotated beyond L2; random
(never zero) inputs. Prints the best config per (shape, T, GEMM, weights) and writes every sample as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.moe_bench import SHAPES, routing, timeit, weight_copies
from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.kernel_layout import chunk_layout_qarray
from quarkmoe_jax.formats.mx import mx_format
from quarkmoe_jax.kernels.base import Epilogue, TileConfig, regime
from quarkmoe_jax.kernels.pallas import PALLAS
from quarkmoe_jax.kernels.pallas import grouped_gemm as grouped_gemm_module
from quarkmoe_jax.kernels.pallas.grouped_gemm import dequantize_to_bfloat16, grouped_gemm
from quarkmoe_jax.moe.pair_sort import sort_pairs, tile_rows

CANDIDATES = {
    "decode": [
        TileConfig(16, bn, 4, 3, u, swap, split)
        for swap, bn, u, split in itertools.product((False, True), (64, 128), (1, 2), (1, 2, 4))
    ],
    "mid": [TileConfig(bm, bn, 4, s) for bm, bn, s in itertools.product((32, 64), (64, 128), (3,))],
    "prefill": [TileConfig(bm, bn, w, 3) for bm, bn, w in itertools.product((64, 128), (128, 256), (4, 8))],
}


def random_kernel_weights(key, experts: int, n: int, k: int, fmt: str) -> QArray:
    """Random codes (uniform bytes) and E8M0 scales near 2^-7: realistic bit patterns, never zeros."""
    f = mx_format(fmt)
    k1, k2, k3 = jax.random.split(key, 3)
    nibbles = jax.random.randint(k1, (experts, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    high = None
    if f.bits == 6:
        high = jax.random.randint(k2, (experts, n, k // 4), 0, 256, jnp.int32).astype(jnp.uint8)
    scales = jax.random.randint(k3, (experts, n, k // 32), 115, 125, jnp.int32).astype(jnp.uint8)
    return chunk_layout_qarray(nibbles, high, scales, f, 128)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["mixtral"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 4096])
    parser.add_argument("--weights", nargs="+", default=["mxfp4", "bf16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode", default=None, choices=["asm", "jnp"], help="MXFP4 decoder (default: the kernel's)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.decode:
        grouped_gemm_module.DECODE = args.decode
    samples = []
    for shape, tokens, kind in itertools.product(args.shapes, args.tokens, args.weights):
        e, k, h, i = SHAPES[shape]
        ids = routing(jax.random.key(tokens), tokens, e, k, False)
        touched = int(np.unique(np.asarray(ids)).size)
        reg = regime(tokens * k / min(e, tokens * k))
        pairs = sort_pairs(ids, jnp.ones((tokens,), bool), None, e)
        for gemm in ("gemm1", "gemm2"):
            n_out, n_rows, k_dim = (i, 2 * i, h) if gemm == "gemm1" else (h, h, i)
            bytes_per_param = 0.53125 if kind == "mxfp4" else 2.0
            copies = weight_copies(int(touched * n_rows * k_dim * bytes_per_param))
            if kind == "bf16":
                ws = [
                    jax.random.normal(jax.random.key(c), (e, n_rows, k_dim), jnp.bfloat16) * 0.02 for c in range(copies)
                ]
            else:
                ws = [random_kernel_weights(jax.random.key(c), e, n_rows, k_dim, kind) for c in range(copies)]
            flops = 2.0 * tokens * k * n_rows * k_dim
            moved = touched * n_rows * k_dim * bytes_per_param
            best = None
            for config in CANDIDATES[reg]:
                if n_out % config.block_n:
                    continue
                tiled = tile_rows(pairs, config.block_m)
                m_pad = tiled.tile_expert.shape[0] * config.block_m
                a = jax.random.normal(jax.random.key(7), (m_pad, k_dim), jnp.bfloat16)
                rw = jax.random.uniform(jax.random.key(8), (m_pad,), jnp.float32)
                epilogue = Epilogue("silu", gated=True) if gemm == "gemm1" else Epilogue(row_weights=True)

                launch = PALLAS.fit_tile(config, n_out, ws[0], tiled.tile_expert.shape[0])  # split_k fitted

                def fn(a, w, te, rw, config=launch, epilogue=epilogue, n_out=n_out):
                    return grouped_gemm(
                        a,
                        w,
                        te,
                        None,
                        rw if epilogue.row_weights else None,
                        n_out=n_out,
                        config=config,
                        epilogue=epilogue,
                        out_dtype=jnp.bfloat16,
                    )

                try:
                    us = timeit(fn, [(a, w, tiled.tile_expert, rw) for w in ws], repeats=args.repeats)
                except Exception as err:  # a config the compiler rejects (shared memory, registers)
                    print(f"  {shape} T={tokens} {gemm} {kind} {config}: {type(err).__name__}: {str(err)[:160]}")
                    continue
                row = {
                    "shape": shape,
                    "tokens": tokens,
                    "gemm": gemm,
                    "weights": kind,
                    "decode": grouped_gemm_module.DECODE,
                    "config": list(config.__dict__.values()),
                    "us": us,
                    "tbps": moved / us / 1e6,
                    "tflops": flops / us / 1e6,
                }
                samples.append(row)
                if best is None or us < best["us"]:
                    best = row
            if kind != "bf16" and reg == "prefill":  # the prefill path's dequantize pass (all experts)
                us = timeit(lambda w: dequantize_to_bfloat16(w), [(w,) for w in ws], repeats=args.repeats)
                total = e * n_rows * k_dim
                row = {
                    "shape": shape,
                    "tokens": tokens,
                    "gemm": gemm,
                    "weights": kind,
                    "config": "dequantize",
                    "us": us,
                    "tbps": total * (bytes_per_param + 2) / us / 1e6,
                    "tflops": 0.0,
                }
                samples.append(row)
                print(
                    f"{shape:<8} T={tokens:<5} {gemm} {kind:<6} dequantize pass {us:9.1f} us "
                    f"{row['tbps']:6.3f} TB/s (read + write)",
                    flush=True,
                )
            if best:
                print(
                    f"{shape:<8} T={tokens:<5} {gemm} {kind:<6} best {best['config']} {best['us']:9.1f} us "
                    f"{best['tbps']:6.3f} TB/s {best['tflops']:7.1f} TF/s",
                    flush=True,
                )
            del ws
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "samples": samples}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
