"""Roofline plot (SVG, no plotting dependency) of `moe_bench.py` JSON results.

    python benchmarks/roofline.py benchmarks/results/h100_*_packed_decode_*.json --out docs/roofline_h100.svg

x: arithmetic intensity, FLOP per touched packed byte (log); y: TF/s (log). The roof is the run's own
ceilings: ``min(copy TB/s x intensity, dense bf16 matmul TF/s)``. One point per (shape, tokens, scheme,
backend) row; labels give shape and tokens.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 760, 480, 60
X_RANGE = (1.0, 1e5)  # FLOP / byte
Y_RANGE = (0.1, 2000.0)  # TF/s
COLORS = {"w_mxfp4": "#1f77b4", "w_mxfp4_a_mxfp4": "#ff7f0e", "w_mxfp6_e2m3_a_mxfp6_e2m3": "#2ca02c"}


def _x(value: float) -> float:
    lo, hi = (math.log10(v) for v in X_RANGE)
    return MARGIN + (math.log10(value) - lo) / (hi - lo) * (WIDTH - 2 * MARGIN)


def _y(value: float) -> float:
    lo, hi = (math.log10(v) for v in Y_RANGE)
    return HEIGHT - MARGIN - (math.log10(value) - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)


def points(results: list[dict]) -> list[dict]:
    """Rows with a time and touched bytes -> ``{label, intensity, date, **row}`` (the row's own fields:
    shape, tokens, scheme, backend, us, tflops, tbps, ...; ``date`` is the run's)."""
    out = []
    for result in results:
        for row in result["rows"]:
            if not row.get("us") or not row.get("touched_bytes"):
                continue
            flops = row["tflops"] * 1e12 * row["us"] * 1e-6
            out.append(
                {
                    **row,
                    "label": f"{row['shape']} T={row['tokens']}",
                    "intensity": flops / row["touched_bytes"],
                    "date": result["meta"]["date"],
                }
            )
    return out


def render(results: list[dict]) -> str:
    """The SVG text for one or more moe_bench results (ceilings: the lowest of the runs, conservative)."""
    copy_tbps = min(r["ceilings"]["copy_tbps"] for r in results)
    matmul_tflops = min(r["ceilings"]["matmul_tflops"] for r in results)
    meta = results[0]["meta"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
        'font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="13">quarkmoe-jax pallas MoE on '
        f"{meta['device']} (jax {meta['jax']}, {meta['date'][:10]})</text>",
    ]
    for decade in range(int(math.log10(X_RANGE[0])), int(math.log10(X_RANGE[1])) + 1):
        x = _x(10.0**decade)
        parts.append(f'<line x1="{x:.1f}" y1="{MARGIN}" x2="{x:.1f}" y2="{HEIGHT - MARGIN}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - MARGIN + 15}" text-anchor="middle">1e{decade}</text>')
    for decade in range(int(math.floor(math.log10(Y_RANGE[0]))), int(math.log10(Y_RANGE[1])) + 1):
        y = _y(10.0**decade)
        parts.append(f'<line x1="{MARGIN}" y1="{y:.1f}" x2="{WIDTH - MARGIN}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{MARGIN - 5}" y="{y + 4:.1f}" text-anchor="end">{10.0**decade:g}</text>')
    knee = matmul_tflops / copy_tbps
    roof = [(X_RANGE[0], copy_tbps * X_RANGE[0]), (knee, matmul_tflops), (X_RANGE[1], matmul_tflops)]
    path = " ".join(f"{_x(x):.1f},{_y(y):.1f}" for x, y in roof)
    parts.append(f'<polyline points="{path}" fill="none" stroke="black" stroke-width="2"/>')
    parts.append(
        f'<text x="{_x(knee) + 5:.1f}" y="{_y(matmul_tflops) - 6:.1f}">bf16 dense {matmul_tflops:.0f} TF/s; '
        f"copy {copy_tbps:.2f} TB/s</text>"
    )
    for point in points(results):
        x, y = _x(point["intensity"]), _y(max(point["tflops"], Y_RANGE[0]))
        color = COLORS.get(point["scheme"], "#9467bd")
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"><title>{point["label"]} ')
        parts.append(f"{point['scheme']}: {point['tflops']:.1f} TF/s</title></circle>")
        if point["scheme"] == "w_mxfp4":
            parts.append(f'<text x="{x + 6:.1f}" y="{y - 4:.1f}">{point["label"]}</text>')
    for i, (scheme, color) in enumerate([*COLORS.items(), ("other schemes", "#9467bd")]):
        y = MARGIN + 15 + 15 * i
        parts.append(f'<circle cx="{MARGIN + 12}" cy="{y}" r="4" fill="{color}"/>')
        parts.append(f'<text x="{MARGIN + 20}" y="{y + 4}">{scheme}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">FLOP per touched packed byte</text>')
    parts.append(
        f'<text x="15" y="{HEIGHT / 2}" transform="rotate(-90 15 {HEIGHT / 2})" text-anchor="middle">TF/s</text>'
    )
    return "\n".join(parts + ["</svg>"]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="moe_bench.py --json outputs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in args.results]
    args.out.write_text(render(results))
    print(f"wrote {args.out} ({len(points(results))} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
