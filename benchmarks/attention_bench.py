"""Paged attention benchmark: the engine's attention backends on one layer's cache, against the memory floor.

Run on a GPU (random inputs, no download):

    python benchmarks/attention_bench.py --json benchmarks/results/h200_attention.json

Cases (bfloat16, cache blocks of 16): gpt-oss-120b's attention (64 query heads, 8 kv heads of 64, sinks; full
and 128-position sliding layers) and DeepSeek-V3's absorbed latent attention (128 heads over one latent of 512
+ a rotary key of 64) at decode (batch 1, 8, 64, each sequence with ``--context`` cached positions and one new
token) and at prefill (one sequence of ``--prefill`` new tokens). Per case and backend: the kernel time
(``moe_bench.timeit``: CUPTI kernel time after an L2 flush, median of ``--repeats``, inputs rotated over three
caches), the largest difference from the XLA oracle, and the memory floor: the bytes the step must read (the
cached keys and values each sequence may see, the queries, the output) over the copy bandwidth measured in the
same run. The XLA backend gathers each token's whole block table: at prefill that is ``tokens x context``
positions, so it is timed only at decode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from moe_bench import copy_tbps, timeit  # noqa: E402

from quarkmoe_jax.models.paged import PagedAttention, PagedBatch  # noqa: E402

BLOCK_SIZE = 16
GPT_OSS = dict(hq=64, keys={"k": (8, 64)}, value=("v", (8, 64)), scale=0.125, sinks=True)
DEEPSEEK_V3 = dict(hq=128, keys={"latent": (1, 512), "k_rot": (1, 64)}, value=None, scale=0.1352, sinks=False)
CASES = {
    "gpt_oss_full": dict(GPT_OSS, window=None),
    "gpt_oss_sliding": dict(GPT_OSS, window=128),
    "deepseek_v3_latent": dict(DEEPSEEK_V3, window=None),
}


def step_batch(seqs: int, context: int, new_tokens: int, rng) -> tuple[PagedBatch, int]:
    """``seqs`` sequences with ``context`` cached positions each and ``new_tokens`` new ones, blocks shuffled."""
    per_seq = -(-(context + new_tokens) // BLOCK_SIZE)
    num_blocks = seqs * per_seq
    tables = rng.permutation(num_blocks).reshape(seqs, per_seq).astype(np.int32)
    seq = np.repeat(np.arange(seqs, dtype=np.int32), new_tokens)
    pos = np.tile(np.arange(context, context + new_tokens, dtype=np.int32), seqs)
    slots = tables[seq, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    last = (np.arange(1, seqs + 1) * new_tokens - 1).astype(np.int32)
    valid = np.ones(seq.size, bool)
    return PagedBatch(*(jnp.asarray(a) for a in (seq, pos, slots, tables, last, valid))), num_blocks


def run_case(name: str, spec: dict, seqs: int, context: int, new_tokens: int, copy_tbps: float, repeats: int):
    rng = np.random.default_rng(0)
    batch, num_blocks = step_batch(seqs, context, new_tokens, rng)
    names = list(spec["keys"]) + ([spec["value"][0]] if spec["value"] else [])
    dims = {**spec["keys"], **({spec["value"][0]: spec["value"][1]} if spec["value"] else {})}
    caches = []
    for i in range(3):  # rotated beyond L2
        key = jax.random.key(i)
        caches.append(
            {
                n: jax.random.normal(jax.random.fold_in(key, j), (num_blocks, BLOCK_SIZE) + dims[n], jnp.bfloat16)
                for j, n in enumerate(names)
            }
        )
    dk = sum(d for _, d in spec["keys"].values())
    q = jax.random.normal(jax.random.key(9), (batch.positions.shape[0], spec["hq"], dk), jnp.bfloat16)
    sinks = jax.random.normal(jax.random.key(10), (spec["hq"],), jnp.float32) if spec["sinks"] else None
    keys, value = tuple(spec["keys"]), spec["value"][0] if spec["value"] else None

    def attend(backend):
        def fn(q, cache, batch):
            return PagedAttention(batch, backend).attend(
                q, cache, keys, value, scale=spec["scale"], window=spec["window"], sinks=sinks
            )

        return fn

    visible = min(context + new_tokens, spec["window"] + new_tokens) if spec["window"] else context + new_tokens
    kv_bytes = seqs * visible * sum(h * d * 2 for h, d in dims.values())
    dv = spec["value"][1][1] if spec["value"] else spec["keys"]["latent"][1]
    io_bytes = q.nbytes + q.shape[0] * spec["hq"] * dv * 2
    floor_us = (kv_bytes + io_bytes) / copy_tbps / 1e6
    row = dict(case=name, seqs=seqs, context=context, new_tokens=new_tokens, floor_us=floor_us)
    kernel_out = jax.jit(attend("pallas"))(q, caches[0], batch)
    xla_fits = seqs * new_tokens * (context + new_tokens) * sum(h * d * 2 for h, d in dims.values()) < 2**31
    if xla_fits:
        oracle = jax.jit(attend("xla"))(q, caches[0], batch)
        diff = jnp.abs(kernel_out.astype(jnp.float32) - oracle.astype(jnp.float32))
        row["max_abs_diff"] = float(diff.max())
        row["oracle_max_abs"] = float(jnp.abs(oracle.astype(jnp.float32)).max())
    args = [(q, c, batch) for c in caches]
    for backend in ("pallas", "xla"):
        if backend == "xla" and (new_tokens > 1 or not xla_fits):
            continue
        us = timeit(attend(backend), args, repeats=repeats)
        row[f"{backend}_us"] = us
        row[f"{backend}_of_floor"] = floor_us / us
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    bandwidth = copy_tbps(args.repeats, mib=512 if jax.devices()[0].platform == "gpu" else 64)
    rows = []
    print(f"{jax.devices()[0].device_kind}; copy {bandwidth:.3g} TB/s")
    header = ("case", "seqs", "ctx", "new", "floor us", "pallas us", "of floor", "xla us")
    print("{:20} {:>5} {:>6} {:>5} {:>9} {:>10} {:>8} {:>9}".format(*header))
    for name in args.cases:
        shapes = [(b, args.context, 1) for b in args.batches] + [(1, 0, args.prefill)]
        for seqs, context, new in shapes:
            row = run_case(name, CASES[name], seqs, context, new, bandwidth, args.repeats)
            rows.append(row)
            xla = f"{row['xla_us']:9.1f}" if "xla_us" in row else f"{'-':>9}"
            print(
                f"{name:20} {seqs:5} {context:6} {new:5} {row['floor_us']:9.1f} {row['pallas_us']:10.1f} "
                f"{row['pallas_of_floor']:8.2f} {xla}  diff {row.get('max_abs_diff', float('nan')):.3g}"
            )
    if args.json:
        meta = dict(
            date=datetime.date.today().isoformat(),
            device=jax.devices()[0].device_kind,
            jax=jax.__version__,
            block_size=BLOCK_SIZE,
            copy_tbps=bandwidth,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
