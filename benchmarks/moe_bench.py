"""MoE experts benchmark: quarkmoe-jax backends against same-run baselines and ceilings.

Run on a GPU (one command; writes a table and JSON):

    python benchmarks/moe_bench.py --shapes mixtral gpt_oss deepseek_v3 --tokens 1 16 256 4096 \\
        --json benchmarks/results/h100.json

Per (shape, tokens, routing) it times, in one process:
* our backends (``emulation``, ``pallas``, ``triton`` where jax-triton is installed) for each scheme, and
  the pseudo-scheme ``bf16`` (bfloat16 weights through the same kernels: our bf16 grouped matmul);
* ``jax.lax.ragged_dot`` on bf16 weights (GEMM1 + silu-and-mul + GEMM2 on expert-sorted rows);
* ``ragged_dot_mgpu`` (JAX's Hopper Mosaic GPU example) on bf16 weights, best of a small config sweep;
* the two ceilings: a bf16 dense matmul (8192^3) and a device copy (bytes read + written).
It reports microseconds, TB/s over the bytes actually touched (packed weights of the touched experts plus
activations), TF/s, the fraction of each ceiling, the speedup over ``lax.ragged_dot`` and peak device memory.

Timing: warm-up, then the median of ``--repeats`` runs: CUPTI kernel time on a GPU (the ``timer`` field of
the JSON says which), wall time otherwise; on a GPU a 256 MiB buffer is rewritten before every measured call
(not timed), so every call starts with a cold L2, as the anchor's figures were taken. Inputs are seeded
random normals, never zeros.

Also: the anchor (OpenAI ``triton_kernels`` MXFP4 MoE on the same GPU model, ``benchmarks/anchors/``) next to
each ``w_mxfp4`` row (``vs_anchor`` = anchor time / ours, > 1 is faster); ``--module`` times the user's path
(``QuarkMoEBlock`` with its router, under ``jax.jit`` of ``nnx.split`` state; CUPTI kernel time and wall
time, plus ``nnx.jit`` wall time) and its device memory over the packed bytes. A baseline or case that cannot
run (out of memory, a kernel that refuses the shape) is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import quarkmoe_jax as qm
from quarkmoe_jax.checkpoint.exporter import scheme_layer_config
from quarkmoe_jax.formats import float_qarray, scaled_qarray
from quarkmoe_jax.kernels import base as kernel_base
from quarkmoe_jax.kernels.registry import KERNEL_BACKENDS
from quarkmoe_jax.kernels.triton import launch as triton_launch
from quarkmoe_jax.kernels.triton.backend import FUSED_EPILOGUE_ENV
from quarkmoe_jax.moe import op
from quarkmoe_jax.moe.fused import kernel_weights
from quarkmoe_jax.schemes import ActivationQuant, MoEQuantConfig, MoEShape, WeightQuant, get_moe_scheme

SHAPES = {  # name: (experts, top_k, hidden, intermediate)
    "mixtral": (8, 2, 4096, 14336),
    "gpt_oss": (128, 4, 2880, 2880),
    "deepseek_v3": (256, 8, 7168, 2048),
    "tiny": (4, 2, 64, 64),
    "small": (16, 4, 256, 512),
}
SCHEMES = (
    "w_mxfp4",
    "w_mxfp4_a_mxfp4",
    "w_mxfp6_e2m3_a_mxfp6_e2m3",
    "w_mxfp4_a_fp8",
    "w8a8_int8_channel_dynamic_token",
    "w8a8_int8_tensor_static",
    "w8a8_fp8_tensor_static",
    "w8a8_fp8_channel_dynamic_token",
    "bf16",
)
L2_BYTES = 50 * 2**20


def _cupti_measure():
    try:
        from jax.experimental.mosaic.gpu import profiler
    except ImportError:
        return None
    return profiler.measure if jax.default_backend() == "gpu" else None


TIMER = "cupti" if _cupti_measure() else "wall"


FLUSH_BYTES = 256 * 2**20
_flush_state: dict = {}


def flush_l2() -> None:
    """Rewrite a 256 MiB device buffer (more than any L2): the next call starts with a cold cache."""
    if "fn" not in _flush_state:
        _flush_state["buffer"] = jnp.zeros((FLUSH_BYTES // 4,), jnp.float32)
        _flush_state["fn"] = jax.jit(lambda b: b + 1.0, donate_argnums=0)
    _flush_state["buffer"] = jax.block_until_ready(_flush_state["fn"](_flush_state["buffer"]))


def timeit(fn, arg_sets, repeats: int = 20, warmup: int = 3, jit: bool = True) -> float:
    """Median time in microseconds of ``fn(*args)``, cycling through ``arg_sets``.

    ``fn`` must take every array as an argument (a jitted closure would bake captured arrays in as
    constants). On a GPU each repeat is one CUPTI measurement (summed kernel time of the call, leaving out
    Python dispatch and launch gaps; ``jax.experimental.mosaic.gpu.profiler``) after an L2 flush (not
    timed). Elsewhere: wall time, synchronizing after each call.
    """
    fn = jax.jit(fn) if jit else fn
    for n in range(warmup):
        jax.block_until_ready(fn(*arg_sets[n % len(arg_sets)]))
    measure = _cupti_measure()
    samples = []
    for n in range(repeats):
        args = arg_sets[n % len(arg_sets)]
        if measure is not None:
            flush_l2()
            _, ms = measure(fn)(*args)
            samples.append((ms or 0.0) / 1e3)
        else:
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def kernel_breakdown(fn, args) -> list[tuple[str, float]] | None:
    """Per-kernel CUPTI times ``[(kernel name, us)]`` of one warm call (GPU only; None elsewhere)."""
    measure = _cupti_measure()
    if measure is None:
        return None
    _, timings = measure(jax.jit(fn), aggregate=False)(*args)
    return [(name, ms * 1e3) for name, ms in timings or []]


def routing(key, tokens: int, experts: int, top_k: int, skewed: bool):
    """``topk_ids [T, k]`` distinct per token: uniform, or Zipf-like (p ~ 1/(rank+1)) when skewed."""
    logits = jax.random.gumbel(key, (tokens, experts))
    if skewed:
        logits = logits + jnp.log(1.0 / (jnp.arange(experts) + 1.0))
    return lax.top_k(logits, top_k)[1].astype(jnp.int32)


def copy_tbps(repeats: int, mib: int = 512) -> float:
    """The device's copy bandwidth in TB/s: read + write of a ``mib`` MiB bfloat16 array (``x + 1``)."""
    x = jax.random.normal(jax.random.key(2), (mib * 2**19,), jnp.bfloat16)
    copy_us = timeit(lambda x: x + jnp.bfloat16(1), [(x,)], repeats=repeats)
    return 2 * x.nbytes / copy_us / 1e6


def matmul_tflops(repeats: int, n: int = 8192) -> float:
    """The device's bfloat16 matmul rate in TFLOP/s: one ``[n, n] @ [n, n]`` product."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul_us = timeit(lambda a, b: a @ b, [(a, b)], repeats=repeats)
    return 2 * n**3 / matmul_us / 1e6


def ceilings(repeats: int) -> dict[str, float]:
    return {"matmul_tflops": matmul_tflops(repeats), "copy_tbps": copy_tbps(repeats)}


@dataclasses.dataclass
class Problem:
    shape: str
    tokens: int
    skewed: bool
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    ids: jax.Array
    weights: jax.Array
    x: jax.Array

    @property
    def touched(self) -> int:
        return int(np.unique(np.asarray(self.ids)).size)

    @property
    def flops(self) -> float:
        return 2.0 * self.tokens * self.top_k * 3 * self.hidden * self.intermediate


def make_problem(shape: str, tokens: int, skewed: bool) -> Problem:
    e, k, h, i = SHAPES[shape]
    key = jax.random.key(tokens * 7 + skewed)
    k1, k2, k3 = jax.random.split(key, 3)
    ids = routing(k1, tokens, e, k, skewed)
    weights = jax.nn.softmax(jax.random.normal(k2, (tokens, k)), axis=-1)
    x = jax.random.normal(k3, (tokens, h), jnp.bfloat16)
    return Problem(shape, tokens, skewed, e, k, h, i, ids, weights, x)


def weight_copies(bytes_per_copy: int) -> int:
    """Copies of a weight set to rotate through when L2 is not flushed (CPU wall-clock runs): together more
    than twice L2, at most 4; one on a GPU (every call is preceded by an L2 flush)."""
    if _cupti_measure() is not None:
        return 1
    return max(1, min(4, -(-2 * L2_BYTES // max(bytes_per_copy, 1))))


def free_device_bytes() -> int | None:
    """Bytes the device can still allocate (None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def guarded(what: str, fn, *args):
    """``fn(*args)``, or ``{"skipped": reason}`` when it cannot run (out of memory, a refused shape): recorded,
    never fatal."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError (RESOURCE_EXHAUSTED), Triton / Mosaic errors
        reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        print(f"  {what} skipped: {reason}", file=sys.stderr, flush=True)
        jax.clear_caches()
        return {"skipped": reason}


def load_anchors(device_kind: str) -> dict[tuple[str, int], dict]:
    """``{(shape, tokens): case}`` of the anchor figures recorded on this device model (benchmarks/anchors).

    Files are read in name order (``<gpu>_<what>_<date>.json``), so a later date's figure for a case replaces
    an earlier one's; each case keeps its file's name under ``"source"``."""
    import pathlib

    found = {}
    for path in sorted((pathlib.Path(__file__).parent / "anchors").glob("*.json")):
        doc = json.loads(path.read_text())
        model = doc["provenance"]["device"].split("(")[0].replace("NVIDIA", "").strip()
        if model and model in device_kind:
            for case in doc["cases"]:
                found[(case["shape"], case["tokens"])] = {**case, "source": path.name}
    return found


def bench_ragged_dot(p: Problem, w13s, w2s, repeats: int) -> float:
    """``lax.ragged_dot`` on bf16 weights: sorted rows, GEMM1, silu-and-mul, GEMM2 (no combine)."""

    def run(x, ids, w13, w2):
        flat = ids.reshape(-1)
        order = jnp.argsort(flat)
        sizes = jnp.bincount(flat, length=p.experts).astype(jnp.int32)
        rows = x[order // p.top_k]
        h = lax.ragged_dot(rows, w13, sizes, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        a = (jax.nn.silu(h[:, : p.intermediate]) * h[:, p.intermediate :]).astype(jnp.bfloat16)
        return lax.ragged_dot(a, w2, sizes, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    return timeit(run, [(p.x, p.ids, w13, w2) for w13, w2 in zip(w13s, w2s, strict=True)], repeats=repeats)


def bench_ragged_dot_mgpu(p: Problem, w13s, repeats: int) -> float | None:
    """JAX's Hopper example kernel on bf16 (GEMM1 only, as shipped; doubled for the MoE estimate)."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except ImportError:
        return None
    flat = p.ids.reshape(-1)
    order = jnp.argsort(flat)
    sizes = jnp.bincount(flat, length=p.experts).astype(jnp.int32)
    rows = p.x[order // p.top_k]
    best = None
    for block_m, block_n, block_k in ((64, 128, 64), (128, 128, 64), (128, 256, 64)):
        try:

            def fn(lhs, rhs, gs, bm=block_m, bn=block_n, bk=block_k):
                return ragged_dot_mgpu.ragged_dot(
                    lhs,
                    rhs,
                    group_sizes=gs,
                    block_m=bm,
                    block_n=bn,
                    block_k=bk,
                    max_concurrent_steps=4,
                    grid_block_n=1,
                )

            us = timeit(fn, [(rows, w, sizes) for w in w13s], repeats=repeats)
        except Exception as e:  # configs the kernel rejects for this shape
            print(
                f"  ragged_dot_mgpu {block_m}x{block_n}x{block_k}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr
            )
            continue
        best = us if best is None else min(best, us)
    return best


def random_mx_weights(key, shape, fmt) -> qm.QArray:
    """Seeded Gaussian expert weights quantized one expert at a time (bounded temporaries)."""

    @jax.jit
    def make(keys):
        return jax.lax.map(lambda k: qm.quantize(jax.random.normal(k, shape[1:], jnp.bfloat16) * 0.02, fmt), keys)

    return make(jax.random.split(key, shape[0]))


def random_w8a8_weights(key, shape, kind: str, granularity: str):
    """Seeded Gaussian expert weights quantized to int8 / e4m3 codes with per-channel ``[E, N]`` or
    per-tensor ``[E]`` float32 scales, one expert at a time, as a :class:`~quarkmoe_jax.formats.QArray`."""
    qmax = 127.0 if kind == "int8" else 448.0

    def one(k):
        w = jax.random.normal(k, shape[1:], jnp.float32) * 0.02
        amax = jnp.max(jnp.abs(w), axis=-1) if granularity == "channel" else jnp.max(jnp.abs(w))
        scale = amax / qmax
        scaled = w / (scale[:, None] if granularity == "channel" else scale)
        codes = jnp.clip(jnp.round(scaled), -128, 127).astype(jnp.int8) if kind == "int8" else scaled
        return codes.astype(jnp.int8 if kind == "int8" else jnp.float8_e4m3fn), scale

    codes, scales = jax.jit(lambda keys: jax.lax.map(one, keys))(jax.random.split(key, shape[0]))
    return scaled_qarray(codes, scales, granularity)


def scheme_config(scheme: str) -> MoEQuantConfig:
    if scheme == "bf16":
        return MoEQuantConfig("bf16", WeightQuant("none"), ActivationQuant("none"))
    return get_moe_scheme(scheme_layer_config(scheme)).quant_config()


def expert_params(p: Problem, config: MoEQuantConfig, kernel_layout: str | None) -> dict:
    """Seeded random expert weights of ``config``'s kind (and static input scales where it has them), MX
    weights in ``kernel_layout``'s layout (a backend name; None: Quark's)."""
    shapes = {"w13": (p.experts, 2 * p.intermediate, p.hidden), "w2": (p.experts, p.hidden, p.intermediate)}
    params = {}
    for seed, (name, shape) in enumerate(shapes.items(), start=1):
        key = jax.random.key(seed)
        weight = config.weight
        if weight.kind == "mx":
            w = random_mx_weights(key, shape, weight.mx_format)
            if kernel_layout:  # re-laid once, as after loading (prepare_for_kernels)
                w = kernel_weights(w, name, KERNEL_BACKENDS[kernel_layout])
            params[name] = w
        elif weight.kind in ("int8", "fp8"):
            params[name] = random_w8a8_weights(key, shape, weight.kind, weight.granularity)
        else:
            params[name] = float_qarray((jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16))
    act = config.activation
    if act.kind in ("fp8", "int8") and not act.dynamic:
        qmax = 448.0 if act.kind == "fp8" else 127.0
        params["w13_input_scale"] = jnp.float32(4.0 / qmax)
        params["w2_input_scale"] = jnp.float32(0.5 / qmax)
    return params


def bench_scheme(p: Problem, scheme: str, backend: str, repeats: int, breakdown: bool = False) -> dict:
    config = scheme_config(scheme)
    shape = MoEShape(p.experts, p.hidden, p.intermediate)
    params = expert_params(p, config, kernel_layout=None if backend == "emulation" else backend)

    def run(x, weights, ids, params):
        return op.moe_experts(x, weights, ids, params, config, shape, backend=backend)

    us = timeit(run, [(p.x, p.weights, p.ids, params)], repeats=repeats)
    per_expert = sum(v.nbytes for name, v in params.items() if "input_scale" not in name) / p.experts
    touched = p.touched * per_expert + 2 * p.x.nbytes
    result = {"us": us, "touched_bytes": touched}
    if breakdown:
        result["kernels"] = kernel_breakdown(run, (p.x, p.weights, p.ids, params))
    return result


def bench_baselines(p: Problem, repeats: int, on_gpu: bool) -> dict:
    """``lax.ragged_dot`` and ``ragged_dot_mgpu`` on bf16 weights; each recorded as skipped (with why) when it
    cannot run here (e.g. DeepSeek-V3's bf16 weights next to ``lax.ragged_dot``'s dense temporaries)."""
    baseline: dict = {}
    weight_bytes = 3 * p.experts * p.hidden * p.intermediate * 2
    free = free_device_bytes()
    if free is not None and weight_bytes > 0.8 * free:
        reason = f"needs {weight_bytes / 2**30:.1f} GiB of bf16 weights, {free / 2**30:.1f} GiB free"
        return {"ragged_dot_bf16_skipped": reason, "ragged_dot_mgpu_bf16_gemm1_skipped": reason}
    copies = weight_copies(weight_bytes)
    w13s = [
        jax.random.normal(jax.random.key(10 + c), (p.experts, p.hidden, 2 * p.intermediate), jnp.bfloat16)
        for c in range(copies)
    ]
    w2s = [
        jax.random.normal(jax.random.key(20 + c), (p.experts, p.intermediate, p.hidden), jnp.bfloat16)
        for c in range(copies)
    ]
    runs = {
        "ragged_dot_bf16": (bench_ragged_dot, p, w13s, w2s, repeats),
        "ragged_dot_mgpu_bf16_gemm1": (bench_ragged_dot_mgpu, p, w13s, repeats),
    }
    for name, (fn, *fn_args) in runs.items():
        if name.startswith("ragged_dot_mgpu") and not on_gpu:
            continue
        result = guarded(name, fn, *fn_args)
        if isinstance(result, dict):
            baseline[f"{name}_skipped"] = result["skipped"]
        elif result is not None:
            baseline[f"{name}_us"] = result
    del w13s, w2s
    return baseline


def bench_module(p: Problem, scheme: str, repeats: int) -> dict:
    """The user's path: a ``QuarkMoEBlock`` (router + experts, ``backend="auto"``) made as
    ``from_checkpoint`` makes it, called under ``jax.jit`` of its ``nnx.split`` state (CUPTI kernel time of
    the whole block, routing included, and wall time per call) and under ``nnx.jit`` (wall time); device
    bytes of the block over its packed expert bytes."""
    from flax import nnx

    from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock, RoutingConfig

    config = scheme_config(scheme)
    shape = MoEShape(p.experts, p.hidden, p.intermediate)
    before = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0)
    params = expert_params(p, config, kernel_layout=None)
    packed = sum(v.nbytes for v in jax.tree_util.tree_leaves(params))
    experts = QuarkMoE(config, shape, params).prepare_for_kernels()
    del params
    router = jax.random.normal(jax.random.key(5), (p.experts, p.hidden), jnp.float32) * 0.05
    block = QuarkMoEBlock(experts, router, RoutingConfig(top_k=p.top_k))
    after = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0)
    graphdef, state = nnx.split(block)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    result = {"module_us": timeit(forward, [(state, p.x)], repeats=repeats)}
    jitted = jax.jit(forward)
    nnx_jitted = nnx.jit(lambda block, x: block(x))
    for key, call in (
        ("module_wall_us", lambda: jitted(state, p.x)),
        ("module_nnx_jit_wall_us", lambda: nnx_jitted(block, p.x)),
    ):
        jax.block_until_ready(call())
        samples = []
        for _ in range(max(5, repeats)):
            start = time.perf_counter()
            jax.block_until_ready(call())
            samples.append(time.perf_counter() - start)
        result[key] = statistics.median(samples) * 1e6
    if after > before:
        result["module_device_bytes_over_packed"] = (after - before - router.nbytes) / packed
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mixtral", "gpt_oss", "deepseek_v3"], choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 4096])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--backends", nargs="+", default=None, help="default: every registered backend")
    parser.add_argument("--skewed", action="store_true", help="also Zipf-skewed routing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--module", action="store_true", help="also time the QuarkMoEBlock path (backend auto)")
    parser.add_argument("--breakdown", action="store_true", help="also record and print per-kernel times (GPU)")
    parser.add_argument(
        "--no-fp8-tensor-cores", action="store_true", help="FP8 W8A8 with e4m3 codes in bfloat16 (to compare)"
    )
    parser.add_argument("--json", help="write all numbers here (rewritten after every case: a crash loses nothing)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    if args.no_fp8_tensor_cores:
        kernel_base.FP8_TENSOR_CORES[device.device_kind] = False
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "triton_launcher": triton_launch.launcher(),  # kernels/triton/launch.py
        "mx_fused_epilogue": os.environ.get(FUSED_EPILOGUE_ENV, "") == "1",  # the v3 kernel forced on
        "quarkmoe_jax": qm.__version__,
        "timer": TIMER,
        "l2_flush_bytes": FLUSH_BYTES if on_gpu else 0,
        "fp8_tensor_cores": kernel_base.fp8_tensor_cores(device.device_kind),
        # what backend_table.py records per row: the kernel generation each backend ran (mx / dense weights)
        "kernel_generations": {
            name: {kind: g.number for kind, g in backend.generations.items()}
            for name, backend in KERNEL_BACKENDS.items()
        },
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
        import jax_triton

        meta["jax_triton"] = getattr(jax_triton, "__version__", "?")
    except ImportError:
        pass
    ceiling = {} if args.no_baselines or not on_gpu else ceilings(args.repeats)
    anchors = load_anchors(device.device_kind)
    rows, skipped = [], []
    backends = args.backends or sorted(op.BACKENDS)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "ceilings": ceiling, "rows": rows, "skipped": skipped}, f, indent=1)

    for shape in args.shapes:
        for tokens in args.tokens:
            for skewed in (False, True) if args.skewed else (False,):
                p = make_problem(shape, tokens, skewed)
                baseline = {} if args.no_baselines else bench_baselines(p, args.repeats, on_gpu)
                anchor = anchors.get((shape, tokens)) if not skewed else None
                for scheme in args.schemes:
                    for backend in [*backends, *(["module"] if args.module else [])]:
                        case = dict(shape=shape, tokens=tokens, skewed=skewed, scheme=scheme, backend=backend)
                        try:
                            if backend == "module":
                                r = guarded(f"{case}", bench_module, p, scheme, args.repeats)
                                if "module_us" in r:
                                    r = {**r, "us": r["module_us"]}
                            else:
                                r = guarded(f"{case}", bench_scheme, p, scheme, backend, args.repeats, args.breakdown)
                        except NotImplementedError as e:
                            print(f"skip {backend} {scheme}: {e}", file=sys.stderr)
                            skipped.append({**case, "reason": f"NotImplementedError: {e}"})
                            continue
                        if "skipped" in r:
                            skipped.append({**case, "reason": r["skipped"]})
                            save()
                            continue
                        row = {**case, "touched_experts": p.touched, **r, **baseline}
                        row.setdefault("touched_bytes", _touched_bytes(p, scheme))
                        row["tbps"] = row["touched_bytes"] / r["us"] / 1e6
                        row["tflops"] = p.flops / r["us"] / 1e6
                        if ceiling:
                            row["pct_copy"] = 100 * row["tbps"] / ceiling["copy_tbps"]
                            row["pct_matmul"] = 100 * row["tflops"] / ceiling["matmul_tflops"]
                        if "ragged_dot_bf16_us" in baseline:
                            row["speedup_vs_ragged_dot"] = baseline["ragged_dot_bf16_us"] / r["us"]
                        if anchor is not None:
                            row["anchor_us"] = anchor["us"]
                            row["vs_anchor"] = anchor["us"] / r["us"]
                        stats = device.memory_stats() or {}
                        row["peak_bytes"] = stats.get("peak_bytes_in_use")
                        rows.append(row)
                        print(_format(row), flush=True)
                        for name, us in row.get("kernels") or []:
                            print(f"    {us:9.1f} us  {name[:100]}")
                        save()
    if ceiling:
        print(f"ceilings: bf16 dense matmul {ceiling['matmul_tflops']:.0f} TF/s, copy {ceiling['copy_tbps']:.2f} TB/s")
    for item in skipped:
        print(f"skipped: {item}")
    save()
    return 0


def _touched_bytes(p: Problem, scheme: str) -> float:
    """Packed weight bytes of the touched experts plus the activations read and written."""
    config = scheme_config(scheme)
    per_param = {"mx": 0.53125 if config.weight.mx_format == "mxfp4" else 0.78125, "int8": 1, "fp8": 1}
    per_expert = 3 * p.hidden * p.intermediate * per_param.get(config.weight.kind, 2)
    return p.touched * per_expert + 2 * p.x.nbytes


def _format(r: dict) -> str:
    extra = ""
    if "ragged_dot_bf16_us" in r:
        extra += f" | ragged_dot bf16 {r['ragged_dot_bf16_us']:9.1f} us ({r['speedup_vs_ragged_dot']:.2f}x)"
    if r.get("ragged_dot_mgpu_bf16_gemm1_us"):
        extra += f" | mgpu GEMM1 {r['ragged_dot_mgpu_bf16_gemm1_us']:9.1f} us"
    if "vs_anchor" in r and r["scheme"] == "w_mxfp4":
        extra += f" | anchor {r['anchor_us']:.1f} us ({r['vs_anchor']:.2f}x)"
    if "module_wall_us" in r:
        extra += f" | wall {r['module_wall_us']:.0f} us, nnx.jit {r['module_nnx_jit_wall_us']:.0f} us"
    return (
        f"{r['shape']:<12} T={r['tokens']:<5} {'skew' if r['skewed'] else 'unif'} {r['scheme']:<26} "
        f"{r['backend']:<10} {r['us']:10.1f} us {r['tbps']:6.3f} TB/s {r['tflops']:7.1f} TF/s{extra}"
    )


if __name__ == "__main__":
    sys.exit(main())
