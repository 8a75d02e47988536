"""Where an engine decode step's time goes: a ``jax.profiler`` trace of steady-state steps, summarised.

Builds a random model of a public shape (as ``serve_bench.py``: ``model_bench.HF_SHAPES``, ``--layers`` of its
decoder layers, experts in ``--scheme``, attention projections in ``--attention-scheme``), prefills ``--batch``
requests of ``--context`` tokens through an :class:`~quarkmoe_jax.serving.Engine`, then traces ``--steps``
decode steps and prints:

* per step: wall time (host clock), the device's busy time (the union of its kernels' intervals) and its idle
  time (the gaps: launch latency, host work the device waits for), the number of kernels;
* the kernels grouped by the source line of the JAX code that emitted them (the optimized HLO's ``metadata``
  of each executed op: ``layers.py:123 dot_general``), their time per step and per decoder layer, most first;
* the top kernels by name;
* the host's time per step by phase (an untraced run: the scheduler, building the step's arrays, dispatching
  the compiled step, collecting its tokens and anything else), the part of the wall time the device waits on
  when it is idle.

On a GPU the kernels are the device plane's stream events; on the CPU (a smoke test, not a figure) the XLA
ops the host threads ran. Both engines' scheduling modes are traced (``--scheduling async sync``, default
both): the difference in idle time is the host work async scheduling hides.

    python benchmarks/step_profile.py --shape mixtral_8x7b --layers 8 --batch 1 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import pathlib
import re
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
from flax import nnx
from jax.profiler import ProfileData

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from model_bench import HF_SHAPES, build_model  # noqa: E402
from serve_bench import prefill  # noqa: E402

from quarkmoe_jax.kernels.triton import launch as triton_launch
from quarkmoe_jax.models import DecoderConfig  # noqa: E402
from quarkmoe_jax.serving import Engine  # noqa: E402
from quarkmoe_jax.serving import engine as engine_module  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s}]+)')
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def source_of_ops(hlo_text: str) -> dict[str, str]:
    """Each optimized-HLO instruction's origin, ``"file.py:line function op"`` (its innermost stack frame and the
    last part of its JAX ``op_name``), from the metadata XLA keeps on fusions and custom calls and the module's
    stack frame tables (``FileNames`` ... ``StackFrames``)."""
    tables: dict[str, dict[str, str]] = {name: {} for name in _TABLES}
    section, sources = None, {}
    for line in hlo_text.splitlines():
        if line in _TABLES:
            section = line
            continue
        if section is not None:
            if not line.strip():
                section = None
            else:
                key, _, value = line.partition(" ")
                tables[section][key] = value
            continue
        match = _INSTRUCTION.match(line)
        if match:
            sources[match.group(1)] = {k: v.strip('"') for k, v in _FIELD.findall(match.group(2))}

    def fields(text: str) -> dict[str, str]:
        return dict(_FIELD.findall(text))

    def where(frame_id: str | None) -> str:
        frame = fields(tables["StackFrames"].get(frame_id or "", ""))
        location = fields(tables["FileLocations"].get(frame.get("file_location_id", ""), ""))
        if not location:
            return ""
        file = tables["FileNames"].get(location.get("file_name_id", ""), "?").strip('"')
        function = tables["FunctionNames"].get(location.get("function_name_id", ""), "?").strip('"')
        return f"{pathlib.Path(file).name}:{location.get('line', '?')} {function}"

    named = {}
    for name, metadata in sources.items():
        op = metadata.get("op_name", "").rsplit("/", 1)[-1]
        frame = where(metadata.get("stack_frame_id"))
        if not frame and "source_file" in metadata:  # older XLA: the location inline
            frame = f"{pathlib.Path(metadata['source_file']).name}:{metadata.get('source_line', '?')}"
        named[name] = f"{frame} {op}".strip() or "?"
    return named


def kernel_events(profile: ProfileData) -> list[tuple[int, int, str, str]]:
    """``(start_ns, duration_ns, kernel name, hlo op)`` of every kernel the devices ran (the device planes'
    stream lines on a GPU; the host threads' XLA ops on the CPU)."""
    events = []
    device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
    for plane in device_planes or [p for p in profile.planes if p.name == "/host:CPU"]:
        lines = list(plane.lines)
        streams = [line for line in lines if line.name.startswith("Stream")] or lines
        for line in streams:
            for event in line.events:
                with warnings.catch_warnings():  # jaxlib's stats type warns on conversion (no __module__)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    stats = dict(event.stats)
                if device_planes or "hlo_op" in stats:
                    hlo_op = str(stats.get("hlo_op", event.name)).lstrip("%")
                    events.append((int(event.start_ns), int(event.duration_ns), event.name, hlo_op))
    return events


def busy_ns(events) -> int:
    """The union of the events' intervals, ns."""
    total, end = 0, None
    for start, duration, *_ in sorted(events):
        stop = start + duration
        if end is None or start > end:
            total += duration
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def profile_steps(engine: Engine, steps: int, sources: dict[str, str], layers: int) -> dict:
    """Trace ``steps`` engine steps (after two untraced ones); the summary of their kernels."""
    for _ in range(2):
        engine.step()
    with tempfile.TemporaryDirectory() as directory:
        jax.block_until_ready(engine.cache)
        with jax.profiler.trace(directory):
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            jax.block_until_ready(engine.cache)
            wall = (time.perf_counter() - start) / steps
        (path,) = pathlib.Path(directory).rglob("*.xplane.pb")
        events = kernel_events(ProfileData.from_file(str(path)))
    if not events:
        return {"wall_ms": wall * 1e3, "kernels": 0}
    busy = busy_ns(events) / steps / 1e6
    by_source: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for _, duration, name, hlo_op in events:
        for table, key in ((by_source, sources.get(hlo_op, f"({hlo_op})")), (by_name, name)):
            table[key][0] += duration / 1e3 / steps
            table[key][1] += 1 / steps

    def rows(table, limit):
        ranked = sorted(table.items(), key=lambda item: -item[1][0])[:limit]
        return [
            {"what": key, "us_per_step": us, "kernels_per_step": count, "us_per_layer": us / layers}
            for key, (us, count) in ranked
        ]

    return {
        "wall_ms": wall * 1e3,
        "device_busy_ms": busy,
        "device_idle_ms": wall * 1e3 - busy,
        "kernels_per_step": len(events) / steps,
        "by_source": rows(by_source, 25),
        "by_kernel": rows(by_name, 15),
    }


def host_phases(engine: Engine, steps: int) -> dict:
    """Host time per step (microseconds) by phase, over ``steps`` untraced steps: ``schedule`` (the scheduler),
    ``arrays`` (the step's host arrays), ``dispatch`` (the compiled step's call until it returns: argument
    transfers and launch), ``collect`` (waiting for a step's tokens and handing them out) and ``other``."""
    spent = collections.Counter()

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    patches = [
        (engine.scheduler, "schedule", timed("schedule", engine.scheduler.schedule)),
        (engine, "_step_arrays", timed("arrays", engine._step_arrays)),
        (engine, "_collect", timed("collect", engine._collect)),
        (engine_module, "_engine_step", timed("dispatch", engine_module._engine_step)),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, wrapper in patches:
        setattr(owner, name, wrapper)
    try:
        for _ in range(2):
            engine.step()
        jax.block_until_ready(engine.cache)
        spent.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        jax.block_until_ready(engine.cache)
        wall = time.perf_counter() - start
    finally:
        for owner, name, original in originals:
            if owner is engine_module:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the instance attribute shadowed the class's method
    phases = {name: spent[name] / steps * 1e6 for name in ("schedule", "arrays", "dispatch", "collect")}
    phases["other"] = wall / steps * 1e6 - sum(phases.values())
    return {"wall_us": wall / steps * 1e6, **phases}


def _record_step_arguments():
    """Wrap the engine's step so the arguments of its last call are kept (to lower it for the HLO text)."""
    original = engine_module._engine_step
    seen = {}

    def recording(*args, **kwargs):
        seen["call"] = (args, kwargs)
        return original(*args, **kwargs)

    engine_module._engine_step = recording
    return original, seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mixtral_8x7b", choices=list(HF_SHAPES))
    parser.add_argument("--scheme", default="w_mxfp4")
    parser.add_argument("--attention-scheme", default="bf16", help="the attention projections' format")
    parser.add_argument(
        "--oracle-linears",
        action="store_true",
        help="quantized projections on the oracle's GEMM (whole weight dequantized) instead of the kernel backend",
    )
    parser.add_argument("--layers", type=int, help="decoder layers (default: the full depth)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1023)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduling", nargs="+", choices=["async", "sync"], default=["async", "sync"])
    parser.add_argument("--max-model-len", type=int, default=2048 + 64)
    parser.add_argument("--attention", default="auto")
    parser.add_argument(
        "--min-step-tokens", type=int, help="the engine's smallest token bucket (default: the engine's own)"
    )
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)

    hf, full_layers = HF_SHAPES[args.shape]
    layers = args.layers or full_layers
    config = DecoderConfig.from_hf_config({**hf, "num_hidden_layers": layers, "torch_dtype": "bfloat16"})
    model = build_model(
        config, args.scheme, attention_scheme=args.attention_scheme, prepare_linears=not args.oracle_linears
    )
    jax.block_until_ready(nnx.state(model))
    engine = Engine(
        model,
        max_num_seqs=max(args.batch, 1),
        max_num_batched_tokens=max(256, args.batch),
        max_model_len=args.max_model_len,
        attention_backend=args.attention,
        min_step_tokens=args.min_step_tokens,
    )
    print(f"{args.shape} x {layers} layers, {args.scheme}, batch {args.batch}: {engine.summary()}", flush=True)
    new_tokens = 2 + len(args.scheduling) * 2 * (args.steps + 2) + 2
    prefill(engine, np.random.default_rng(0), args.batch, args.context, new_tokens)
    original, seen = _record_step_arguments()
    try:
        engine.step()
        call_args, call_kwargs = seen["call"]
        # shapes, not arrays: the call donated the cache's buffers (deleted on a GPU)
        call_args = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
            call_args,
        )
        hlo = original.lower(*call_args, **call_kwargs).compile().as_text()
    finally:
        engine_module._engine_step = original
    sources = source_of_ops(hlo)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "triton_launcher": triton_launch.launcher(),  # kernels/triton/launch.py
        "shape": args.shape,
        "scheme": args.scheme,
        "attention_scheme": args.attention_scheme,
        "linears": "oracle" if args.oracle_linears else "kernel backend where prepared",
        "layers": layers,
        "batch": args.batch,
        "context": args.context,
        "attention": engine.attention_backend,
        "min_step_tokens": engine.min_step_tokens,
    }
    for mode in args.scheduling:
        engine.async_scheduling = mode == "async"
        summary = profile_steps(engine, args.steps, sources, layers)
        summary["host_us"] = host = host_phases(engine, args.steps)
        result[mode] = summary
        print(
            f"\n{mode}: step {summary['wall_ms']:.3f} ms wall, device busy {summary.get('device_busy_ms', 0):.3f} ms, "
            f"idle {summary.get('device_idle_ms', 0):.3f} ms, {summary['kernels_per_step']:.0f} kernels a step"
        )
        print("  host per step (untraced), us: " + ", ".join(f"{k} {v:.0f}" for k, v in host.items()))
        for title in ("by_source", "by_kernel"):
            print(f"  {title}: us/step  us/layer  kernels/step")
            for row in summary.get(title, []):
                print(
                    f"    {row['us_per_step']:9.1f} {row['us_per_layer']:9.2f} {row['kernels_per_step']:7.1f}  "
                    f"{row['what'][:100]}"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
