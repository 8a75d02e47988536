"""Whole-model benchmark: prefill and decode tokens/s of Quark-quantized MoE models against bf16 experts.

Run on a GPU (random weights, no download; one command per shape, or both):

    python benchmarks/model_bench.py --shapes mixtral_8x7b gpt_oss_120b --json benchmarks/results/h200_models.json

Per shape (Mixtral-8x7B's and gpt-oss-120b's config.json sizes, with ``--layers`` decoder layers: the full
models' bf16 experts do not fit one GPU, 94 GB and 230 GB) and per expert format (``bf16``: bfloat16 experts
through the same model code; ``w_mxfp4``; ``w8a8_int8_channel_dynamic_token``), in one process:
* prefill: ``model.generate``'s compiled prefill (KV-cache writes and the first sampled token included) of
  one ``--prefill-tokens``-token prompt, tokens/s;
* decode: ``model.generate``'s compiled decode step (donated cache, greedy) at batch 1, 8 and 64 with
  ``--context`` cached positions (random cache contents), tokens/s = batch / step time;
* the embedding + final norm + LM head alone (same batch), so that the per-layer time
  ``(step - head) / layers`` and a full-depth estimate ``head + per_layer * full_layers`` can be given;
* device memory: bytes the model's parameters occupy, and the full-depth parameter bytes;
* the same run's ceilings (bf16 matmul, device copy; ``moe_bench.ceilings``) and, for decode, the
  memory floor: parameter bytes one step must read (attention, norms, LM head, the experts the batch's tokens
  touch in expectation) plus the cache, over the measured copy bandwidth.

Timing is wall time of the compiled call with ``block_until_ready`` (what generation pays, dispatch
included), median of ``--repeats`` after warm-up; the weights (GBs) are far beyond L2. Attention and LM head
are bf16 in every variant; only the experts change.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from moe_bench import ceilings, expert_params, random_mx_weights, random_w8a8_weights, scheme_config  # noqa: E402

from quarkmoe_jax.contracts import MoEQuantConfig  # noqa: E402
from quarkmoe_jax.models import DecoderConfig, QuarkMoEForCausalLM  # noqa: E402
from quarkmoe_jax.models.layers import Linear, RMSNorm  # noqa: E402
from quarkmoe_jax.models.model import Attention, DecoderLayer, _decode_loop, _prefill  # noqa: E402
from quarkmoe_jax.moe.routing import RoutingConfig  # noqa: E402
from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock  # noqa: E402
from quarkmoe_jax.schemes import MoEShape  # noqa: E402

#: config.json of the public models (sizes only), and the depth of the full model
HF_SHAPES = {
    "mixtral_8x7b": (
        {
            "model_type": "mixtral",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
        },
        32,
    ),
    "gpt_oss_120b": (
        {
            "model_type": "gpt_oss",
            "vocab_size": 201088,
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "head_dim": 64,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "num_local_experts": 128,
            "num_experts_per_tok": 4,
            "sliding_window": 128,
            "swiglu_limit": 7.0,
            "max_position_embeddings": 131072,
        },
        36,
    ),
    "tiny_mixtral": (  # a CPU dry run of this script
        {
            "model_type": "mixtral",
            "vocab_size": 256,
            "hidden_size": 128,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
        4,
    ),
    "tiny_gpt_oss": (
        {
            "model_type": "gpt_oss",
            "vocab_size": 256,
            "hidden_size": 128,
            "intermediate_size": 64,
            "head_dim": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 8,
            "num_experts_per_tok": 4,
            "sliding_window": 8,
            "swiglu_limit": 7.0,
        },
        4,
    ),
}
SCHEMES = ("bf16", "w_mxfp4", "w8a8_int8_channel_dynamic_token")


def _normal(key, shape, std=0.02, dtype=jnp.bfloat16):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def random_linear_weight(key, shape: tuple[int, int], quant: MoEQuantConfig | None):
    """A seeded random ``[N, K]`` weight of a :class:`Linear`: bfloat16, or quantized as ``quant``'s experts are
    (a :class:`~quarkmoe_jax.formats.QArray`, as a Quark export that quantizes its attention stores it)."""
    weight = None if quant is None else quant.weight
    if weight is None or weight.kind == "none":
        return _normal(key, shape)
    if weight.kind == "mx":
        return random_mx_weights(key, (1, *shape), weight.mx_format)[0]
    return random_w8a8_weights(key, (1, *shape), weight.kind, weight.granularity)[0]


def static_input_scale(quant: MoEQuantConfig | None):
    """A static per-tensor input scale where ``quant`` quantizes activations with one (inputs up to ~4), else None."""
    act = None if quant is None else quant.activation
    if act is None or act.kind not in ("fp8", "int8") or act.dynamic:
        return None
    return jnp.float32(4.0 / (448.0 if act.kind == "fp8" else 127.0))


def build_model(
    config: DecoderConfig,
    scheme: str,
    seed: int = 0,
    prepare: bool = True,
    attention_scheme: str = "bf16",
    prepare_linears: bool = True,
) -> QuarkMoEForCausalLM:
    """A random bf16 model of ``config`` whose experts are in ``scheme``'s format, laid out for the kernels on a
    GPU (``prepare``; False: Quark's layout, as :meth:`QuarkMoEForCausalLM.shard` takes them), and whose
    attention projections are in ``attention_scheme``'s (default bf16: the public gpt-oss and Mixtral
    checkpoints' attention; a Quark export quantizes them too unless excluded), MX ones laid out for the
    kernels too where ``prepare and prepare_linears`` (as ``from_pretrained`` does; False: the oracle's GEMM)."""
    keys = iter(jax.random.split(jax.random.key(seed), 16 * config.num_layers + 4))
    h, heads, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    arch = config.moe
    gpt_oss = config.model_type == "gpt_oss"
    quant = scheme_config(scheme)
    attention_quant = None if attention_scheme == "bf16" else scheme_config(attention_scheme)
    layers = []
    for i in range(config.num_layers):
        projections = {
            name: Linear(
                random_linear_weight(next(keys), shape, attention_quant),
                bias=_normal(next(keys), shape[:1], 1.0) if gpt_oss else None,
                input_scale=static_input_scale(attention_quant),
                quant=attention_quant,
            )
            for name, shape in (
                ("q_proj", (heads * d, h)),
                ("k_proj", (kv * d, h)),
                ("v_proj", (kv * d, h)),
                ("o_proj", (h, heads * d)),
            )
        }
        sinks = _normal(next(keys), (heads,), 1.0, jnp.float32) if gpt_oss else None
        attn = Attention(config, i, projections, sinks=sinks)
        shape = MoEShape(
            arch.num_experts, h, arch.intermediate_size, has_bias=arch.has_bias, interleaved=arch.interleaved
        )
        problem = argparse.Namespace(experts=arch.num_experts, hidden=h, intermediate=arch.intermediate_size)
        params = expert_params(problem, quant, kernel_layout=None)
        if arch.has_bias:
            params["w13_bias"] = _normal(next(keys), (arch.num_experts, 2 * arch.intermediate_size), 0.1, jnp.float32)
            params["w2_bias"] = _normal(next(keys), (arch.num_experts, h), 0.1, jnp.float32)
        experts = QuarkMoE(quant, shape, params, activation=arch.activation, swiglu_limit=arch.swiglu_limit)
        if prepare and jax.default_backend() == "gpu":
            experts.prepare_for_kernels()
        router = _normal(next(keys), (arch.num_experts, h), 0.05, jnp.float32)
        router_bias = _normal(next(keys), (arch.num_experts,), 0.1, jnp.float32) if gpt_oss else None
        block = QuarkMoEBlock(
            experts, router, RoutingConfig.from_architecture(arch), router_bias=router_bias, architecture=arch
        )
        norms = [RMSNorm(1 + _normal(next(keys), (h,), 0.1, jnp.float32), config.rms_norm_eps) for _ in range(2)]
        layers.append(DecoderLayer(norms[0], attn, norms[1], block))
    embed = _normal(next(keys), (config.vocab_size, h), 1.0)
    norm = RMSNorm(jnp.ones((h,), jnp.float32), config.rms_norm_eps)
    lm_head = Linear(_normal(next(keys), (config.vocab_size, h)))
    model = QuarkMoEForCausalLM(config, embed, layers, norm, lm_head, dtype=jnp.bfloat16)
    if prepare and prepare_linears and jax.default_backend() == "gpu":
        model.prepare_linears_for_kernels()
    return model


def _wall_median(call, repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``call()`` (which returns what to block on)."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _random_cache(model, batch: int, length: int, seed: int):
    cache = model.init_cache(batch, length)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [_normal(k, x.shape, 1.0, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def time_prefill(model, tokens: int, repeats: int) -> float:
    """Seconds of one compiled prefill of a ``[1, tokens]`` prompt (cache writes and sampling included)."""
    graphdef, state = nnx.split(model)
    prompts = [jax.random.randint(jax.random.key(s), (1, tokens), 0, model.config.vocab_size) for s in range(3)]
    holder = {"cache": model.init_cache(1, tokens), "n": 0}
    key, sampling = jax.random.key(0), (jnp.float32(1), jnp.float32(1))

    def call():
        holder["n"] += 1
        ids = prompts[holder["n"] % len(prompts)]
        token, holder["cache"] = _prefill(
            graphdef, state, ids, jnp.int32(tokens), holder["cache"], key, *sampling, greedy=True
        )
        return token

    return _wall_median(call, repeats)


def time_decode(model, batch: int, context: int, repeats: int) -> float:
    """Seconds of one compiled decode step at ``batch`` with ``context`` positions cached: ``generate``'s device
    decode loop run for one step (``max_new = 2``: the prefill's token and one more)."""
    graphdef, state = nnx.split(model)
    holder = {"cache": _random_cache(model, batch, context + 1, seed=batch)}
    token = jax.random.randint(jax.random.key(batch), (batch,), 0, model.config.vocab_size)
    key, sampling = jax.random.key(0), (jnp.float32(1), jnp.float32(1))
    no_eos = jnp.zeros((0,), jnp.int32)

    def call():
        out, _, holder["cache"] = _decode_loop(
            graphdef,
            state,
            token,
            jnp.int32(context),
            holder["cache"],
            key,
            *sampling,
            no_eos,
            jnp.int32(2),
            greedy=True,
            out_size=2,
        )
        return out

    return _wall_median(call, repeats)


@jax.jit
def _head(embed, norm_weight, lm_head, ids):
    """Embedding lookup, final RMSNorm and LM head + argmax of ``ids [B, T]`` (the last position)."""
    x = jnp.take(embed, ids[:, -1], axis=0).astype(jnp.float32)
    x = (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * norm_weight).astype(embed.dtype)
    logits = jnp.dot(x, lm_head.T, preferred_element_type=jnp.float32)
    return jnp.argmax(logits, -1)


def time_head(model, batch: int, tokens: int, repeats: int) -> float:
    ids = jax.random.randint(jax.random.key(7), (batch, tokens), 0, model.config.vocab_size)
    args = (model.embed_tokens.get_value(), model.norm.weight.get_value(), model.lm_head.weight.get_value(), ids)
    return _wall_median(lambda: _head(*args), repeats)


def _param_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(tree)))


def decode_floor_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step must read: every non-expert parameter, the experts the batch touches in
    expectation (uniform routing: ``E (1 - (1 - k/E)^B)`` per layer), and the cached keys/values."""
    arch = model.config.moe
    total = _param_bytes(model)
    expert_bytes = sum(_param_bytes(layer.mlp.experts) for layer in model.layers)
    touched = arch.num_experts * (1 - (1 - arch.top_k / arch.num_experts) ** batch)
    cache = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.init_cache(batch, context)))
    return total - expert_bytes + expert_bytes * touched / arch.num_experts + cache


def _device_bytes() -> int:
    return (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0)


def bench_variant(config, full_layers: int, scheme: str, args) -> dict:
    before = _device_bytes()
    model = build_model(config, scheme)
    jax.block_until_ready(nnx.state(model))
    result = {
        "scheme": scheme,
        "param_bytes": _param_bytes(model),
        "device_bytes": _device_bytes() - before,
    }
    per_layer_bytes = sum(_param_bytes(layer) for layer in model.layers) / len(model.layers)
    head_bytes = result["param_bytes"] - per_layer_bytes * len(model.layers)
    result["full_depth_param_bytes"] = head_bytes + per_layer_bytes * full_layers
    layers = config.num_layers
    start = time.perf_counter()
    prefill = time_prefill(model, args.prefill_tokens, args.repeats)
    head = time_head(model, 1, args.prefill_tokens, args.repeats)
    per_layer = (prefill - head) / layers
    result["prefill"] = {
        "tokens": args.prefill_tokens,
        "ms": prefill * 1e3,
        "tokens_per_s": args.prefill_tokens / prefill,
        "per_layer_ms": per_layer * 1e3,
        "full_depth_tokens_per_s": args.prefill_tokens / (head + per_layer * full_layers),
    }
    result["decode"] = []
    for batch in args.batches:
        step = time_decode(model, batch, args.context, args.repeats)
        head = time_head(model, batch, 1, args.repeats)
        per_layer = (step - head) / layers
        floor_s = decode_floor_bytes(model, batch, args.context + 1) / (args.copy_tbps * 1e12)
        result["decode"].append(
            {
                "batch": batch,
                "context": args.context,
                "step_ms": step * 1e3,
                "tokens_per_s": batch / step,
                "head_ms": head * 1e3,
                "per_layer_ms": per_layer * 1e3,
                "full_depth_tokens_per_s": batch / (head + per_layer * full_layers),
                "memory_floor_ms": floor_s * 1e3,
                "fraction_of_floor": floor_s / step,
            }
        )
    result["peak_device_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    result["seconds"] = time.perf_counter() - start
    del model
    jax.clear_caches()
    return result


def _row(shape: str, r: dict) -> str:
    p = r["prefill"]
    decode = "  ".join(f"B{d['batch']}: {d['tokens_per_s']:8.1f} ({d['fraction_of_floor']:.2f}fl)" for d in r["decode"])
    return (
        f"{shape:14s} {r['scheme']:34s} {r['param_bytes'] / 2**30:6.2f} GiB  prefill {p['tokens_per_s']:9.0f} tok/s  "
        f"decode {decode}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mixtral_8x7b", "gpt_oss_120b"], choices=list(HF_SHAPES))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers built (the full depth is estimated)")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=1023, help="cached positions in the decode steps")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--strict", action="store_true", help="raise instead of recording a failed variant")
    parser.add_argument("--copy-tbps", type=float, help="skip the ceilings, use this copy bandwidth (dry runs)")
    args = parser.parse_args(argv)
    caps = ceilings(args.repeats) if args.copy_tbps is None else {"matmul_tflops": None, "copy_tbps": args.copy_tbps}
    args.copy_tbps = caps["copy_tbps"]
    print(f"ceilings: matmul {caps['matmul_tflops']} TF/s, copy {caps['copy_tbps']:.2f} TB/s", flush=True)
    results = []
    for shape in args.shapes:
        hf, full_layers = HF_SHAPES[shape]
        config = DecoderConfig.from_hf_config({**hf, "num_hidden_layers": args.layers, "torch_dtype": "bfloat16"})
        for scheme in args.schemes:
            r = {"shape": shape, "layers": args.layers, "full_layers": full_layers}
            try:
                r.update(bench_variant(config, full_layers, scheme, args))
            except Exception as e:  # noqa: BLE001 - out of memory or a refused kernel: recorded, the run goes on
                if args.strict:
                    raise
                r.update(scheme=scheme, skipped=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                print(f"{shape} {scheme} skipped: {r['skipped']}", flush=True)
                jax.clear_caches()
                results.append(r)
                continue
            results.append(r)
            print(_row(shape, r), flush=True)
    doc = {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else None},
        "ceilings": caps,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "results": results,
    }
    for shape in args.shapes:
        base = {r["scheme"]: r for r in results if r["shape"] == shape and "skipped" not in r}.get("bf16")
        for r in results:
            if r["shape"] != shape or "skipped" in r or base is None or r is base:
                continue
            r["vs_bf16"] = {
                "prefill": r["prefill"]["tokens_per_s"] / base["prefill"]["tokens_per_s"],
                "decode": {
                    str(d["batch"]): d["tokens_per_s"] / b["tokens_per_s"]
                    for d, b in zip(r["decode"], base["decode"], strict=True)
                },
                "memory": r["param_bytes"] / base["param_bytes"],
            }
            print(f"{shape} {r['scheme']} vs bf16: {json.dumps(r['vs_bf16'])}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
