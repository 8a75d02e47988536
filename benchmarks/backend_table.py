"""Regenerate the table ``backend="auto"`` follows, from ``moe_bench.py`` results.

    python benchmarks/moe_bench.py --shapes mixtral gpt_oss --tokens 1 16 256 4096 --json results.json
    python benchmarks/backend_table.py results.json            # prints the table
    python benchmarks/backend_table.py results.json --write    # merges it into kernels/backend_table.json

Per device kind, scheme family (:attr:`quarkmoe_jax.contracts.MoEQuantConfig.family`) and token count, the
kernel backends (not the emulation) are ranked by the geometric mean of their times over the rows every one
of them ran (shapes, schemes of the family, routings). Documents count in the order of their dates: a
newer one's rows for a device, family and token count replace all older rows of them (a kernel that
changed is ranked on its new times only). Entries of other device kinds are kept.

Each row records the kernel generation of every backend it ranks (``moe_bench.py`` writes them in its
``meta.kernel_generations``; a document without them is dated: a backend's current generation if the run is
not older than the day it landed, the one before otherwise). ``auto`` ignores a row whose generation of some
backend is older than that backend's current one (:mod:`quarkmoe_jax.kernels.registry`).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from moe_bench import scheme_config  # noqa: E402

from quarkmoe_jax.kernels.registry import (  # noqa: E402
    BACKEND_TABLE_PATH,
    KERNEL_BACKENDS,
    weight_class_of_family,
)


def generations_of(doc: dict, weight_class: str) -> dict[str, int]:
    """``{backend: kernel generation}`` a moe_bench document timed for ``weight_class`` ("mx" / "dense")."""
    recorded = doc["meta"].get("kernel_generations")
    if recorded is not None:
        return {name: by_class[weight_class] for name, by_class in recorded.items()}
    date = doc["meta"].get("date", "")[:10]
    out = {}
    for name, backend in KERNEL_BACKENDS.items():
        current = backend.generations[weight_class]
        out[name] = current.number if date >= current.since else current.number - 1
    return out


def rank_backends(results: list[dict]) -> dict:
    """``{device: {family: {tokens: {"backends": [fastest first], "generations": {backend: n}}}}}`` from
    moe_bench JSON documents. Runs of an experiment (the v3 MX kernel forced on, or the Triton kernels
    launched another way than the default) time kernels ``auto`` does not run: they are left out."""
    times = {}  # (device, family, tokens) -> {(shape, scheme, skewed): {backend: us}}
    generations = {}  # (device, family, tokens) -> {backend: generation}
    results = [
        doc
        for doc in results
        if not doc["meta"].get("mx_fused_epilogue") and doc["meta"].get("triton_launcher", "jax_triton") == "jax_triton"
    ]
    for doc in sorted(results, key=lambda d: d["meta"].get("date", "")):
        device = doc["meta"]["device"]
        measured = collections.defaultdict(dict)
        for row in doc["rows"]:
            if row["backend"] in ("emulation", "module"):  # the oracle, and the module path (auto itself)
                continue
            key = (device, scheme_config(row["scheme"]).family, row["tokens"])
            case = (row["shape"], row["scheme"], row["skewed"])
            measured[key].setdefault(case, {})[row["backend"]] = row["us"]
        times.update(measured)
        for key in measured:
            generations[key] = generations_of(doc, weight_class_of_family(key[1]))
    order: dict = {}
    for (device, family, tokens), cases in sorted(times.items()):
        backends = sorted({b for per_case in cases.values() for b in per_case})
        common = [per_case for per_case in cases.values() if set(per_case) == set(backends)]
        if not common:  # no case ran every backend: rank what each ran alone
            common = list(cases.values())
        score = {
            b: math.exp(sum(math.log(c[b]) for c in common if b in c) / max(1, sum(b in c for c in common)))
            for b in backends
        }
        ranked = sorted(backends, key=lambda b: score[b])
        timed = generations[(device, family, tokens)]
        row = {"backends": ranked, "generations": {b: timed[b] for b in ranked if b in timed}}
        order.setdefault(device, {}).setdefault(family, {})[str(tokens)] = row
    return order


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="moe_bench.py --json outputs")
    parser.add_argument("--write", action="store_true", help=f"merge into {BACKEND_TABLE_PATH}")
    args = parser.parse_args(argv)
    docs = [json.loads(pathlib.Path(path).read_text()) for path in args.results]
    order = rank_backends(docs)
    for device, families in order.items():
        for family, by_tokens in families.items():
            ranked = (f"T={t}: {'>'.join(row['backends'])}" for t, row in by_tokens.items())
            print(f"{device:<24} {family:<12} " + "  ".join(ranked))
    if args.write:
        table = json.loads(BACKEND_TABLE_PATH.read_text()) if BACKEND_TABLE_PATH.exists() else {"order": {}}
        table["order"].update(order)
        table["meta"] = {
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sources": sorted({str(pathlib.Path(p).name) for p in args.results}),
            "how": "benchmarks/backend_table.py: geometric mean of moe_bench.py times per device, family, tokens",
        }
        BACKEND_TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BACKEND_TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
