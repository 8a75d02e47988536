"""Sharded MoE benchmark: expert / tensor parallel layers on a multi-GPU host, or one shard's work on one GPU.

Same shapes and schemes as ``moe_bench.py``. On a host with N GPUs (NVLink multicast left off):

    python benchmarks/sharded_bench.py --shapes mixtral deepseek_v3 --schemes w_mxfp4 \\
        w8a8_int8_channel_dynamic_token --tokens 16 4096 --meshes ep8 tp8 ep4xtp2 \\
        --json benchmarks/results/h200x8_sharded.json

Per (shape, scheme, tokens) it times, in one process: the layer on one GPU (``backend``), then each mesh
with both exchanges; it reports wall time per layer (median of ``--repeats`` after warm-up; inputs rotated),
the scaling against one GPU, and the bytes each device sends (:func:`quarkmoe_jax.moe.sharding.exchange_bytes`).

``--one-shard ep,tp [ep,tp ...]`` (one GPU; CUPTI kernel time, as ``moe_bench.py``): times the work one
shard of each ``ep x tp`` mesh does under the all-gather exchange (its ``E / ep`` experts and ``I / tp``
slice on every token of the group) next to the whole layer: the compute floor of a sharded run, without
its communication.

``--cpu-devices N`` runs on N host devices (a functional check; CPU collectives say nothing about NCCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time

import jax
import numpy as np


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mixtral", "deepseek_v3"])
    parser.add_argument("--schemes", nargs="+", default=["w_mxfp4", "w8a8_int8_channel_dynamic_token"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 4096])
    parser.add_argument("--meshes", nargs="+", default=["ep8", "tp8", "ep4xtp2"], help="epN, tpN, epNxtpM, dpNxepM")
    parser.add_argument("--exchanges", nargs="+", default=["all_gather", "all_to_all"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--one-shard", nargs="+", default=None, help="ep,tp [ep,tp ...]: time one shard's work on one device"
    )
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def mesh_sizes(name: str) -> dict[str, int]:
    """``ep4xtp2`` -> ``{"expert": 4, "tensor": 2}`` (``dp``, ``ep``, ``tp`` parts)."""
    axes = {"dp": "data", "ep": "expert", "tp": "tensor"}
    sizes = {"data": 1, "expert": 1, "tensor": 1}
    for part in name.split("x"):
        if part[:2] not in axes or not part[2:].isdigit():
            raise SystemExit(f"bad mesh {name!r}: use parts like ep8, tp2, dp2 joined by x")
        sizes[axes[part[:2]]] = int(part[2:])
    return sizes


def wall_us(fn, arg_sets, repeats: int, warmup: int = 3) -> float:
    """Median wall time (microseconds) of a jitted call, synchronized, cycling through ``arg_sets``."""
    for n in range(warmup):
        jax.block_until_ready(fn(*arg_sets[n % len(arg_sets)]))
    samples = []
    for n in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[n % len(arg_sets)]))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main(argv=None) -> int:
    args = _parse(argv)
    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import moe_bench as mb

    from quarkmoe_jax.moe import op
    from quarkmoe_jax.moe import sharding as sh
    from quarkmoe_jax.moe.shard_layout import kernel_layout_per_shard, shard_params
    from quarkmoe_jax.moe.sharded import sharded_moe_experts
    from quarkmoe_jax.schemes import MoEShape

    devices = jax.devices()
    rows = []
    for shape_name in args.shapes:
        e, k, h, i = mb.SHAPES[shape_name]
        for scheme in args.schemes:
            config = mb.scheme_config(scheme)
            for tokens in args.tokens:
                p = mb.make_problem(shape_name, tokens, skewed=False)
                shape = MoEShape(e, h, i)
                params = mb.expert_params(p, config, kernel_layout=None)
                inputs = [(p.x, p.weights, p.ids)]

                def single(x, w, ids, params, config=config, shape=shape):
                    return op.moe_experts(x, w, ids, params, config, shape, backend=args.backend)

                one = jax.jit(single)
                base = {"shape": shape_name, "scheme": scheme, "tokens": tokens}
                if not args.one_shard:
                    kernel_params = mb.expert_params(
                        p, config, kernel_layout=None if args.backend == "emulation" else "pallas"
                    )
                    us = wall_us(one, [(*a, kernel_params) for a in inputs], args.repeats)
                    rows.append({**base, "mesh": "1 device", "exchange": "-", "us": us, "speedup": 1.0})
                    print(_format(rows[-1]), flush=True)
                    for mesh_name in args.meshes:
                        sizes = mesh_sizes(mesh_name)
                        if np.prod(list(sizes.values())) > len(devices):
                            print(f"skip {mesh_name}: needs {np.prod(list(sizes.values()))} devices", flush=True)
                            continue
                        mesh = sh.moe_mesh(**sizes)
                        for exchange in args.exchanges if sizes["expert"] > 1 else ["all_gather"]:  # noqa: E501
                            sharding = sh.MoESharding(mesh, exchange=exchange)
                            sharded = shard_params(params, shape, sharding)
                            if args.backend != "emulation":
                                sharded = kernel_layout_per_shard(sharded, sharding)

                            def layer(x, w, ids, params, sharding=sharding, config=config, shape=shape):
                                return sharded_moe_experts(
                                    x, w, ids, params, config, shape, sharding, backend=args.backend
                                )

                            us_sharded = wall_us(jax.jit(layer), [(*a, sharded) for a in inputs], args.repeats)
                            sent = sh.exchange_bytes(tokens, h, k, sharding)[exchange]
                            rows.append(
                                {
                                    **base,
                                    "mesh": mesh_name,
                                    "exchange": exchange,
                                    "us": us_sharded,
                                    "speedup": us / us_sharded,
                                    "bytes_sent_per_device": sent,
                                }
                            )
                            print(_format(rows[-1]), flush=True)
                else:
                    # one device: the kernels' own time (CUPTI on a GPU), as moe_bench measures it
                    kernel_params = mb.expert_params(
                        p, config, kernel_layout=None if args.backend == "emulation" else "pallas"
                    )
                    us = mb.timeit(one, [(*a, kernel_params) for a in inputs], args.repeats)
                    rows.append({**base, "mesh": "1 device", "exchange": "-", "us": us, "speedup": 1.0})
                    print(_format(rows[-1]), flush=True)
                    for spec in args.one_shard:
                        ep, tp = (int(v) for v in spec.split(","))
                        shard_fn, shard_args = _one_shard_work(p, config, ep, tp, inputs, args.backend)
                        us_shard = mb.timeit(shard_fn, shard_args, args.repeats)
                        rows.append(
                            {
                                **base,
                                "mesh": f"one shard of ep{ep}xtp{tp}",
                                "exchange": "-",
                                "us": us_shard,
                                "speedup": us / us_shard,
                            }
                        )
                        print(_format(rows[-1]), flush=True)
    if args.json:
        record = {
            "date": datetime.date.today().isoformat(),
            "devices": [d.device_kind for d in devices],
            "jax": jax.__version__,
            "timer": mb.TIMER if args.one_shard else "wall",
            "argv": sys.argv[1:] if argv is None else argv,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


def _one_shard_work(problem, config, ep: int, tp: int, inputs, backend: str):
    """``(jitted function, argument tuples)``: the experts forward one shard of an ``ep x tp`` mesh runs under
    the all-gather exchange: its ``E / ep`` experts and its ``I / tp`` slice (32-aligned) on every token."""
    import jax.numpy as jnp
    import moe_bench as mb

    from quarkmoe_jax.checkpoint.loader import linear_expert_map
    from quarkmoe_jax.moe import op
    from quarkmoe_jax.schemes import MoEShape

    e, i = problem.experts, problem.intermediate
    per_shard_i = -(-i // tp)
    local_shape = MoEShape(-(-e // ep), problem.hidden, per_shard_i if tp == 1 else -(-per_shard_i // 32) * 32)
    local_problem = dataclasses.replace(
        problem, experts=local_shape.num_experts, intermediate=local_shape.intermediate_size
    )
    local_params = mb.expert_params(local_problem, config, kernel_layout=None if backend == "emulation" else "pallas")
    expert_map = jnp.asarray(linear_expert_map(e, ep, 0)) if ep > 1 else None

    def shard_work(x, w, ids, params):
        return op.moe_experts(
            x, w, ids, params, config, local_shape, expert_map=expert_map, num_global_experts=e, backend=backend
        )

    return jax.jit(shard_work), [(*a, local_params) for a in inputs]


def _format(r: dict) -> str:
    sent = r.get("bytes_sent_per_device")
    sent = "" if sent is None else f"  sent/device {sent['total'] / 1e6:8.2f} MB"
    return (
        f"{r['shape']:12s} {r['scheme']:34s} T={r['tokens']:5d}  {r['mesh']:22s} {r['exchange']:10s} "
        f"{r['us']:10.1f} us  x{r['speedup']:5.2f}{sent}"
    )


if __name__ == "__main__":
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    raise SystemExit(main())
