"""``quarkmoe`` command line: thin wrappers over the public API.

Subcommands:
  demo       the main job on an embedded default: codec table, then a seeded small MoE layer exported in every
             scheme and run, with error vs the float layer, bytes per weight and time
  generate   load a whole model and generate from a prompt (text through tokenizer.json, or token ids)
  run-layer  run MoE block N of a checkpoint (router included) on x.npy [T, hidden] and write y.npy
  inspect    describe a checkpoint: architecture, scheme per MoE layer, expert bytes, padding, refusals
  plan       bytes per device of a checkpoint for each expert x tensor parallel layout, the KV cache room left
             and which layouts fit (headers only)
  quantize   export a float Hugging Face MoE checkpoint to Quark's format with a named scheme
  serve      an OpenAI-compatible HTTP server on the engine (/v1/completions, /v1/chat/completions, /metrics)
  synthetic  write a small seeded float MoE checkpoint (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, gpt-oss), with a
             byte-level tokenizer and a chat template
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import quarkmoe_jax as qm
from quarkmoe_jax.contracts import DEFAULT_SEMANTICS, SEMANTICS
from quarkmoe_jax.formats import quantizers
from quarkmoe_jax.tokenizer import MAX_TOKENIZER_BYTES, load_tokenizer  # noqa: F401 - generate's; cli.MAX_TOKENIZER_BYTES

# Relative RMS error of each MX format on Gaussian data (N = 4M, blocks of 32; performance_floors.md §5).
REFERENCE_GAUSSIAN_REL_RMS = {"mxfp4": 0.115, "mxfp6_e3m2": 0.054, "mxfp6_e2m3": 0.028, "mxfp8_e4m3": 0.029}


def _rel_rms(approx: np.ndarray, exact: np.ndarray) -> float:
    approx, exact = approx.astype(np.float64), exact.astype(np.float64)
    return float(np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact**2)))


def demo_rows(shape: tuple[int, int] = (2048, 4096), seed: int = 0) -> list[dict]:
    """Quantize one seeded Gaussian expert weight ``[N, K]`` (float32) in every format.

    Returns one dict per format/scale rule: relative RMS error, storage bytes per weight and round-trip
    checks (dequantize(quantize(w)) == quant_dequant(w) bit for bit, unpack∘pack is the identity,
    re-quantizing the dequantized weight reproduces the same bytes).
    """
    w = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.02
    w_np = np.asarray(w)
    rows = []
    quantize = jax.jit(qm.quantize, static_argnums=(1, 2))
    quant_dequant = jax.jit(qm.quant_dequant, static_argnums=(1, 2))
    for name, fmt in qm.MX_FORMATS.items():
        for mode in ("even", "floor"):
            t = quantize(w, name, mode)
            deq = t.dequantize(jnp.float32)
            qdq = quant_dequant(w, name, mode)
            again = quantize(deq, name, mode)
            codes = t.codes()
            checks = {
                "dequantize == quant_dequant": bool(jnp.array_equal(deq, qdq)),
                "unpack∘pack == id": bool(jnp.array_equal(qm.formats.pack_codes(codes, fmt), t.packed)),
                "requantize stable": bool(
                    jnp.array_equal(again.packed, t.packed) and jnp.array_equal(again.scales, t.scales)
                ),
            }
            rows.append(
                {
                    "format": name,
                    "scale": f"e8m0 {mode}",
                    "rel_rms": _rel_rms(np.asarray(deq), w_np),
                    "reference": REFERENCE_GAUSSIAN_REL_RMS[name],
                    "bytes_per_weight": t.nbytes / w.size,
                    "checks": checks,
                }
            )
    for label, quant, dequant in [
        ("fp8_e4m3", quantizers.fp8_quantize, quantizers.fp8_dequantize),
        ("int8", quantizers.int8_quantize, quantizers.int8_dequantize),
    ]:
        # Per output channel (one scale per row of W [N, K]) with Quark's weight numerics.
        q, s = quant(w, granularity="token", semantics="quark")
        if label == "int8":
            deq = dequant(q, s, jnp.float32)
        else:
            deq = dequant(q, s, jnp.float32, semantics="quark")
        if label == "int8":
            # Rounding error is at most half a step. Quark's s = amax/127.5 puts the row maximum on the
            # 127.5 tie (saturated to 127), so allow the float32 rounding of s itself (~128 ulps of amax).
            check = {"|error| <= scale/2": bool(jnp.all(jnp.abs(deq - w) <= s * (0.5 + 2.0**-12)))}
        else:
            check = {
                "requantize stable": bool(jnp.array_equal(quant(deq, granularity="token", semantics="quark")[0], q))
            }
        rows.append(
            {
                "format": label,
                "scale": "fp32 per-channel",
                "rel_rms": _rel_rms(np.asarray(deq), w_np),
                "reference": None,
                "bytes_per_weight": (q.size * 1 + s.size * 4) / w.size,
                "checks": check,
            }
        )
    return rows


def _print_table(rows: list[dict], out=None) -> None:
    out = out or sys.stdout
    header = f"{'format':<12} {'scale':<18} {'rel RMS err':>11} {'expected':>9} {'bytes/weight':>13}  round-trip"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        ref = f"{r['reference']:.3f}" if r["reference"] is not None else "-"
        ok = "ok" if all(r["checks"].values()) else "FAILED: " + ", ".join(k for k, v in r["checks"].items() if not v)
        print(
            f"{r['format']:<12} {r['scale']:<18} {r['rel_rms']:>11.4f} {ref:>9} {r['bytes_per_weight']:>13.4f}  {ok}",
            file=out,
        )


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    rows = demo_rows((args.rows, args.cols), args.seed)
    print(
        f"quarkmoe-jax {qm.__version__} on {jax.devices()[0].platform}: seeded Gaussian expert weight "
        f"[{args.rows}, {args.cols}] (std 0.02, seed {args.seed}); bf16 = 2 bytes/weight\n"
    )
    _print_table(rows)
    print(
        "\nexpected: the format's relative RMS error on Gaussian data (4M values, blocks of 32; "
        "docs/formats.md); this weight is Gaussian, so its error should be close to it"
    )
    print(f"({time.perf_counter() - start:.1f} s)")
    failed = [r for r in rows if not all(r["checks"].values())]
    layer_rows = None if args.no_layer else _demo_layer(args, rows)
    generation = None if args.no_model else _demo_model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"codecs": rows, "layer": layer_rows, "generation": generation}, f, indent=1)
    return 1 if failed else 0


def _demo_layer(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        layer_rows = demo_layer_rows(tmp, tokens=args.tokens, seed=args.seed)
    print(
        f"\nA seeded Mixtral-style MoE layer (8 experts, top-2, hidden 256, intermediate 512) exported in every "
        f"scheme and run on {args.tokens} tokens (emulation backend, vLLM semantics; static scales calibrated on "
        "256 tokens); error relative to the float (bf16-weight) layer:\n"
    )
    weight_error = {r["format"]: r["rel_rms"] for r in rows if r["scale"] in ("e8m0 even", "fp32 per-channel")}
    print(f"{'scheme':<34} {'rel RMS err':>11} {'weights alone':>13} {'bytes/weight':>13} {'ms':>8}")
    print("-" * 83)
    for r in layer_rows:
        alone = layer_weight_error(r["scheme"], weight_error)
        alone = f"{alone:.3f}" if alone is not None else "-"
        print(f"{r['scheme']:<34} {r['rel_rms']:>11.4f} {alone:>13} {r['bytes_per_weight']:>13.4f} {r['ms']:>8.2f}")
    print(
        "\nweights alone: what the quantized weights by themselves should cost this layer, sqrt(3) x the weight "
        "format's error in the table above (the output passes three quantized projections: gate and up, "
        "multiplied, then down), e.g. 0.2 for MXFP4; quantized activations add their own error on top "
        "(MXFP4 activations the most). '-': per-tensor weight scales (no Gaussian reference)."
    )
    print(f"({time.perf_counter() - start:.1f} s)")
    return layer_rows


def _demo_model(args: argparse.Namespace) -> dict:
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        generation = demo_model_generation(tmp, seed=args.seed)
    print(
        "\nA seeded synthetic Mixtral-style model (2 layers, hidden 128, 4 experts, vocabulary 128) exported "
        "with its experts in MXFP4, loaded whole (quarkmoe_jax.models.from_pretrained) and run next to its "
        "float original; greedy generation with a KV cache:\n"
    )
    print(f"prompt ids        {generation['prompt']}")
    for name in ("float", "w_mxfp4"):
        g = generation[name]
        rate = len(g["tokens"]) / g["seconds"]
        print(f"{name:<8} generates {g['tokens']}  ({rate:.0f} tokens/s)")
    print(
        f"\nMXFP4 vs float on the float model's sequence: logits relative RMS error "
        f"{generation['logits_rel_rms']:.3f}, the same top-1 next token at {generation['top1_agreement']:.0%} of "
        "the positions (random weights give near-tied logits, which flip more easily than a trained model's). "
        "Your own checkpoint: quarkmoe generate CKPT --prompt TEXT --max-new-tokens N"
    )
    print(f"({time.perf_counter() - start:.1f} s)")
    return generation


def demo_model_generation(tmp_dir, seed: int = 0, new_tokens: int = 8) -> dict:
    """Export a seeded synthetic Mixtral-style model (experts in MXFP4), load it whole with
    :func:`quarkmoe_jax.models.from_pretrained` next to its float original, and generate greedily from both.

    Also: the two models' logits on the float model's whole sequence (prompt + its generation): their
    relative RMS difference and how often their top-1 next tokens agree (teacher-forced, so one flipped
    token does not decide the rest)."""
    import pathlib
    import warnings

    from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
    from quarkmoe_jax.models import from_pretrained

    tmp_dir = pathlib.Path(tmp_dir)
    src = write_float_checkpoint(tmp_dir / "model_float", "mixtral", num_layers=2, hidden_size=128, seed=seed)
    quantized = export_quark_checkpoint(src, tmp_dir / "model_mxfp4", "w_mxfp4")
    prompt = np.asarray([[1, 17, 42, 7, 99, 3]], np.int32)
    result = {"prompt": prompt[0].tolist()}
    models = {}
    for name, path in (("float", src), ("w_mxfp4", quantized)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[name] = model = from_pretrained(path)
        model.generate(prompt, new_tokens, eos_token_id=[])  # compile
        start = time.perf_counter()
        out = model.generate(prompt, new_tokens, eos_token_id=[])
        result[name] = {"tokens": out[0, prompt.shape[1] :].tolist(), "seconds": time.perf_counter() - start}
        if name == "float":
            sequence = out
    f, q = (np.asarray(models[name](sequence), np.float64) for name in ("float", "w_mxfp4"))
    result["logits_rel_rms"] = float(np.sqrt(np.mean((q - f) ** 2) / np.mean(f**2)))
    result["top1_agreement"] = float(np.mean(f.argmax(-1) == q.argmax(-1)))
    return result


def layer_weight_error(scheme: str, weight_error: dict[str, float]) -> float | None:
    """The output error a layer's quantized weights alone should give: sqrt(3) x the weight format's error
    (three chained projections with independent errors), or None for per-tensor W8A8 weight scales."""
    if scheme.startswith("w_mx"):
        fmt = scheme[2:].split("_a_")[0]
    elif scheme.startswith("w8a8_") and "_channel_" in scheme:
        fmt = "int8" if "_int8_" in scheme else "fp8_e4m3"
    else:
        return None
    return 3**0.5 * weight_error[fmt]


def demo_layer_rows(tmp_dir, tokens: int = 64, seed: int = 0, schemes=None) -> list[dict]:
    """Export one seeded small Mixtral-style MoE layer in every scheme and run it against the float layer."""
    import pathlib
    import warnings

    from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES, calibrate_input_amax, export_quark_checkpoint
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint
    from quarkmoe_jax.nn import QuarkMoEBlock

    tmp_dir = pathlib.Path(tmp_dir)
    src = write_float_checkpoint(
        tmp_dir / "float",
        "mixtral",
        num_layers=1,
        hidden_size=256,
        intermediate_size=512,
        num_experts=8,
        top_k=2,
        seed=seed,
    )
    x = jax.random.normal(jax.random.key(seed + 1), (tokens, 256), jnp.float32)
    reference = np.asarray(QuarkMoEBlock.from_checkpoint(src, 0)(x), np.float64)
    amax = calibrate_input_amax(src, jax.random.normal(jax.random.key(seed + 2), (256, 256)))
    rows = []
    for scheme in schemes or EXPORT_SCHEMES:
        path = export_quark_checkpoint(src, tmp_dir / scheme, scheme, input_amax=amax)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block = QuarkMoEBlock.from_checkpoint(path, 0)
        jax.block_until_ready(block(x))  # compile
        start = time.perf_counter()
        out = np.asarray(jax.block_until_ready(block(x)), np.float64)
        elapsed = time.perf_counter() - start
        params = jax.tree_util.tree_leaves(block.experts.params())
        weights = block.experts.shape.num_experts * 3 * 256 * 512
        rows.append(
            {
                "scheme": scheme,
                "rel_rms": float(np.sqrt(np.mean((out - reference) ** 2) / np.mean(reference**2))),
                "bytes_per_weight": sum(p.nbytes for p in params) / weights,
                "ms": elapsed * 1e3,
            }
        )
    return rows


def parse_prompt_ids(text: str) -> np.ndarray:
    """``"1,2,3"`` -> int32 ``[1, 3]``; anything else (not integers, none, an id outside ``[0, 2**31)``) is an
    :class:`~quarkmoe_jax.errors.InputError` naming ``--prompt-ids``. The vocabulary is the model's to check."""
    from quarkmoe_jax.errors import InputError

    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise InputError(f"--prompt-ids {text[:60]!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    if not ids:
        raise InputError("--prompt-ids: no token ids given")
    bad = next((i for i in ids if not 0 <= i < 2**31), None)
    if bad is not None:
        shown = str(bad) if len(str(bad)) <= 30 else f"{str(bad)[:27]}..."
        raise InputError(f"--prompt-ids: {shown} is not a token id (ids are in [0, vocab))")
    return np.asarray([ids], np.int32)


def cmd_generate(args: argparse.Namespace) -> int:
    from quarkmoe_jax.checkpoint.loader import read_hf_config
    from quarkmoe_jax.errors import InputError
    from quarkmoe_jax.models import DecoderConfig, inputs
    from quarkmoe_jax.serving import Engine, SamplingParams, generate

    # every argument is checked against config.json before the weights are read or a cache is allocated
    config = DecoderConfig.from_hf_config(read_hf_config(args.checkpoint))
    tokenizer = load_tokenizer(args.checkpoint, needed=args.prompt is not None)
    prompts = []
    for text in args.prompt or ():
        ids = tokenizer.encode(text).ids
        if not ids:
            raise InputError(f"--prompt {text[:60]!r}: the tokenizer gives no tokens")
        prompts.append(np.asarray([ids], np.int64))
    prompts += [parse_prompt_ids(text) for text in args.prompt_ids or ()]
    dtype = jnp.dtype(config.dtype if args.dtype == "auto" else args.dtype)
    params = SamplingParams(
        args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    requests = [
        inputs.check_generation(config, ids, params.max_new_tokens, max_model_len=args.max_model_len, dtype=dtype)
        for ids in prompts
    ]
    model = _load_model(args, dtype)
    engine = Engine(model, max_num_seqs=min(len(prompts), 16))
    print(engine.summary(), file=sys.stderr)
    start = time.perf_counter()
    outputs = generate(model, [request.input_ids[0].tolist() for request in requests], params, engine=engine)
    elapsed = time.perf_counter() - start
    backend = backend_run(args.backend, model, (1, engine.max_num_batched_tokens), model.dtype)
    for index, (request, new) in enumerate(zip(requests, outputs, strict=True)):
        prompt = request.input_ids[0].tolist()
        label = f"[{index}] " if len(requests) > 1 else ""
        if tokenizer is not None:
            print(label + tokenizer.decode(prompt + new))
        print(f"{label}prompt ids: {prompt}")
        print(f"{label}new ids:    {new}")
    print(
        f"({sum(map(len, outputs))} tokens for {len(outputs)} prompt(s) in {elapsed:.2f} s, compile included; "
        f"{model.config.model_type}, dtype {model.dtype.name}, semantics {args.semantics}, backend {backend})",
        file=sys.stderr,
    )
    return 0


def cmd_run_layer(args: argparse.Namespace) -> int:
    from quarkmoe_jax.nn import QuarkMoEBlock

    x = read_npy(args.input, "--input")
    if x.dtype.kind != "f" or x.ndim != 2:
        raise ValueError(f"--input {args.input}: expected a float array [T, hidden], found {x.dtype}{list(x.shape)}")
    block = QuarkMoEBlock.from_checkpoint(args.checkpoint, args.layer, semantics=args.semantics)
    y = block(jnp.asarray(x, jnp.dtype(args.dtype)), backend=args.backend)
    np.save(args.output, np.asarray(y, np.float32))
    backend = backend_run(args.backend, block, (x.shape[0],), jnp.dtype(args.dtype))
    print(
        f"{args.output}: [{y.shape[0]}, {y.shape[1]}] ({args.dtype} values, saved as float32); "
        f"scheme {block.experts.quant_config.scheme}, semantics {args.semantics}, backend {backend}"
    )
    return 0


def backend_run(requested: str, module, token_counts, dtype) -> str:
    """The MoE backend that ran in ``module`` (a model or a block) for calls of ``token_counts`` rows of
    ``dtype``: ``requested`` itself, or for "auto" what auto picks for each expert module at each count (as
    ``moe.op.moe_experts`` does: the first of :func:`~quarkmoe_jax.moe.op.auto_order` whose trace does not
    raise ``NotImplementedError``; on CPU the emulation), e.g. ``"emulation (auto)"``."""
    import functools

    from flax import nnx

    from quarkmoe_jax.moe import op
    from quarkmoe_jax.nn import QuarkMoE

    if requested != "auto":
        return requested
    picked: dict[tuple, str] = {}
    experts = [m for _, m in nnx.iter_modules(module) if isinstance(m, QuarkMoE)]
    for experts_module in experts:
        for rows in token_counts:
            case = (experts_module.quant_config, experts_module.shape, rows)
            if case in picked:
                continue
            order = op.auto_order(experts_module.quant_config, rows)
            picked[case] = order[-1]
            x = jax.ShapeDtypeStruct((rows, experts_module.shape.hidden_size), dtype)
            weights, ids = jax.ShapeDtypeStruct((rows, 1), jnp.float32), jax.ShapeDtypeStruct((rows, 1), jnp.int32)
            for name in order[:-1]:  # the last one (the emulation) takes everything
                try:
                    jax.eval_shape(functools.partial(experts_module.apply, backend=name), x, weights, ids)
                except NotImplementedError:
                    continue
                picked[case] = name
                break
    return ", ".join(dict.fromkeys(picked.values())) + " (auto)"


_NPY_MAGIC = b"\x93NUMPY"


def read_npy(path: str, option: str, max_bytes: int | None = None) -> np.ndarray:
    """One array from a NumPy ``.npy`` file, never unpickling; anything else is a ``ValueError`` naming it
    (a FIFO or device, another format, a header claiming more bytes than the file holds or than ``max_bytes``,
    Python objects)."""
    import math
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ValueError(f"cannot read {option} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{option} {path}: expected a regular .npy file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
            if head != _NPY_MAGIC:
                hint = " (a .npz archive: save one array with numpy.save)" if head.startswith(b"PK") else ""
                raise ValueError(
                    f"{option} {path} is not a NumPy .npy file{hint}; write one with numpy.save(path, array)"
                )
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version}, expected 1.0 or 2.0 (what numpy.save writes)")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f, max_header_size=10_000)
            claimed = math.prod(shape) * dtype.itemsize
            available = os.fstat(f.fileno()).st_size - f.tell()
    except OSError as e:
        raise ValueError(f"cannot read {option} {path}: {e.strerror or e}") from None
    except (ValueError, TypeError, SyntaxError) as e:
        if str(e).startswith(option):
            raise
        raise ValueError(f"{option} {path}: not a readable .npy array ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{option} {path}: not a readable .npy array (it holds Python objects)")
    if max_bytes is not None and claimed > max_bytes:
        raise ValueError(
            f"{option} {path}: its header claims {list(shape)} {dtype} ({claimed} bytes), more than the {max_bytes} "
            "bytes read at most"
        )
    if claimed > available:
        raise ValueError(
            f"{option} {path}: its header claims {list(shape)} {dtype} ({claimed} bytes), the file holds {available}"
        )
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{option} {path}: not a readable .npy array ({e})") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from quarkmoe_jax.checkpoint.loader import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, semantics=args.semantics)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    arch = report["architecture"]
    print(
        f"{args.checkpoint}: {arch['model_type']}, {arch['num_layers']} layers, MoE layers "
        f"{_span(arch['moe_layers'])}; {arch['num_experts']} experts, top-{arch['top_k']}, hidden "
        f"{arch['hidden_size']}, expert intermediate {arch['intermediate_size']}"
    )
    routing = f"{arch['scoring']}" + (", renormalized" if arch["renormalize"] else "")
    if arch["num_expert_group"]:
        routing += f", grouped top-k ({arch['topk_group']} of {arch['num_expert_group']} groups)"
    if arch["routed_scaling_factor"] != 1.0:
        routing += f", scaling {arch['routed_scaling_factor']}"
    print(
        f"routing: {routing}; activation {arch['activation']}"
        + (", interleaved gate/up" if arch["interleaved"] else "")
    )
    if arch["shared_intermediate_size"]:
        print(f"shared experts: intermediate {arch['shared_intermediate_size']}")
    print(f"quantized: {report['quantized']}; semantics: {args.semantics}\n")
    print(f"{'layer':>5}  {'scheme':<34} {'expert MiB':>10}  {'hidden':>11}  {'intermediate':>12}  notes")
    refused = 0
    for layer, entry in report["layers"].items():
        if "refused" in entry:
            refused += 1
            print(f"{layer:>5}  {'REFUSED':<34} {'':>10}  {'':>11}  {'':>12}  {entry['refused']}")
            continue
        h, i = entry["hidden_size"], entry["intermediate_size"]
        pad = lambda v: f"{v[0]}" if v[0] == v[1] else f"{v[0]}->{v[1]}"  # noqa: E731
        print(
            f"{layer:>5}  {entry['scheme']:<34} {entry['expert_bytes'] / 2**20:>10.2f}  {pad(h):>11}  {pad(i):>12}  "
            f"{entry['vllm_method']}"
        )
    return 1 if refused else 0


def _span(values) -> str:
    values = list(values)
    if values and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ",".join(map(str, values))


_CATEGORY_NAMES = {
    "routed_experts": "routed experts",
    "shared_experts": "shared experts",
    "dense_mlp": "dense MLPs",
    "attention": "attention",
    "embeddings": "embeddings",
    "lm_head": "LM head",
    "replicated": "replicated",
    "unused": "unused (layers past num_hidden_layers)",
}


def cmd_plan(args: argparse.Namespace) -> int:
    import math

    from quarkmoe_jax.checkpoint.plan import plan_checkpoint

    if args.devices < 1:
        raise ValueError(f"--devices {args.devices}: expected a positive number of devices")
    memory = None
    if args.device_memory is not None:
        if not (math.isfinite(args.device_memory) and args.device_memory > 0):
            raise ValueError(f"--device-memory {args.device_memory}: expected a positive number of GiB per device")
        memory = max(1, round(args.device_memory * 2**30))
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len {args.max_model_len}: expected a positive number of positions")
    if not (math.isfinite(args.memory_fraction) and 0 < args.memory_fraction <= 1):
        raise ValueError(f"--memory-fraction {args.memory_fraction}: expected a share of memory in (0, 1]")
    plan = plan_checkpoint(
        args.checkpoint,
        args.devices,
        memory,
        max_model_len=args.max_model_len,
        kv_dtype=args.kv_dtype,
        memory_fraction=args.memory_fraction,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=1))
        return 0
    gib = 2**30
    print(
        f"{args.checkpoint}: {plan.model_type}, {plan.num_layers} layers ({plan.moe_layers} MoE, {plan.num_experts} "
        f"routed experts each); {plan.num_tensors} tensors, {plan.total_bytes / gib:.2f} GiB (headers only, no "
        "data read)"
    )
    memory_text = "no device memory given (--device-memory GiB adds room and fit)"
    if plan.device_memory_bytes is not None:
        memory_text = (
            f"{plan.device_memory_bytes / gib:.2f} GiB each, {plan.memory_fraction:.0%} for weights + KV cache "
            f"({plan.usable_bytes / gib:.2f} GiB)"
        )
    print(
        f"{plan.devices} devices, {memory_text}; KV cache {plan.kv_dtype}; context {plan.context} positions "
        f"({plan.context_source})\n"
    )
    header = f"{'layout':<14}  {'weights GiB/device':>18}  {'KV bytes/token/device':>21}  {'room (tokens)':>14}  fits"
    print(header)
    print("-" * len(header))
    for layout in plan.layouts:
        room = "-" if layout.room_tokens is None else f"{layout.room_tokens:,}"
        if layout.fits is None:
            fits = "-"
        elif layout.fits:
            fits = "yes"
        elif layout.problem:
            fits = f"no: {layout.problem}"
        elif layout.room_bytes < 0:
            fits = f"no: the weights need {-layout.room_bytes / gib:.2f} GiB more"
        else:
            fits = f"no: room for {layout.room_tokens:,} tokens, less than one context"
        weights, kv = layout.weight_bytes / gib, layout.kv_bytes_per_token
        print(f"{layout.name:<14}  {weights:>18.2f}  {kv:>21,}  {room:>14}  {fits}")
    parts = [f"{_CATEGORY_NAMES[c]} {b / gib:.2f}" for c, b in plan.category_bytes.items() if b]
    print(f"\nwhole checkpoint by part (GiB): {', '.join(parts)}")
    return 0


MAX_CALIBRATION_TOKENS = 65536
"""The most hidden states ``quantize --calibrate`` takes (a count, or the rows of a .npy file)."""


def cmd_quantize(args: argparse.Namespace) -> int:
    import math

    from quarkmoe_jax.checkpoint.exporter import export_quark_checkpoint, scheme_has_static_input_scales
    from quarkmoe_jax.checkpoint.loader import inspect_checkpoint

    given = [
        flag
        for flag, value in (("--input-amax", args.input_amax), ("--calibrate", args.calibrate))
        if value is not None
    ]
    if len(given) == 2:
        raise ValueError(
            "--input-amax and --calibrate: pass one (--calibrate measures each expert's scales, --input-amax sets "
            "one value for all of them)"
        )
    if scheme_has_static_input_scales(args.scheme):
        if not given:
            raise ValueError(
                f"scheme {args.scheme} has static input scales, which need calibration: pass --calibrate N (N seeded "
                "random hidden states, e.g. 256), --calibrate PATH.npy (your model's hidden states [tokens, hidden]) "
                "or --input-amax AMAX (quarkmoe quantize --help says how to choose)"
            )
    elif given:
        raise ValueError(
            f"{given[0]}: scheme {args.scheme} has no static input scales (its activations are quantized "
            "dynamically or not at all): there is nothing to calibrate"
        )
    if args.input_amax is not None and not (math.isfinite(args.input_amax) and args.input_amax > 0):
        raise ValueError(
            f"--input-amax {args.input_amax}: expected a finite positive number (the largest |activation| a static "
            "scale must cover)"
        )
    states = None if args.calibrate is None else calibration_states(args.calibrate, args.float_checkpoint)
    out = export_quark_checkpoint(
        args.float_checkpoint,
        args.out,
        args.scheme,
        scale_mode=args.scale_mode,
        input_amax=args.input_amax,
        calibration_states=states,
        exclude_layers=tuple(args.exclude_layer),
        overwrite=args.overwrite,
    )
    report = inspect_checkpoint(out, semantics=args.semantics)
    ok = [e for e in report["layers"].values() if "refused" not in e]
    print(f"wrote {out} ({args.scheme}); reloads as: " + ", ".join(sorted({e["scheme"] for e in ok})))
    return 0


def calibration_states(spec: str, checkpoint: str) -> np.ndarray:
    """The hidden states ``quantize --calibrate`` calibrates on, float32 ``[tokens, hidden]``: ``spec`` is a
    count N (N seeded standard-normal states, seed 0) or the path of a ``.npy`` file of float hidden states
    (read with :func:`read_npy`, never unpickled; at most :data:`MAX_CALIBRATION_TOKENS` rows, checked from its
    header before reading; finite). Anything else is a ``ValueError`` naming ``--calibrate``."""
    import re

    from quarkmoe_jax.checkpoint.architectures import MoEArchitecture
    from quarkmoe_jax.checkpoint.loader import read_hf_config

    hidden = MoEArchitecture.from_hf_config(read_hf_config(checkpoint)).hidden_size
    expected = f"float hidden states [tokens, {hidden}] with 1 to {MAX_CALIBRATION_TOKENS} tokens"
    if re.fullmatch(r"[0-9]+", spec):
        tokens = int(spec)
        if not 1 <= tokens <= MAX_CALIBRATION_TOKENS:
            raise ValueError(f"--calibrate {spec}: expected 1 to {MAX_CALIBRATION_TOKENS} tokens (or a .npy path)")
        return np.random.default_rng(0).standard_normal((tokens, hidden), np.float32)
    x = read_npy(spec, "--calibrate", max_bytes=MAX_CALIBRATION_TOKENS * hidden * 8)
    if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != hidden or not 1 <= x.shape[0] <= MAX_CALIBRATION_TOKENS:
        raise ValueError(f"--calibrate {spec}: expected {expected}, found {x.dtype}{list(x.shape)}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"--calibrate {spec}: expected finite hidden states, found {bad} NaN or infinite values")
    return x.astype(np.float32)


def cmd_serve(args: argparse.Namespace) -> int:
    from quarkmoe_jax.errors import InputError

    try:
        import uvicorn
    except ImportError:
        raise InputError("quarkmoe serve needs the serve extra: pip install 'quarkmoe-jax[serve]'") from None
    from quarkmoe_jax.checkpoint.loader import read_hf_config
    from quarkmoe_jax.models import DecoderConfig
    from quarkmoe_jax.serving.async_engine import AsyncEngine
    from quarkmoe_jax.serving.server import ServerSettings, create_app
    from quarkmoe_jax.tokenizer import read_tokenizer_config

    DecoderConfig.from_hf_config(read_hf_config(args.checkpoint))  # checked before the engine process starts
    tokenizer = load_tokenizer(args.checkpoint, needed=True)
    tokenizer_config = read_tokenizer_config(args.checkpoint)
    # The engine (model, KV cache, compiled steps) lives in a process of its own; this one serves HTTP and never
    # touches a JAX device. Only the loading flags travel (a Namespace of plain values pickles).
    loading = argparse.Namespace(
        **{k: getattr(args, k) for k in SERVE_ENGINE_FLAGS},
        compilation_cache=jax.config.jax_compilation_cache_dir,
    )
    engine = AsyncEngine.spawn(build_serve_engine, loading)
    name = args.served_model_name or pathlib.Path(args.checkpoint).resolve().name
    app = create_app(engine, tokenizer, tokenizer_config, ServerSettings(name))
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    finally:
        engine.shutdown()  # the app's lifespan did, unless uvicorn never started it (a port already taken)
    return 0


SERVE_ENGINE_FLAGS = (
    "checkpoint", "semantics", "dtype", "backend", "max_model_len", "mesh", "max_batch", "max_num_batched_tokens",
    "gpu_memory_fraction",
)  # fmt: skip
"""The ``serve`` flags the engine's process needs (:func:`build_serve_engine`)."""


def build_serve_engine(loading: argparse.Namespace):
    """``quarkmoe serve``'s engine, built in its engine process: the model loaded with ``serve``'s flags, the
    KV cache sized, every step program compiled (the summary and the compile time printed to standard error)."""
    from quarkmoe_jax.checkpoint.loader import read_hf_config
    from quarkmoe_jax.models import DecoderConfig
    from quarkmoe_jax.quark_config import exclude_match_budget
    from quarkmoe_jax.serving import Engine

    if loading.compilation_cache:  # the parent's persistent compilation cache (a spawned process starts fresh)
        jax.config.update("jax_compilation_cache_dir", loading.compilation_cache)
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    config = DecoderConfig.from_hf_config(read_hf_config(loading.checkpoint))
    dtype = jnp.dtype(config.dtype if loading.dtype == "auto" else loading.dtype)
    with exclude_match_budget(scope="one 'quarkmoe serve' command"):  # the bound _run gives a command in-process
        model = _load_model(loading, dtype)
    engine = Engine(
        model,
        max_num_seqs=loading.max_batch,
        max_num_batched_tokens=loading.max_num_batched_tokens,
        memory_fraction=loading.gpu_memory_fraction,
    )
    print(engine.summary(), file=sys.stderr, flush=True)
    seconds = engine.warm_up()
    print(f"compiled {2 * len(engine.step_buckets())} step programs in {seconds:.1f} s", file=sys.stderr, flush=True)
    return engine


def cmd_synthetic(args: argparse.Namespace) -> int:
    from quarkmoe_jax.checkpoint.safetensors_io import new_checkpoint_folder
    from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint

    with new_checkpoint_folder(args.out, overwrite=args.overwrite) as tmp:
        write_float_checkpoint(
            tmp,
            args.model_type,
            num_layers=args.layers,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_experts=args.experts,
            top_k=args.top_k,
            seed=args.seed,
            tokenizer=not args.no_tokenizer,
        )
    extra = "" if args.no_tokenizer else " with a byte-level tokenizer.json and a chat template"
    print(f"wrote float {args.model_type} checkpoint to {args.out}{extra}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show: a required option, or one
    whose default is None (argparse's own formatter prints "(default: None)" for both)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quarkmoe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        parser.set_defaults(parser=parser)  # main words errors in this command's flags
        return parser

    demo = command("demo", "quantize a seeded random expert weight in every format, then run a small MoE layer")
    demo.add_argument("--rows", type=int, default=2048, help="output channels N of the weight")
    demo.add_argument("--cols", type=int, default=4096, help="input channels K of the weight, a multiple of 32")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weight, the layer and its input")
    demo.add_argument("--json", help="also write the tables as JSON to this path")
    demo.add_argument("--tokens", type=int, default=64, help="tokens of the MoE layer run")
    demo.add_argument("--no-layer", action="store_true", help="skip the MoE layer table")
    demo.add_argument("--no-model", action="store_true", help="skip the whole-model generation")
    demo.set_defaults(func=cmd_demo)

    from quarkmoe_jax.checkpoint.architectures import SUPPORTED_MODEL_TYPES
    from quarkmoe_jax.checkpoint.exporter import EXPORT_SCHEMES
    from quarkmoe_jax.moe.op import BACKENDS

    inspect = command("inspect", "describe a checkpoint and check its expert tensors' names, shapes and dtypes")
    inspect.add_argument("checkpoint", help="Hugging Face folder with config.json and *.safetensors")
    inspect.add_argument("--semantics", choices=SEMANTICS, default=DEFAULT_SEMANTICS, help="numerics to load with")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=cmd_inspect)

    plan = command(
        "plan",
        "bytes per device for each expert x tensor parallel layout of N devices, the KV cache room left and which "
        "layouts fit, from config.json and the safetensors headers alone",
    )
    plan.add_argument("checkpoint", help="Hugging Face folder with config.json and *.safetensors")
    plan.add_argument("--devices", type=int, required=True, metavar="N", help="devices to spread the model over")
    plan.add_argument("--device-memory", type=float, metavar="GiB", help="memory of one device, in GiB")
    plan.add_argument(
        "--max-model-len",
        type=int,
        metavar="L",
        help="positions one sequence must hold (default: the config's max_position_embeddings, else 2048)",
    )
    plan.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        metavar="F",
        help="share of a device's memory for weights + KV cache (the rest: activations, the runtime)",
    )
    plan.add_argument(
        "--kv-dtype",
        choices=["bfloat16", "float16", "float32", "float8_e4m3fn"],
        default="bfloat16",
        help="KV cache dtype",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per part per layout too)")
    plan.set_defaults(func=cmd_plan)

    quantize = command("quantize", "export a float checkpoint to Quark's format")
    quantize.add_argument("float_checkpoint", help="float Hugging Face MoE checkpoint folder")
    quantize.add_argument("out", help="new (or empty) output folder")
    quantize.add_argument(
        "--scheme",
        required=True,
        choices=EXPORT_SCHEMES,
        metavar="SCHEME",
        help="e.g. w_mxfp4, w_mxfp4_a_mxfp4, w_mxfp6_e2m3_a_fp8, w8a8_int8_channel_dynamic_token; one of "
        + ", ".join(EXPORT_SCHEMES),
    )
    quantize.add_argument("--scale-mode", choices=["even", "floor", "ceil"], default="even", help="MX scale rule")
    quantize.add_argument(
        "--calibrate",
        metavar="N|PATH.npy",
        help="static schemes: measure each expert's activation scales by running hidden states through the float "
        "MoE layers (the largest |input| and |intermediate| each expert sees). N: N seeded standard-normal hidden "
        "states (what the synthetic models take; a few hundred are plenty there). PATH.npy: your model's hidden "
        f"states entering the MoE blocks, float [tokens, hidden] (numpy.save), at most {MAX_CALIBRATION_TOKENS} "
        "tokens; one set serves every layer",
    )
    quantize.add_argument(
        "--input-amax",
        type=float,
        metavar="AMAX",
        help="static schemes, instead of --calibrate: one amax for every static scale (AMAX/448 for FP8, "
        "AMAX/127.5 for INT8); values beyond it clip. It must cover both GEMM inputs of every expert: the hidden "
        "states entering the block and the intermediates act(gate)*up, whose ranges differ (synthetic models: ~4 "
        "and 0.1-0.5). FP8 tolerates a generous value (at least the largest |hidden state|); INT8 does not: one "
        "value gives it 0.5-0.9 relative error on the synthetic model where --calibrate gives 0.04-0.07 "
        "(docs/checkpoints.md, 'Calibrating from the CLI')",
    )
    quantize.add_argument("--exclude-layer", type=int, action="append", default=[], help="leave a MoE layer in float")
    quantize.add_argument("--semantics", choices=SEMANTICS, default=DEFAULT_SEMANTICS, help="for the reload check")
    quantize.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty OUT (even the input) once complete"
    )
    quantize.set_defaults(func=cmd_quantize)

    run = command("run-layer", "run MoE block N of a checkpoint (router included) on x.npy, write y.npy")
    run.add_argument("checkpoint", help="Hugging Face folder with config.json and *.safetensors")
    run.add_argument("--layer", type=int, required=True, help="index of a MoE layer")
    run.add_argument("--input", required=True, help=".npy float array [T, hidden] (numpy.save)")
    run.add_argument("--output", required=True, help=".npy to write [T, hidden] (float32 values)")
    run.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="kernel backend")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="activation dtype")
    run.add_argument("--semantics", choices=SEMANTICS, default=DEFAULT_SEMANTICS, help="numerics to load with")
    run.set_defaults(func=cmd_run_layer)

    generate = command("generate", "load a whole model (from_pretrained) and generate tokens with a KV cache")
    generate.add_argument("checkpoint", help="Hugging Face / Quark folder with config.json and *.safetensors")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", action="append", help="text, tokenized with the checkpoint's tokenizer.json (repeatable)"
    )
    prompt.add_argument("--prompt-ids", action="append", help="token ids, comma-separated: 1,2,3 (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate at most, per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0: all)")
    generate.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling, in int64's range")
    generate.add_argument(
        "--max-model-len",
        type=int,
        help="most positions of prompt + new tokens (default: the config's max_position_embeddings, else 2048)",
    )
    generate.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: config's")
    generate.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="MoE kernel backend")
    generate.add_argument("--semantics", choices=SEMANTICS, default=DEFAULT_SEMANTICS, help="numerics to load with")
    generate.add_argument("--mesh", metavar="DxExT", help=MESH_HELP)
    generate.set_defaults(func=cmd_generate)

    serve = command("serve", "an OpenAI-compatible HTTP server on the engine (the serve extra)")
    serve.add_argument("checkpoint", help="Hugging Face / Quark folder with config.json, *.safetensors, tokenizer.json")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests running at once")
    serve.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens one engine step computes")
    serve.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the config's)")
    serve.add_argument(
        "--gpu-memory-fraction", type=float, default=0.9, help="share of GPU memory for weights + KV cache"
    )
    serve.add_argument("--shutdown-timeout", type=float, default=60.0, help="seconds SIGTERM waits for streams")
    serve.add_argument("--mesh", metavar="DxExT", help=MESH_HELP)
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: config's")
    serve.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="MoE kernel backend")
    serve.add_argument("--semantics", choices=SEMANTICS, default=DEFAULT_SEMANTICS, help="numerics to load with")
    serve.set_defaults(func=cmd_serve)

    synthetic = command("synthetic", "write a small seeded float MoE checkpoint (random weights, no download)")
    synthetic.add_argument("out", help="new (or empty) output folder")
    synthetic.add_argument("--model-type", choices=SUPPORTED_MODEL_TYPES, default="mixtral", help="architecture")
    synthetic.add_argument("--layers", type=int, default=2, help="decoder layers (which are MoE: as the model says)")
    synthetic.add_argument("--hidden", type=int, default=64, help="hidden size H")
    synthetic.add_argument("--intermediate", type=int, default=64, help="expert intermediate size I")
    synthetic.add_argument("--experts", type=int, default=4, help="routed experts")
    synthetic.add_argument("--top-k", type=int, default=2, help="experts per token")
    synthetic.add_argument("--seed", type=int, default=0, help="seed of the weights")
    synthetic.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="write no tokenizer.json / tokenizer_config.json (the vocabulary is then 128 tokens, else 272)",
    )
    synthetic.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    synthetic.set_defaults(func=cmd_synthetic)
    return parser


@contextlib.contextmanager
def _exit_on_sigterm():
    """While a command runs, SIGTERM ends it as SIGINT does: by an exception in the main thread, so the atomic
    writers remove their temporary folders (Python's default SIGTERM action kills the process with them left
    behind). The previous handler is restored afterwards (``main`` may run inside another program)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


EXIT_BROKEN_PIPE = 128 + getattr(signal, "SIGPIPE", 13)  # 141 (POSIX; Windows has no SIGPIPE)
"""The exit status when whoever reads the output stops early (``quarkmoe inspect --json | head``): what a shell
reports for a program that SIGPIPE ended, so ``set -o pipefail`` still tells a cut output from a whole one."""


MESH_HELP = (
    "split the model over data x expert x tensor devices (e.g. 1x4x2: experts over 4, attention heads and I over "
    "2; docs/distributed.md); default: one device"
)


def _load_model(args, dtype):
    """The whole model ``generate`` and ``serve`` run: their shared loading flags."""
    from quarkmoe_jax.models import from_pretrained

    return from_pretrained(
        args.checkpoint,
        semantics=args.semantics,
        dtype=dtype,
        backend=args.backend,
        max_model_len=args.max_model_len,
        mesh=mesh_of(args.mesh),
    )


def mesh_of(text: str | None):
    """``--mesh DxExT`` -> a :func:`~quarkmoe_jax.moe.sharding.moe_mesh` (None: one device)."""
    if text is None:
        return None
    from quarkmoe_jax.moe.sharding import moe_mesh

    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--mesh {text!r}: expected DATAxEXPERTxTENSOR, three positive integers such as 1x4x2")
    data, expert, tensor = map(int, parts)
    if data * expert * tensor > len(jax.devices()):
        raise ValueError(f"--mesh {text}: needs {data * expert * tensor} devices, {len(jax.devices())} are visible")
    return moe_mesh(data=data, expert=expert, tensor=tensor)


COMPILATION_CACHE_ENV = "QUARKMOE_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 4 << 30


def compilation_cache_dir(environ=None) -> pathlib.Path | None:
    """Where the ``quarkmoe`` command keeps compiled programs between runs: ``$QUARKMOE_COMPILATION_CACHE`` (a
    folder, or ``off``), else ``$XDG_CACHE_HOME/quarkmoe/jax``, else ``~/.cache/quarkmoe/jax``; None when off."""
    environ = os.environ if environ is None else environ
    setting = environ.get(COMPILATION_CACHE_ENV, "").strip()
    if setting.lower() == "off":
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    base = environ.get("XDG_CACHE_HOME", "").strip() or pathlib.Path("~/.cache").expanduser()
    return pathlib.Path(base) / "quarkmoe" / "jax"


def use_compilation_cache(environ=None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache at :func:`compilation_cache_dir` (unless JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` chose one, or the folder cannot be made): a second ``quarkmoe serve`` or
    ``generate`` of the same model loads its step programs instead of compiling them (and, on a GPU, XLA's
    autotuning results), as vLLM keeps its compile cache. At most :data:`COMPILATION_CACHE_MAX_BYTES`, least
    recently used entries dropped (JAX needs ``filelock`` for that: a dependency; without it, no cache rather
    than a warning at every compile). Returns the folder in use, or None."""
    if jax.config.jax_compilation_cache_dir:
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    folder = compilation_cache_dir(environ)
    if folder is None:
        return None
    if importlib.util.find_spec("filelock") is None:
        logging.getLogger("quarkmoe_jax").warning("no compilation cache: the filelock package is not installed")
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.getLogger("quarkmoe_jax").warning("no compilation cache at %s: %s", folder, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return folder


def console_main() -> int:
    """The ``quarkmoe`` executable: :func:`main` with the persistent compilation cache on (a process of its own;
    a library user's or test's process keeps JAX's configuration as it is)."""
    use_compilation_cache()
    return main()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0, 1 when ``inspect`` or ``demo`` found a failure, 2 for a user
    error printed as one line, :data:`EXIT_BROKEN_PIPE` when the reader of standard output went away)."""
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of what is left in its buffer
    finds no broken pipe (Python's recipe, "Note on SIGPIPE" in the ``signal`` docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # replaced by a stream without a file descriptor (a test's)
        pass


def _run(argv: list[str] | None) -> int:
    from quarkmoe_jax.errors import QuarkMoEError
    from quarkmoe_jax.quark_config import exclude_match_budget

    args = build_parser().parse_args(argv)
    try:
        # one time budget for the exclude patterns of everything the command loads (docs/checkpoints.md)
        with _exit_on_sigterm(), exclude_match_budget(scope=f"one 'quarkmoe {args.command}' command"):
            return args.func(args)
    except BrokenPipeError:
        raise
    except (QuarkMoEError, ValueError, TypeError, NotImplementedError) as e:  # bad input: one line
        message = _in_cli_terms(" ".join(str(e).split()), args.parser)
        print(f"quarkmoe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written
        where = f"{e.filename}: " if e.filename else ""
        print(f"quarkmoe {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def _in_cli_terms(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message worded for a Python caller (``... (or pass overwrite)``) with each "pass <parameter>"
    that is one of this command's options spelled as its flag (``pass --overwrite``)."""
    import re

    flags = {
        action.dest: next(o for o in action.option_strings if o.startswith("--"))
        for action in parser._actions
        if any(o.startswith("--") for o in action.option_strings)
    }
    return re.sub(r"\bpass (\w+)\b", lambda m: f"pass {flags.get(m[1], m[1])}", message)


if __name__ == "__main__":
    sys.exit(console_main())
