"""The benchmark script runs (tiny shape, CPU): it is a benchmark, never a timed test, but it must not rot."""

import json
import runpy
import sys


def test_benchmark_runs_on_a_tiny_shape(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    argv = [
        "moe_bench.py",
        "--shapes",
        "tiny",
        "--tokens",
        "3",
        "--schemes",
        "w_mxfp4",
        "--repeats",
        "1",
        "--json",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        runpy.run_path("benchmarks/moe_bench.py", run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    result = json.loads(out.read_text())
    assert result["rows"][0]["backend"] == "emulation" and result["rows"][0]["us"] > 0
    assert result["rows"][0]["ragged_dot_bf16_us"] > 0
