"""The benchmark script runs (tiny shape, CPU): it is a benchmark, never a timed test, but it must not rot."""

import json
import pathlib
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
        "w8a8_int8_tensor_static",
        "bf16",
        "--backends",
        "emulation",
        "pallas",
        "--repeats",
        "1",
        "--module",
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
    assert {(r["scheme"], r["backend"]) for r in result["rows"]} == {
        (s, b) for s in ("w_mxfp4", "w8a8_int8_tensor_static", "bf16") for b in ("emulation", "pallas", "module")
    }
    module = [r for r in result["rows"] if r["backend"] == "module"]
    assert all(r["module_wall_us"] > 0 and r["module_nnx_jit_wall_us"] > 0 for r in module)
    result["rows"] = [r for r in result["rows"] if r["backend"] != "module"]
    # the auto table from these rows: kernel backends only, per scheme family and token count
    order = runpy.run_path("benchmarks/backend_table.py")["rank_backends"]([result])
    assert result["meta"]["kernel_generations"]["triton"] == {"mx": 2, "dense": 1}  # what the run timed
    row = {"backends": ["pallas"], "generations": {"pallas": 1}}
    assert order == {"cpu": {f: {"3": row} for f in ("mxfp4/none", "int8/int8", "bf16/none")}}


def test_backend_table_ranks_a_family_on_its_newest_measurement_only():
    """A newer run of a family at a token count replaces the older rows of it (a kernel that changed is
    ranked on its new times), whatever order the files are given in; other families keep theirs."""
    rank = runpy.run_path("benchmarks/backend_table.py")["rank_backends"]

    def doc(date, rows):
        rows = [dict(shape="mixtral", scheme=s, skewed=False, tokens=t, backend=b, us=us) for s, t, b, us in rows]
        return {"meta": {"device": "GPU", "date": date}, "rows": rows}

    old = doc("2026-12-02", [("w_mxfp6_e3m2", 16, "triton", 9.0), ("w_mxfp6_e3m2", 16, "pallas", 5.0)])
    old["rows"] += doc("2026-12-02", [("w_mxfp4", 16, "pallas", 2.0), ("w_mxfp4", 16, "triton", 1.0)])["rows"]
    new = doc("2026-12-03", [("w_mxfp6_e2m3", 16, "triton", 3.0), ("w_mxfp6_e2m3", 16, "pallas", 4.0)])
    both = {"backends": ["triton", "pallas"], "generations": {"triton": 2, "pallas": 1}}
    for docs in ([old, new], [new, old]):
        assert rank(docs) == {"GPU": {"mxfp6/none": {"16": both}, "mxfp4/none": {"16": both}}}
    # a run that does not record its generations is dated: before the v2 MX kernels landed, triton's MX rows
    # timed generation 1 (auto ignores them); its dense rows are still generation 1, current
    older = doc("2026-11-24", [("w_mxfp4", 1, "pallas", 2.0), ("w_mxfp4", 1, "triton", 3.0)])
    older["rows"] += doc("2026-11-24", [("w8a8_int8_tensor_static", 1, "triton", 1.0)])["rows"]
    ranked = rank([older])["GPU"]
    assert ranked["mxfp4/none"]["1"] == {"backends": ["pallas", "triton"], "generations": {"pallas": 1, "triton": 1}}
    assert ranked["int8/int8"]["1"]["generations"] == {"triton": 1}
    # runs of an experiment (the v3 kernel forced on, XLA's Triton call) time what auto does not run: left out
    for experiment in ({"mx_fused_epilogue": True}, {"triton_launcher": "xla"}):
        newer = doc("2026-12-09", [("w_mxfp6_e2m3", 16, "triton", 9.0), ("w_mxfp6_e2m3", 16, "pallas", 4.0)])
        newer["meta"].update(experiment)
        assert rank([old, new, newer]) == {"GPU": {"mxfp6/none": {"16": both}, "mxfp4/none": {"16": both}}}


def test_moe_bench_prints_the_newest_anchor_figures_for_the_device():
    """The anchor cases moe_bench puts next to w_mxfp4 rows: the H200's from the newest dated file (issue 32's
    targets are stated against the 2026-12-06 figures), none on a GPU model without anchor figures."""
    load = runpy.run_path("benchmarks/moe_bench.py")["load_anchors"]
    h200 = load("NVIDIA H200")
    assert h200[("mixtral", 1)]["us"] == 127.0 and h200[("gpt_oss", 4096)]["us"] == 2271.9
    assert h200[("deepseek_v3", 256)]["source"] == "h200_triton_kernels_mxfp4_2026-12-06.json"
    assert {shape for shape, _ in h200} == {"mixtral", "gpt_oss", "deepseek_v3"} and len(h200) == 12
    assert load("NVIDIA H100 80GB HBM3") == {} and load("cpu") == {}


def test_roofline_plot_from_the_recorded_h100_results(tmp_path):
    """benchmarks/roofline.py turns moe_bench JSON into a well-formed SVG with one point per timed row, every
    point under the roof of its run's ceilings."""
    import xml.dom.minidom
    from pathlib import Path

    roofline = runpy.run_path("benchmarks/roofline.py")
    paths = sorted(Path("benchmarks/results").glob("h100_*_packed_decode_*.json"))
    paths = [p for p in paths if "tile_sweep" not in p.name]
    out = tmp_path / "roofline.svg"
    assert roofline["main"]([*map(str, paths), "--out", str(out)]) == 0
    svg = xml.dom.minidom.parse(str(out))
    results = [json.loads(p.read_text()) for p in paths]
    points = roofline["points"](results)
    assert len(svg.getElementsByTagName("circle")) >= len(points) > 0
    for point in points:
        ceilings = results[0]["ceilings"]
        roof = min(ceilings["copy_tbps"] * point["intensity"], ceilings["matmul_tflops"])
        assert point["tflops"] <= roof * 1.05, point


def _run_script(path: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [path, *argv])
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0


def test_model_and_serving_benchmarks_run_on_a_tiny_shape(tmp_path, monkeypatch):
    """model_bench (the decode step of generate's device loop) and serve_bench (decode steps, a burst of the
    ShareGPT-like workload, concurrency 4; through the engine, then over HTTP), CPU, tiny shapes."""
    common = ["--layers", "2", "--repeats", "1", "--copy-tbps", "0.01", "--context", "16", "--schemes", "w_mxfp4"]
    out = tmp_path / "model.json"
    _run_script(
        "benchmarks/model_bench.py",
        [*common, "--shapes", "tiny_mixtral", "--batches", "2", "--prefill-tokens", "16", "--json", str(out)],
        monkeypatch,
    )
    (model,) = json.loads(out.read_text())["results"]
    assert model["decode"][0]["tokens_per_s"] > 0 and model["prefill"]["tokens_per_s"] > 0
    out = tmp_path / "serve.json"
    settings = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "2112"]
    settings += ["--prefill-tokens", "40", "--matmul-tflops", "0.01"]  # two steps of 32 tokens
    _run_script(
        "benchmarks/serve_bench.py",
        [*common, *settings, "--shapes", "tiny_gpt_oss", "--batches", "1", "4", "--requests", "3"]
        + ["--concurrency-requests", "2", "--http", "--client-processes", "2", "--json", str(out)],
        monkeypatch,
    )
    (serve,) = json.loads(out.read_text())["results"]
    assert serve["http_engine"] == "process"  # built in a process of its own, as quarkmoe serve runs it
    for name, requests in (("throughput", 3), ("concurrency_4", 2)):  # the same workloads over HTTP
        http = serve["http"][name]
        assert http["requests"] == requests and http["output_tokens_per_s"] > 0 and http["throughput_over_engine"] > 0
        assert http["client_processes"] == (2 if name == "throughput" else 1)  # concurrency 4: one gate, one client
        assert 0 < http["client_cpu_share_max"] and 0 < http["server_process_cpu_per_s"]
    assert [d["batch"] for d in serve["decode"]] == [1, 4]  # 4: two prefill while two decode
    assert all(d["compiled_while_timed"] == 0 and d["tokens_per_s"] > 0 for d in serve["decode"])
    assert serve["throughput"]["requests"] == 3 and serve["throughput"]["output_tokens_per_s"] > 0
    prefill = serve["prefill"]
    assert prefill["tokens"] == 40 and prefill["tokens_per_s"] > 0 and prefill["fraction_of_matmul_ceiling"] > 0
    assert serve["concurrency_4"]["tpot_ms"]["p50"] > 0
    assert serve["compiled_after_serving"] == serve["compiled_after_warm_up"]  # serving compiled nothing


def test_dispatch_benchmark_runs(monkeypatch, capsys):
    _run_script("benchmarks/dispatch_bench.py", ["--layers", "2", "--calls", "3"], monkeypatch)
    assert "flat leaves + static structure" in capsys.readouterr().out


def test_step_profile_attributes_a_decode_step_s_kernels_to_source_lines(tmp_path, monkeypatch):
    """benchmarks/step_profile.py on the CPU (the host's XLA ops stand for a GPU's kernels): both scheduling
    modes traced, the kernels grouped by the model's source lines; MXFP4 attention projections."""
    out = tmp_path / "profile.json"
    argv = ["--shape", "tiny_mixtral", "--layers", "2", "--batch", "2", "--context", "16", "--steps", "2"]
    argv += ["--attention-scheme", "w_mxfp4"]  # projections quantized as a Quark export's
    _run_script("benchmarks/step_profile.py", [*argv, "--max-model-len", "128", "--json", str(out)], monkeypatch)
    result = json.loads(out.read_text())
    for mode in ("async", "sync"):
        summary = result[mode]
        assert summary["kernels_per_step"] > 0 and 0 < summary["device_busy_ms"] <= 1.05 * summary["wall_ms"]
        sources = [row["what"] for row in summary["by_source"]]
        assert any(s.startswith("layers.py:") and "attention" in s for s in sources), sources
        host = summary["host_us"]
        assert all(host[phase] > 0 for phase in ("schedule", "arrays", "dispatch", "collect")), host
        assert abs(sum(v for k, v in host.items() if k != "wall_us") - host["wall_us"]) < 1e-6 * host["wall_us"] + 1
    assert result["attention_scheme"] == "w_mxfp4"


def test_server_capacity_benchmark_streams_every_token(tmp_path, monkeypatch):
    """benchmarks/server_capacity.py: the real app over a stand-in engine in its own process, every requested token
    made."""
    out = tmp_path / "capacity.json"
    argv = ["--requests", "6", "--client-processes", "2", "--step-ms", "1", "--vocab", "300", "--json", str(out)]
    _run_script("benchmarks/server_capacity.py", argv, monkeypatch)
    result = json.loads(out.read_text())
    lengths_file = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "sharegpt_like_lengths.json"
    lengths = json.loads(lengths_file.read_text())
    assert result["requests"] == 6 and result["output_tokens_per_s"] > 0
    assert result["engine_generation_tokens"] == sum(lengths["output"][:6]) and result["engine"] == "process"
    assert 0 < result["throughput_over_engine"] <= 1.05
