"""Serving benchmark: the engine (:class:`quarkmoe_jax.serving.Engine`) on full-depth models, one GPU.

Run on a GPU (random weights at the public models' shapes, no download):

    python benchmarks/serve_bench.py --shapes gpt_oss_120b mixtral_8x7b --json benchmarks/results/h200_serve.json

Per shape (``model_bench.HF_SHAPES``, **every** decoder layer built) and expert format (``w_mxfp4`` by default;
``bf16`` and ``w8a8_int8_channel_dynamic_token`` where they fit), in one process:

The attention projections are bfloat16 (the public checkpoints' attention), or with ``--attention-scheme`` in a
Quark scheme's format (an export that quantizes every linear layer but the LM head).

* **memory**: the packed bytes of the parameters and the device bytes the load took (target: <= 1.05x), and the
  engine's KV cache (sized from the memory left, ``--memory-fraction``);
* **compile**: ``Engine.warm_up`` (every step program, before any timing), and the count of compiled programs
  after each phase (a steady state compiles nothing);
* **prefill**: one ``--prefill-tokens`` prompt (default 2048; one engine step at the default token budget)
  alone, the time to its first token, and its matmul FLOPs (``prefill_flops``: every weight a token
  multiplies, the causal attention, the LM head once) per second against the bfloat16 matmul rate measured
  in the same run (``moe_bench.matmul_tflops``);
* **decode**: engine steps at batch 1, 8, 64 and 256 (``--batches``), each sequence holding ``--context`` cached
  positions, wall time of ``engine.step()`` (host scheduling, the step, the tokens' copy back: what serving
  pays), median of ``--repeats``, with async scheduling (the engine's default: the host prepares step n + 1
  while the device runs step n) and again waiting for each step (``waiting_step_ms``: the host work async
  scheduling hides); tokens/s and the step against the **memory floor** measured in the same run (bytes the
  step must read -- every non-expert parameter, the experts the batch touches in expectation under uniform
  routing, the cache the sequences may see -- over ``moe_bench.copy_tbps``);
* **throughput**: ``--requests`` requests (default 1000) with ShareGPT-like lengths
  (``benchmarks/data/sharegpt_like_lengths.json``: seeded, mean input 230 and output 192 tokens), random token
  ids, greedy, no stop tokens (each request makes exactly its output length, as vLLM's benchmark with
  ``ignore_eos``), all submitted at once: output and total tokens/s, TTFT and TPOT p50 / p99;
* **concurrency 4**: a new request whenever one finishes (``--concurrency-requests`` of them): TPOT p50 and
  output tokens/s.

* **over HTTP** (``--http``): the same engine served by ``quarkmoe serve``'s app (uvicorn on a thread of this
  process) with the engine in a process of its own, as ``quarkmoe serve`` runs it (built first, and gone before
  the other phases build theirs; ``--http-engine thread``: the engine of the other phases, on a thread of this
  process), and the throughput and concurrency-4 workloads sent again by clients in other processes (streaming
  completions, token-id prompts; the all-at-once workload from ``--client-processes`` processes, 4 by default:
  one Python client parsing every SSE event is itself a limit near 10k events/s): the server's overhead over
  the engine, the server process's CPU use and the busiest client's CPU share.

TTFT is the time from submission to a request's first token; TPOT its time from first to last token over its
other tokens. Greedy sampling throughout.

``--mesh DxExT`` splits each model over that many devices (``QuarkMoEForCausalLM.shard``: the layout
``from_pretrained(path, mesh=...)`` loads; built on one device first, so the model must fit one device); the
memory floor then counts the devices' summed bandwidth.

``--url URL`` runs only the client against a server already running there (any ``quarkmoe serve``, or
another OpenAI-compatible server): the same workload, prompts of random token ids below ``--vocab``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# Before JAX starts (moe_bench's import does): this process must not take the GPU's memory up front (XLA's
# default), or --http's engine process, started after it, would get a quarter of it; the engine sizes its KV
# cache from the memory left either way (the device scripts always ran it so).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from model_bench import HF_SHAPES, _param_bytes, build_model  # noqa: E402
from moe_bench import copy_tbps, matmul_tflops  # noqa: E402

from quarkmoe_jax.cli import mesh_of  # noqa: E402
from quarkmoe_jax.kernels.triton import launch as triton_launch  # noqa: E402
from quarkmoe_jax.models import DecoderConfig  # noqa: E402
from quarkmoe_jax.models.inputs import cache_bytes  # noqa: E402
from quarkmoe_jax.models.layers import Linear  # noqa: E402
from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock  # noqa: E402
from quarkmoe_jax.serving import Engine, SamplingParams  # noqa: E402
from quarkmoe_jax.serving import engine as engine_module  # noqa: E402

LENGTHS = pathlib.Path(__file__).resolve().parent / "data" / "sharegpt_like_lengths.json"


def _device_bytes() -> int:
    """Bytes in use on every local device together."""
    return sum((d.memory_stats() or {}).get("bytes_in_use", 0) for d in jax.local_devices())


def _compiled() -> int:
    return engine_module._engine_step._cache_size()


def floor_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step of ``batch`` sequences of ``context`` positions must read."""
    arch = model.config.moe
    total = _param_bytes(model)
    expert_bytes = sum(_param_bytes(layer.mlp.experts) for layer in model.layers if hasattr(layer.mlp, "experts"))
    touched = arch.num_experts * (1 - (1 - arch.top_k / arch.num_experts) ** batch)
    cache = cache_bytes(model.config, batch, context, model.dtype)
    return total - expert_bytes + expert_bytes * touched / arch.num_experts + cache


def _prompt(rng, vocab: int, length: int) -> list[int]:
    return rng.integers(0, vocab, length).tolist()


def prefill(engine: Engine, rng, batch: int, context: int, new_tokens: int) -> dict[str, int]:
    """Add ``batch`` requests of ``context`` random prompt tokens and ``new_tokens`` to make (no stop), and step
    until each has its first token (chunked prefill); returns each request's tokens made so far."""
    vocab = engine.config.vocab_size
    ids = [
        engine.add_request(_prompt(rng, vocab, context), SamplingParams(new_tokens, stop_token_ids=()))
        for _ in range(batch)
    ]
    made = dict.fromkeys(ids, 0)
    while not all(made.values()):
        for o in engine.step():
            made[o.request_id] += len(o.new_token_ids)
    return made


def decode_phase(engine: Engine, batch: int, context: int, repeats: int, bandwidth: float) -> dict:
    """``batch`` requests prefilled to ``context`` positions, then ``repeats`` timed decode steps."""
    rng = np.random.default_rng(batch)
    warm = 3
    # Requests whose prefill ends first decode while the others still prefill, so each may make as many tokens
    # as the context and its share of the cache leave (never finishing or preempted inside the timed steps);
    # the floor counts the positions they reach.
    share = engine.num_blocks // batch * engine.block_size
    room = min(engine.context.length, share) - context
    steps = 2 * (repeats + warm)  # timed with async scheduling, then waiting for each step
    if room < steps + 2:
        return {
            "batch": batch,
            "context": context,
            "skipped": f"{batch} sequences of {context} positions and "
            f"{steps + 2} new tokens need more than the cache's {engine.num_blocks} blocks",
        }
    preemptions = engine.num_preemptions
    made = prefill(engine, rng, batch, context, room)
    ids = list(made)
    if max(made.values()) + steps + 1 > room:
        raise ValueError(f"--context {context}: requests decoded {max(made.values())} tokens while others prefilled")
    compiled = _compiled()
    scheduling = engine.async_scheduling
    medians = {}
    for engine.async_scheduling in (True, False):
        for _ in range(warm):
            engine.step()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = engine.step()
            samples.append(time.perf_counter() - start)
            assert len(outputs) == batch, f"a decode step served {len(outputs)} of {batch} requests"
        medians[engine.async_scheduling] = statistics.median(samples)
    engine.async_scheduling = scheduling
    for request_id in ids:
        engine.abort_request(request_id)
    assert engine.num_preemptions == preemptions, "the decode phase preempted requests"
    step = medians[True]
    reached = context + statistics.mean(made.values()) + steps // 2
    devices = 1 if engine.model.sharding is None else engine.model.sharding.mesh.size
    floor = floor_bytes(engine.model, batch, round(reached)) / (bandwidth * 1e12 * devices)
    return {
        "batch": batch,
        "context": context,
        "step_ms": step * 1e3,
        "waiting_step_ms": medians[False] * 1e3,  # async_scheduling=False: the host work not hidden
        "tokens_per_s": batch / step,
        "memory_floor_ms": floor * 1e3,
        "fraction_of_floor": floor / step,
        "compiled_while_timed": _compiled() - compiled,
    }


def _expert_flops(experts: QuarkMoE) -> int:
    """Matmul FLOPs of one token through one expert (unpadded sizes; gated: GEMM1 holds two projections)."""
    shape = experts.shape
    projections = experts.w13.get_value().shape[-2] // experts.w2.get_value().shape[-1]
    return 2 * (projections + 1) * shape.hidden_size * shape.intermediate_size


def prefill_flops(model, tokens: int) -> float:
    """Matmul FLOPs of one ``tokens``-token prompt: each token through every weight it multiplies (attention
    projections, router, its ``top_k`` routed experts, shared experts and dense MLPs), the causal attention's
    scores and values (sliding windows honoured; DeepSeek in its absorbed form: the latent and rotary key as
    the key, the latent as the value), and the LM head once (the engine takes the last token's logits only)."""
    config = model.config
    if config.mla is not None:
        key_dim, value_dim = config.mla.kv_lora_rank + config.mla.qk_rope_head_dim, config.mla.kv_lora_rank
    else:
        key_dim = value_dim = config.head_dim
    per_token, attention = 0, 0
    for index, layer in enumerate(model.layers):
        for _, node in nnx.iter_graph(layer.self_attn):
            if isinstance(node, Linear):
                per_token += 2 * int(np.prod(node.weight.get_value().shape))
        mlp = layer.mlp
        if isinstance(mlp, QuarkMoEBlock):
            per_token += 2 * mlp.experts.shape.num_experts * mlp.experts.shape.hidden_size  # the router
            per_token += mlp.routing.top_k * _expert_flops(mlp.experts)
            if mlp.shared is not None:
                per_token += _expert_flops(mlp.shared)
        else:
            per_token += _expert_flops(mlp)
        window = config.sliding_windows[index]
        seen = np.minimum(np.arange(1, tokens + 1), window or tokens)  # keys each query attends to
        attention += 2 * config.num_heads * (key_dim + value_dim) * int(seen.sum())
    head = 2 * config.vocab_size * config.hidden_size
    return per_token * tokens + attention + head


def prefill_phase(engine: Engine, tokens: int, repeats: int, tflops: float) -> dict:
    """One ``tokens``-token prompt at a time, alone in the engine (waiting for each step): the time from
    ``add_request`` to its first token, median of ``repeats`` (after one untimed), against the bfloat16 matmul
    rate measured in the same run."""
    rng = np.random.default_rng(tokens)
    scheduling, engine.async_scheduling = engine.async_scheduling, False
    samples = []
    for repeat in range(repeats + 1):
        request_id = engine.add_request(_prompt(rng, engine.config.vocab_size, tokens), SamplingParams(1))
        start = time.perf_counter()
        while not any(o.request_id == request_id for o in engine.step()):
            pass
        if repeat:
            samples.append(time.perf_counter() - start)
    engine.async_scheduling = scheduling
    seconds = statistics.median(samples)
    flops = prefill_flops(engine.model, tokens)
    return {
        "tokens": tokens,
        "ms": seconds * 1e3,
        "tokens_per_s": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "matmul_tflops": tflops,
        "fraction_of_matmul_ceiling": flops / seconds / 1e12 / tflops,
    }


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def serve(engine: Engine, workload: list[tuple[int, int]], concurrency: int | None) -> dict:
    """Serve ``workload`` (input, output) lengths: all at once (``concurrency`` None) or ``concurrency`` in
    flight. Returns tokens/s and TTFT / TPOT percentiles (ms)."""
    rng = np.random.default_rng(1)
    vocab = engine.config.vocab_size
    pending = list(enumerate(workload))
    submitted, first, last, counts = {}, {}, {}, {}
    start = time.perf_counter()

    def submit():
        index, (inp, out) = pending.pop(0)
        request_id = engine.add_request(_prompt(rng, vocab, inp), SamplingParams(out, stop_token_ids=()))
        submitted[request_id] = time.perf_counter()
        counts[request_id] = 0

    in_flight = len(workload) if concurrency is None else concurrency
    for _ in range(min(in_flight, len(pending))):
        submit()
    while engine.has_unfinished() or pending:
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            counts[o.request_id] += len(o.new_token_ids)
            first.setdefault(o.request_id, now)
            last[o.request_id] = now
            if o.finished and pending and concurrency is not None:
                submit()
    elapsed = time.perf_counter() - start
    timings = [(submitted[r], first[r], last[r], counts[r]) for r in submitted]
    return _summary(workload, concurrency, elapsed, timings)


def _summary(workload, concurrency: int | None, elapsed: float, timings) -> dict:
    """Tokens/s and TTFT / TPOT percentiles (ms) of a served workload; ``timings``: per request ``(submitted,
    first token, last token, tokens)``, seconds on one clock."""
    output_tokens = sum(t[3] for t in timings)
    input_tokens = sum(inp for inp, _ in workload)
    return {
        "requests": len(workload),
        "concurrency": concurrency,
        "seconds": elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + input_tokens) / elapsed,
        "ttft_ms": _percentiles([(f - s) * 1e3 for s, f, _, _ in timings]),
        "tpot_ms": _percentiles([(la - f) * 1e3 / (c - 1) for _, f, la, c in timings if c > 1]),
    }


def http_timings(url: str, workload: list[tuple[int, int]], indexes, concurrency: int | None, vocab: int) -> dict:
    """The requests ``indexes`` of ``workload`` sent as :func:`serve` sends them, over HTTP: each a streaming
    ``/v1/completions`` (the prompt as token ids, greedy, ``ignore_eos``, usage in the last chunk), at most
    ``concurrency`` at once. Returns per request ``(submitted, first chunk with text, last chunk, tokens)`` on
    ``time.monotonic`` (one clock for every process of this machine), and this process's CPU seconds."""
    import httpx

    rng = np.random.default_rng(1)
    prompts = [_prompt(rng, vocab, inp) for inp, _ in workload]  # the prompts serve() draws, in the same order

    async def run():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        gate = asyncio.Semaphore(concurrency or len(workload))
        async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

            async def one(index: int):
                body = {
                    "prompt": prompts[index],
                    "max_tokens": workload[index][1],
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                async with gate:
                    submitted, first, last, count = time.monotonic(), None, None, 0
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        response.raise_for_status()
                        async for line in response.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                count = chunk["usage"]["completion_tokens"]
                            elif chunk["choices"]:
                                last = time.monotonic()
                                first = first or last
                    return submitted, first, last, count

            return await asyncio.gather(*(one(i) for i in indexes))

    cpu = time.process_time()
    timings = asyncio.run(run())
    return {"timings": timings, "cpu_s": time.process_time() - cpu}


def http_serve(url: str, workload, concurrency: int | None, vocab: int, processes: int = 1) -> dict:
    """:func:`serve` over HTTP from ``processes`` client processes (request ``i`` from process ``i % processes``;
    one process keeps ``concurrency``): tokens/s, TTFT / TPOT percentiles, and the clients' busiest CPU share
    (near 1: a client, not the server, was the limit)."""
    if processes == 1 or concurrency is not None:
        parts = [http_timings(url, workload, range(len(workload)), concurrency, vocab)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            outs = [pathlib.Path(tmp) / f"part{i}.json" for i in range(processes)]
            command = [sys.executable, __file__, "--url", url, "--vocab", str(vocab), "--requests", str(len(workload))]
            running = [
                subprocess.Popen([*command, "--client-part", f"{i}/{processes}", "--json", str(out)])
                for i, out in enumerate(outs)
            ]
            for process in running:
                if process.wait(timeout=3600):
                    raise RuntimeError(f"a client process failed: {process.args}")
            parts = [json.loads(out.read_text()) for out in outs]
    timings = [t for part in parts for t in part["timings"]]
    elapsed = max(t[2] or t[0] for t in timings) - min(t[0] for t in timings)
    summary = _summary(workload, concurrency, elapsed, timings)
    summary["client_processes"] = len(parts)
    summary["client_cpu_share_max"] = max(part["cpu_s"] for part in parts) / elapsed
    return summary


def word_tokenizer(vocab: int):
    """A ``tokenizers`` word-level tokenizer over ``vocab`` ids (id ``i`` reads " w<i>"), so every id a random
    model samples detokenizes to text as a real vocabulary does (the synthetic byte-level one has 272 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tokenizer


@contextlib.contextmanager
def served(engine, model_name: str):
    """``quarkmoe serve``'s app on uvicorn, on a thread of this process, at a free port of 127.0.0.1; yields its
    URL, stops it on exit. ``engine``: an ``AsyncEngine.spawn(...)`` (the engine in its own process, as ``quarkmoe
    serve`` runs it; shut down on exit) or an Engine (run on a thread of this process)."""
    import uvicorn

    from quarkmoe_jax.serving.async_engine import AsyncEngine
    from quarkmoe_jax.serving.server import ServerSettings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vocab = engine.info.vocab_size if isinstance(engine, AsyncEngine) else engine.config.vocab_size
    app = create_app(engine, word_tokenizer(vocab), None, ServerSettings(model_name))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def http_phases(engine, vocab: int, args) -> dict:
    """Serve ``engine`` (a spawned ``AsyncEngine``, or an Engine of this process) through the server's app on
    this process (uvicorn on a thread) and send the throughput and concurrency-4 workloads from client processes
    (``--url`` mode of this script)."""
    with served(engine, "bench") as url:
        http = {}
        for name, requests, concurrent in (
            ("throughput", args.requests, 0),
            ("concurrency_4", 0, args.concurrency_requests),
        ):
            if not (requests or concurrent):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = pathlib.Path(tmp) / "client.json"
                command = [
                    sys.executable, __file__, "--url", url, "--vocab",
                    str(vocab), "--requests", str(requests), "--concurrency-requests",
                    str(concurrent), "--client-processes", str(args.client_processes), "--json", str(out),
                ]  # fmt: skip
                cpu, wall = time.process_time(), time.monotonic()
                subprocess.run(command, check=True, timeout=3600)
                http[name] = json.loads(out.read_text())["http"][name]
                # this process's CPU: the server's (and the engine's, on a thread of this process)
                http[name]["server_process_cpu_per_s"] = (time.process_time() - cpu) / (time.monotonic() - wall)
        return http


def client_main(args) -> int:
    """``--url``: only the client, against a running server."""
    lengths = json.loads(LENGTHS.read_text())
    workload = list(zip(lengths["input"], lengths["output"], strict=True))
    if args.client_part:  # one of several client processes: its requests' raw timings
        part, parts = (int(v) for v in args.client_part.split("/"))
        workload = workload[: args.requests]
        raw = http_timings(args.url, workload, range(part, len(workload), parts), None, args.vocab)
        args.json.write_text(json.dumps(raw))
        return 0
    result = {}
    if args.requests:
        result["throughput"] = http_serve(
            args.url, workload[: args.requests], None, args.vocab, processes=args.client_processes
        )
    if args.concurrency_requests:
        result["concurrency_4"] = http_serve(args.url, workload[: args.concurrency_requests], 4, args.vocab)
    for name, r in result.items():
        print(
            f"  HTTP {name}: {r['output_tokens_per_s']:.0f} output tok/s, TTFT p50 {r['ttft_ms']['p50']:.0f} ms, "
            f"TPOT p50 {r['tpot_ms']['p50']:.2f} ms p99 {r['tpot_ms']['p99']:.2f} ms; {r['client_processes']} "
            f"client process(es), busiest at {r['client_cpu_share_max']:.2f} of a core",
            flush=True,
        )
    if args.json:
        doc = {"date": datetime.date.today().isoformat(), "url": args.url, "http": result}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def engine_settings(args) -> dict:
    """The :class:`Engine` arguments of this run."""
    return dict(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        memory_fraction=args.memory_fraction,
        attention_backend=args.attention,
    )


def bench_engine(hf_config: dict, scheme: str, attention_scheme: str, settings: dict, compilation_cache) -> Engine:
    """The benchmark's engine for ``--http``'s engine process: the model built as :func:`bench` builds it (one
    device), every greedy step program compiled (through ``compilation_cache``, the parent's folder)."""
    if compilation_cache:
        jax.config.update("jax_compilation_cache_dir", compilation_cache)
    model = build_model(DecoderConfig.from_hf_config(hf_config), scheme, attention_scheme=attention_scheme)
    engine = Engine(model, **settings)
    engine.warm_up(sampled=False)
    return engine


def spawned_http_phases(hf_config: dict, scheme: str, args) -> dict:
    """``--http``: the engine built in a process of its own (``AsyncEngine.spawn``, as ``quarkmoe serve`` runs
    it) behind the server's app here; that process exits (its device memory with it) before this one builds
    its own engine for the other phases. The step programs it compiles go to a compilation cache this process
    then reads."""
    from quarkmoe_jax.serving.async_engine import AsyncEngine

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="serve-bench-jax-cache-"))
    cache = jax.config.jax_compilation_cache_dir
    start = time.monotonic()
    engine = AsyncEngine.spawn(bench_engine, hf_config, scheme, args.attention_scheme, engine_settings(args), cache)
    print(f"  HTTP: engine process ready in {time.monotonic() - start:.0f} s: {engine.info.summary}", flush=True)
    try:
        http = http_phases(engine, engine.info.vocab_size, args)
    finally:
        engine.shutdown()  # (the app's lifespan did, once it started)
    return http


def bench(shape: str, scheme: str, args, bandwidth: float, tflops: float, save=lambda result: None) -> dict:
    """One shape and scheme's phases; ``save(result)`` after each (the partial result, for a run cut short)."""
    hf, full_layers = HF_SHAPES[shape]
    layers = args.layers or full_layers
    hf_config = {**hf, "num_hidden_layers": layers, "torch_dtype": "bfloat16"}
    config = DecoderConfig.from_hf_config(hf_config)
    http = None
    if args.http and args.http_engine == "process":  # first: its process needs the device memory to itself
        if args.mesh:
            raise ValueError("--http-engine process serves one device: use --http-engine thread with --mesh")
        http = spawned_http_phases(hf_config, scheme, args)
    before = _device_bytes()
    if args.mesh:  # built on one device in Quark's layout, then split as from_pretrained(mesh=) loads it
        model = build_model(config, scheme, prepare=False, attention_scheme=args.attention_scheme)
        model = model.shard(mesh_of(args.mesh))
        if jax.default_backend() == "gpu":
            for layer in model.layers:
                experts = getattr(layer.mlp, "experts", None)
                if experts is not None:
                    experts.prepare_for_kernels()
    else:
        model = build_model(config, scheme, attention_scheme=args.attention_scheme)
    jax.block_until_ready(nnx.state(model))
    result = {"shape": shape, "scheme": scheme, "attention_scheme": args.attention_scheme, "layers": layers}
    result.update(full_layers=full_layers, mesh=args.mesh)
    result["param_bytes"] = _param_bytes(model)
    result["load_device_bytes"] = _device_bytes() - before
    result["load_over_packed"] = result["load_device_bytes"] / result["param_bytes"]  # 0 where no stats (CPU)
    engine = Engine(model, **engine_settings(args))
    result["engine"] = engine.summary()
    result["kv_cache_bytes"] = cache_bytes(config, engine.num_blocks, engine.block_size, model.dtype)
    print(f"{shape} {scheme}: {result['param_bytes'] / 2**30:.2f} GiB packed; {result['engine']}", flush=True)
    result["warm_up_s"] = engine.warm_up(sampled=False)
    result["compiled_after_warm_up"] = _compiled()
    if args.prefill_tokens:
        result["prefill"] = p = prefill_phase(engine, args.prefill_tokens, args.repeats, tflops)
        save(result)
        print(
            f"  prefill {p['tokens']} tokens: {p['ms']:.1f} ms, {p['tokens_per_s']:.0f} tok/s, {p['tflops']:.1f} "
            f"TFLOP/s ({p['fraction_of_matmul_ceiling']:.2f} of the same-run matmul's {tflops:.0f})",
            flush=True,
        )
    result["decode"] = []
    for batch in args.batches:
        if batch > engine.max_num_seqs:
            continue
        row = decode_phase(engine, batch, args.context, args.repeats, bandwidth)
        result["decode"].append(row)
        save(result)
        if "skipped" in row:
            print(f"  decode B{batch:<4} skipped: {row['skipped']}", flush=True)
            continue
        print(
            f"  decode B{batch:<4} {row['step_ms']:8.2f} ms  {row['tokens_per_s']:9.1f} tok/s  "
            f"floor {row['memory_floor_ms']:.2f} ms ({row['fraction_of_floor']:.2f} of it); "
            f"waiting for each step {row['waiting_step_ms']:.2f} ms",
            flush=True,
        )
    lengths = json.loads(LENGTHS.read_text())
    workload = list(zip(lengths["input"], lengths["output"], strict=True))[: args.requests]
    if args.requests:
        result["throughput"] = serve(engine, workload, None)
        t = result["throughput"]
        print(
            f"  {len(workload)} requests at once: {t['output_tokens_per_s']:.0f} output tok/s "
            f"({t['total_tokens_per_s']:.0f} total), TTFT p50 {t['ttft_ms']['p50']:.0f} ms, "
            f"TPOT p50 {t['tpot_ms']['p50']:.2f} ms p99 {t['tpot_ms']['p99']:.2f} ms",
            flush=True,
        )
        save(result)
    if args.concurrency_requests:
        result["concurrency_4"] = serve(engine, workload[: args.concurrency_requests], 4)
        c = result["concurrency_4"]
        print(
            f"  concurrency 4: TPOT p50 {c['tpot_ms']['p50']:.2f} ms, {c['output_tokens_per_s']:.0f} output tok/s",
            flush=True,
        )
        save(result)
    if args.http:
        result["http_engine"] = args.http_engine  # where the engine behind the HTTP phases ran
        result["http"] = http or http_phases(engine, engine.config.vocab_size, args)
        for name, http in result["http"].items():
            engine_side = result.get(name)
            if engine_side:
                http["throughput_over_engine"] = http["output_tokens_per_s"] / engine_side["output_tokens_per_s"]
                http["tpot_p50_over_engine_ms"] = http["tpot_ms"]["p50"] - engine_side["tpot_ms"]["p50"]
    result["compiled_after_serving"] = _compiled()
    result["num_preemptions"] = engine.num_preemptions
    result["peak_device_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    del engine, model
    jax.clear_caches()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["gpt_oss_120b", "mixtral_8x7b"], choices=list(HF_SHAPES))
    parser.add_argument("--schemes", nargs="+", default=["w_mxfp4"])
    parser.add_argument(
        "--attention-scheme", default="bf16", help="the attention projections' format (a Quark export's, e.g. w_mxfp4)"
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: the full depth)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--context", type=int, default=1023, help="cached positions in the decode steps")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency-requests", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-model-len", type=int, default=2048 + 64)
    parser.add_argument("--memory-fraction", type=float, default=0.9)
    parser.add_argument("--attention", default="auto", help="the engine's attention backend")
    parser.add_argument(
        "--mesh",
        metavar="DxExT",
        help="split each model over data x expert x tensor devices (the floor then counts their summed bandwidth)",
    )
    parser.add_argument("--copy-tbps", type=float, help="use this copy bandwidth instead of measuring it")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="the prefill phase's prompt (0: none)")
    parser.add_argument("--matmul-tflops", type=float, help="use this bf16 matmul rate instead of measuring it")
    parser.add_argument("--http", action="store_true", help="also serve the workloads over HTTP (the serve extra)")
    parser.add_argument(
        "--http-engine",
        choices=["process", "thread"],
        default="process",
        help="with --http: the engine in a process of its own (as quarkmoe serve runs it; before the other phases) "
        "or on a thread of the server's process",
    )
    parser.add_argument("--url", help="only send the workloads to the server at this URL")
    parser.add_argument("--vocab", type=int, default=256, help="with --url: prompt token ids are below this")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="HTTP client processes sending the all-at-once workload (one Python client parses ~10k SSE events/s)",
    )
    parser.add_argument("--client-part", help=argparse.SUPPRESS)  # i/n: one of several client processes
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    if args.url:
        return client_main(args)
    bandwidth = args.copy_tbps or copy_tbps(10)
    size = 8192 if jax.default_backend() == "gpu" else 1024  # a CPU dry run: a matmul that takes a moment
    tflops = args.matmul_tflops or (matmul_tflops(10, size) if args.prefill_tokens else 0.0)
    print(f"{jax.devices()[0].device_kind}: copy {bandwidth:.3g} TB/s, bf16 matmul {tflops:.4g} TFLOP/s", flush=True)
    results = []
    doc = {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "versions": {"jax": jax.__version__},
        "triton_launcher": triton_launch.launcher(),  # kernels/triton/launch.py
        "copy_tbps": bandwidth,
        "matmul_tflops": tflops,
        "workload": {k: v for k, v in json.loads(LENGTHS.read_text()).items() if k.startswith("mean")},
        "settings": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "results": results,
    }

    last = {}

    def save(partial=None):
        last["result"] = partial
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**doc, "results": results + ([partial] if partial else [])}, indent=2))

    for shape in args.shapes:
        for scheme in args.schemes:
            try:
                results.append(bench(shape, scheme, args, bandwidth, tflops, save))
            except Exception as e:  # noqa: BLE001 - out of memory: recorded, the run goes on
                partial = last.get("result") or {"shape": shape, "scheme": scheme}  # the phases that ran
                results.append({**partial, "skipped": f"{type(e).__name__}: {e}"[:400]})
                print(f"{shape} {scheme} skipped: {results[-1]['skipped']}", flush=True)
                jax.clear_caches()
            save()
            last.clear()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
