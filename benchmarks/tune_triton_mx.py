"""Check and tune the v2 MX kernels (kernels/triton/mx_gemm.py) on one GPU; write their tiles.

    python benchmarks/tune_triton_mx.py --json out.json                 # check + sweep (GPU, jax-triton)
    python benchmarks/tune_triton_mx.py --formats mxfp6_e2m3 --json out6.json   # MXFP6 (check + sweep)
    python benchmarks/tune_triton_mx.py --write-from out.json           # merge the winners into tiles.json

1. **Check**: every candidate tile (and both scale paths, split-K, the interleaved store, unused row tiles)
   against ``dequantize`` + a float32 matmul on fresh random bytes and scales: relative error <= 1e-5
   (the kernel's only error is the float32 summation order).
2. **Sweep**: GEMM1 (``[2I, H]``) and GEMM2 (``[H, I]``) of each shape at each token count with the real
   dispatch (uniform routing), CUPTI kernel time after an L2 flush (``moe_bench.timeit``), over the
   candidates of the token count's regime; random packed bytes (never zeros).
3. ``--write-from``: per regime the candidate with the best geometric-mean time over the swept cases
   becomes the device's entry in ``kernels/tiles.json`` (kernel ``triton_mx``), with the source recorded.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.moe_bench import SHAPES, routing, timeit  # noqa: E402
from quarkmoe_jax.formats import QArray  # noqa: E402
from quarkmoe_jax.formats.fragment_layout import ROW_ALIGN, UNIT_K, fragment_qarray, padded_shape  # noqa: E402
from quarkmoe_jax.kernels import tiles  # noqa: E402
from quarkmoe_jax.kernels.base import REGIMES, TileConfig, architecture  # noqa: E402
from quarkmoe_jax.kernels.base import regime as regime_of  # noqa: E402
from quarkmoe_jax.kernels.triton import TRITON  # noqa: E402
from quarkmoe_jax.moe.pair_sort import sort_pairs, tile_rows  # noqa: E402


def candidates(regime: str) -> list[TileConfig]:
    if regime == "decode":
        out = []
        for block_n in (64, 128, 256):
            warps = 4 if block_n <= 128 else 8
            for stages, prefetch in ((4, 0), (3, 0), (1, 3)):
                out.append(TileConfig(16, block_n, warps, stages, split_k=8, prefetch_l2=prefetch))
        return out
    block_ms = (32, 64) if regime == "mid" else (64,)
    return [
        TileConfig(bm, bn, 4 if bn <= 128 else 8, stages, split_k=4 if regime == "mid" else 1)
        for bm, bn, stages in itertools.product(block_ms, (128, 256), (3, 4))
    ]


def random_fragment(
    key, experts: int, n: int, k: int, exact: bool = False, fmt: str = "mxfp4", row_align: int = ROW_ALIGN
) -> QArray:
    """Random code bytes (every code and neighbour) and E8M0 scales near 2^-7 (up to 2^13 with ``exact``);
    rows padded to a multiple of ``row_align``."""
    k1, k2, k3 = jax.random.split(key, 3)
    n_pad, k_pad = -(-n // row_align) * row_align, -(-k // UNIT_K) * UNIT_K
    units = (experts, n_pad // 16, k_pad // 128)
    words = jax.random.randint(k1, (*units, 1024), 0, 256, jnp.int32).astype(jnp.uint8)
    low = None if fmt == "mxfp4" else jax.random.randint(k3, (*units, 512), 0, 256, jnp.int32).astype(jnp.uint8)
    high = 140 if exact else 125
    scales = jax.random.randint(k2, (*units, 64), 115, high, jnp.int32)
    return fragment_qarray(words, scales.astype(jnp.uint8), n_pad, k_pad, exact, low, fmt)


def check(config: TileConfig, interleaved: bool = False, exact: bool = False, fmt: str = "mxfp4") -> float:
    """Relative error of one launch against dequantize + float32 matmul (unused tiles must be zero)."""
    from quarkmoe_jax.kernels.triton.mx_gemm import mx_fragment_gemm

    experts, n, k = 3, 256, 640
    weight = random_fragment(jax.random.key(1), experts, n, k, exact, fmt)
    tile_expert = jnp.array([0, 2, -1, 2, 1], jnp.int32)
    a = jax.random.normal(jax.random.key(2), (tile_expert.shape[0] * config.block_m, k), jnp.bfloat16)
    config = TRITON.fit_tile(config, n, weight, tile_expert.shape[0])  # the launch's split_k, as the backend
    got = jax.jit(lambda a, w, t: mx_fragment_gemm(a, w, t, config=config, interleaved=interleaved))(
        a, weight, tile_expert
    )
    dense = weight.dequantize(jnp.float32)  # [E, N, K]
    rows_expert = jnp.repeat(jnp.maximum(tile_expert, 0), config.block_m)
    want = jnp.einsum("mk,mnk->mn", a.astype(jnp.float32), dense[rows_expert], precision="highest")
    want = jnp.where(jnp.repeat(tile_expert >= 0, config.block_m)[:, None], want, 0.0)
    if interleaved:
        want = jnp.concatenate([want[:, 0::2], want[:, 1::2]], axis=1)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def sweep_case(
    shape: str, tokens: int, gemm: str, repeats: int, deadline: float, fmt: str = "mxfp4", row_align: int = ROW_ALIGN
) -> list[dict]:
    from quarkmoe_jax.kernels.triton.mx_gemm import mx_fragment_gemm

    e, top_k, h, i = SHAPES[shape]
    ids = routing(jax.random.key(tokens), tokens, e, top_k, False)
    pairs = sort_pairs(ids, jnp.ones((tokens,), bool), None, e)
    touched = int(np.unique(np.asarray(ids)).size)
    rows_per_expert = tokens * top_k / touched
    reg = regime_of(rows_per_expert)
    n, k = (2 * i, h) if gemm == "gemm1" else (h, i)
    weight = random_fragment(jax.random.key(3), e, n, k, fmt=fmt, row_align=row_align)
    moved = touched * weight.nbytes / e
    flops = 2.0 * tokens * top_k * n * k
    rows = []
    for config in candidates(reg):
        if time.monotonic() > deadline:
            break
        if padded_shape(weight)[1] % config.block_n:
            continue
        tiled = tile_rows(pairs, config.block_m)
        a = jax.random.normal(jax.random.key(4), (tiled.tile_expert.shape[0] * config.block_m, k), jnp.bfloat16)

        launch = TRITON.fit_tile(config, n, weight, tiled.tile_expert.shape[0])

        def fn(a, w, t, launch=launch):
            return mx_fragment_gemm(a, w, t, config=launch)

        try:
            us = timeit(fn, [(a, weight, tiled.tile_expert)], repeats=repeats)
        except Exception as err:  # noqa: BLE001 - a config the compiler rejects
            print(f"  {shape} T={tokens} {gemm} {config}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        row = dict(
            format=fmt,
            padded_n=padded_shape(weight)[1],
            shape=shape,
            tokens=tokens,
            gemm=gemm,
            regime=reg,
            touched=touched,
            config=config.__dict__,
            us=us,
            tbps=moved / us / 1e6,
            tflops=flops / us / 1e6,
        )
        rows.append(row)
        print(
            f"{fmt:<10} {shape:<12} T={tokens:<5} {gemm} {config} {us:9.1f} us "
            f"{row['tbps']:6.3f} TB/s {row['tflops']:6.1f} TF/s"
        )
    return rows


LARGE_K = 6144
"""Contraction length from which a GEMM gets its own tile when it wins a different one (measured on the
H200: block_n 256 streams better at K >= 7168, 128 below)."""


def _best(rows: list[dict]) -> dict | None:
    """The config with the best geometric-mean time over the cases every config ran."""
    times: dict[str, dict] = {}
    for row in rows:
        times.setdefault(json.dumps(row["config"], sort_keys=True), {})[(row["shape"], row["tokens"])] = row["us"]
    if not times:
        return None
    cases = set.intersection(*(set(t) for t in times.values())) or set.union(*(set(t) for t in times.values()))
    score = {
        key: math.exp(sum(math.log(t[c]) for c in cases if c in t) / max(1, sum(c in t for c in cases)))
        for key, t in times.items()
    }
    return json.loads(min(score, key=score.get))


def write_from(paths: list[str]) -> int:
    """Per regime and GEMM the best candidate by geometric mean over the swept cases (one for K below
    :data:`LARGE_K` and one above, where they differ) -> the device's entry in tiles.json."""
    docs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    device = docs[0]["meta"]["device"]
    arch = docs[0]["meta"]["architecture"]
    # MXFP4's samples choose the tiles (MXFP6 runs the same tiles; its sweeps are for the record)
    samples = [row for doc in docs for row in doc["samples"] if row.get("format", "mxfp4") == "mxfp4"]
    best: dict[str, list] = {}
    for regime in REGIMES:
        pair = []
        for gemm in ("gemm1", "gemm2"):
            rows = [r for r in samples if r["regime"] == regime and r["gemm"] == gemm]
            contraction = {r["shape"]: SHAPES[r["shape"]][2 if gemm == "gemm1" else 3] for r in rows}
            small = _best([r for r in rows if contraction[r["shape"]] < LARGE_K])
            large = _best([r for r in rows if contraction[r["shape"]] >= LARGE_K])
            if small is None and large is None:
                break
            if small is None or large is None or small == large:
                pair.append([{**(small or large), "min_k": 0}])
            else:
                pair.append([{**small, "min_k": 0}, {**large, "min_k": LARGE_K}])
        if len(pair) == 2:
            block_m = min(t["block_m"] for tiles in pair for t in tiles)  # both GEMMs share the row layout
            best[regime] = [[{**t, "block_m": block_m} for t in tiles] for tiles in pair]
    if not best:
        print("no samples to write")
        return 1
    raw = json.loads(tiles.TILES_PATH.read_text())
    arch_entry = raw.setdefault("architectures", {}).setdefault(arch, {})
    device_entry = arch_entry.setdefault("devices", {}).setdefault(device, {})
    device_entry.setdefault("tiles", {})["triton_mx"] = best
    raw.setdefault("meta", {}).setdefault("sources", {})[f"{arch}.devices.{device}.triton_mx"] = (
        f"benchmarks/tune_triton_mx.py, {docs[0]['meta']['date']}, " + ", ".join(pathlib.Path(p).name for p in paths)
    )
    tiles.TILES_PATH.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {tiles.TILES_PATH}: {device} triton_mx {json.dumps(best)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mixtral", "gpt_oss", "deepseek_v3"])
    parser.add_argument("--formats", nargs="+", default=["mxfp4"], choices=["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3"])
    parser.add_argument("--no-sweep", action="store_true", help="only check every candidate tile")
    parser.add_argument("--no-check", action="store_true", help="only sweep")
    parser.add_argument("--row-align", type=int, default=ROW_ALIGN, help="pad the swept weights' rows to this multiple")
    parser.add_argument("--gemms", nargs="+", default=["gemm1", "gemm2"], choices=["gemm1", "gemm2"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 4096])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--minutes", type=float, default=4.0, help="stop sweeping after this long")
    parser.add_argument("--json", help="write checks and samples here (rewritten after every case)")
    parser.add_argument("--write-from", nargs="+", help="merge the winners of these results into tiles.json")
    args = parser.parse_args(argv)
    if args.write_from:
        return write_from(args.write_from)
    device = jax.devices()[0]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.device_kind,
        "architecture": architecture(device),
        "jax": jax.__version__,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    doc = {"meta": meta, "checks": [], "samples": []}

    def save():
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(doc, indent=1))

    check_configs = set() if args.no_check else {c for regime in REGIMES for c in candidates(regime)}
    for fmt, config in itertools.product(args.formats, sorted(check_configs, key=str)):
        for interleaved, exact in ((False, False), (True, True)):
            try:
                err = check(config, interleaved, exact, fmt)
            except Exception as e:  # noqa: BLE001
                err, note = None, f"{type(e).__name__}: {str(e)[:300]}"
            else:
                note = ""
            doc["checks"].append(
                dict(format=fmt, config=config.__dict__, interleaved=interleaved, exact=exact, rel_err=err, note=note)
            )
            ok = err is not None and err <= 1e-5
            print(
                f"check {'ok  ' if ok else 'FAIL'} {err} {fmt} interleaved={interleaved} exact={exact} {config} {note}"
            )
    save()
    deadline = time.monotonic() + 60 * args.minutes
    cases = itertools.product(args.formats, args.shapes, args.tokens, args.gemms)
    for fmt, shape, tokens, gemm in [] if args.no_sweep else cases:
        if time.monotonic() > deadline:
            print(f"sweep stopped at the {args.minutes} min limit before {fmt} {shape} T={tokens} {gemm}")
            break
        doc["samples"] += sweep_case(shape, tokens, gemm, args.repeats, deadline, fmt, args.row_align)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
