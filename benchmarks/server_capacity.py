"""How many tokens/s the HTTP server itself can stream: `quarkmoe serve`'s app over an engine whose steps cost
nothing.

The app (:func:`quarkmoe_jax.serving.server.create_app`, uvicorn on a thread of this process) serves a stand-in
engine that gives every running request its next token at each step without a model, in a process of its own as
``quarkmoe serve`` runs its engine (``--engine thread``: on a thread of this process, as an engine built in a
notebook is served), so what limits the tokens/s measured is the server's own work per token (the hand-off from
the engine, the event loop, detokenizing, SSE encoding, uvicorn) and the clients'. The workload is ``serve_bench``'s
(ShareGPT-like lengths, all at once, streaming completions with token-id prompts), sent by
``--client-processes`` client processes. Runs on the CPU: the number to compare is an engine's tokens/s (a GPU
engine that makes more tokens/s than this server can stream is held back by the server). ``--step-ms`` gives
each step a duration (the engine's thread sleeps, releasing the GIL as a GPU step's wait does): the throughput
is then also given against the engine alone (every request from the first step, the longest one's steps).

    python benchmarks/server_capacity.py --requests 200 --client-processes 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from serve_bench import LENGTHS, http_serve, served  # noqa: E402

from quarkmoe_jax.errors import InputError  # noqa: E402
from quarkmoe_jax.serving.async_engine import AsyncEngine  # noqa: E402
from quarkmoe_jax.serving.engine import RequestOutput  # noqa: E402


class InstantEngine:
    """The engine interface the server uses, with steps that cost nothing: each step gives every request its
    next token (token ``(prompt length + i) % vocab``), as many as its ``max_new_tokens``. A step takes
    ``step_s`` (sleeping, as a wait for the GPU releases the interpreter lock), of which ``host_s`` is spent
    in Python holding the lock (as the real engine's scheduling and dispatch)."""

    def __init__(self, vocab: int, context: int, step_s: float = 0.0, host_s: float = 0.0):
        self.context = types.SimpleNamespace(length=context)
        self.config = types.SimpleNamespace(vocab_size=vocab, eos_token_ids=())
        allocator = types.SimpleNamespace(num_free=1, num_blocks=1)
        self.scheduler = types.SimpleNamespace(running=[], waiting=[], allocator=allocator)
        self.step_s, self.host_s = step_s, host_s
        self._requests: dict[str, list[int]] = {}  # id -> [tokens made, tokens wanted, next token]
        self._ids = 0

    def add_request(self, prompt_ids, params, request_id=None) -> str:
        if not prompt_ids or len(prompt_ids) + params.max_new_tokens > self.context.length:
            raise InputError("prompt_ids: empty or beyond the context", field="prompt_ids")
        self._ids += 1
        request_id = request_id or f"r{self._ids}"
        self._requests[request_id] = [0, params.max_new_tokens, len(prompt_ids)]
        return request_id

    def abort_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        while time.perf_counter() - start < self.host_s:  # Python work: holds the interpreter lock
            pass
        if self.step_s > self.host_s:
            time.sleep(self.step_s - self.host_s)
        outputs = []
        for request_id, state in list(self._requests.items()):
            state[0] += 1
            token = (state[2] + state[0]) % self.config.vocab_size
            finished = state[0] >= state[1]
            outputs.append(RequestOutput(request_id, [token], finished))
            if finished:
                del self._requests[request_id]
        return outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--step-ms", type=float, default=0.0, help="make each engine step take this long")
    parser.add_argument(
        "--host-ms", type=float, default=0.0, help="of each step, this long in Python holding the interpreter lock"
    )
    parser.add_argument("--engine", choices=["process", "thread"], default="process", help="where the engine runs")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)

    settings = (args.vocab, 4096, args.step_ms / 1e3, args.host_ms / 1e3)
    if args.engine == "process":
        engine = AsyncEngine.spawn(InstantEngine, *settings)
    else:
        engine = AsyncEngine(InstantEngine(*settings))
    lengths = json.loads(LENGTHS.read_text())
    workload = list(zip(lengths["input"], lengths["output"], strict=True))[: args.requests]
    with served(engine, "capacity") as url:
        cpu, wall = time.process_time(), time.monotonic()
        result = http_serve(url, workload, None, args.vocab, processes=args.client_processes)
        result["server_process_cpu_per_s"] = (time.process_time() - cpu) / (time.monotonic() - wall)
    result["engine_generation_tokens"] = engine.state.generation_tokens  # the engine's count (its last state)
    result["engine"] = args.engine
    if args.step_ms:  # the engine alone: every request runs from the first step, the longest sets the time
        alone = sum(out for _, out in workload) / (max(out for _, out in workload) * args.step_ms / 1e3)
        result["engine_alone_output_tokens_per_s"] = alone
        result["throughput_over_engine"] = result["output_tokens_per_s"] / alone
    print(
        f"server alone: {result['output_tokens_per_s']:.0f} output tok/s over {result['requests']} requests "
        f"(engine: {args.engine}, TPOT p50 {result['tpot_ms']['p50']:.2f} ms); server process "
        f"{result['server_process_cpu_per_s']:.2f} cores, busiest of {result['client_processes']} clients "
        f"{result['client_cpu_share_max']:.2f} of a core"
        + (f"; {result['throughput_over_engine']:.2f} of the engine alone" if args.step_ms else ""),
        flush=True,
    )
    if args.json:
        doc = {"date": datetime.date.today().isoformat(), "settings": vars(args) | {"json": str(args.json)}, **result}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
