"""An independent float64 formulation of the MoE experts forward: a plain loop over tokens and their experts.

It shares only the element / block quantizers with the library (those are checked bit for bit against Quark
elsewhere); the routing-to-expert mapping, the GEMMs, the epilogue order, the activations and the combine
are written again here, in numpy float64, rounding to the activation dtype at the same points as vLLM.
"""

import math

import jax.numpy as jnp
import numpy as np

from quarkmoe_jax.formats import quant_dequant
from quarkmoe_jax.formats import quantizers as qz

_erf = np.vectorize(math.erf)


def activation_f64(h: np.ndarray, name: str, limit=None, dtype=np.float32) -> np.ndarray:
    def silu(v):
        return v / (1.0 + np.exp(-v))

    unary = {
        "silu": silu,
        "gelu": lambda v: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))),
        "gelu_tanh": lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
        "relu2": lambda v: np.maximum(v, 0.0) ** 2,
    }
    if name.endswith("_no_mul") or name == "relu2":
        return unary[name.removesuffix("_no_mul")](h).astype(dtype)
    if name == "swigluoai":
        g, u = h[0::2], h[1::2]
    else:
        g, u = h[: h.size // 2], h[h.size // 2 :]
    if name.startswith("swigluoai"):
        lim = 7.0 if limit is None else limit
        g, u = np.minimum(g, lim), np.clip(u, -lim, lim)
        return ((u + 1.0) * g / (1.0 + np.exp(-1.702 * g))).astype(dtype)
    if limit is not None:
        g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
    return (unary[name](g).astype(dtype).astype(np.float64) * u).astype(dtype)


def _quantized_values(rows: np.ndarray, act, weight_kind: str, semantics: str, static_scale):
    """float64 values of the quantized GEMM input rows (codes x scale), one call for all rows."""
    x = jnp.asarray(rows.astype(np.float32))
    if act.granularity == "channel":  # Quark: one scale per column over these rows (one expert's)
        amax = np.abs(rows.astype(np.float32)).max(0)
        denominator = np.float32(127.5 if act.kind == "int8" else 448.0)
        scale = np.where(amax > 0, amax / denominator, np.finfo(np.float32).eps).astype(np.float32)
        if act.kind == "int8":
            q = np.clip(np.round(rows.astype(np.float32) * (np.float32(1) / scale)), -128, 127)
        else:
            q = np.clip(rows.astype(np.float32) / scale, -448, 448).astype(jnp.float8_e4m3fn).astype(np.float32)
        return (q * scale).astype(np.float32).astype(np.float64)
    if act.kind == "none":
        return rows.astype(np.float64)
    if act.kind == "mx":
        return np.asarray(quant_dequant(x, act.mx_format, act.scale_mode), np.float64)
    scale = None if act.dynamic else static_scale
    granularity = act.granularity or "tensor"
    if act.kind == "fp8" and weight_kind == "mx" and semantics == "quark":  # Quark's float32 fake-quant
        return np.asarray(qz.fp8_quant_dequant(x, scale, granularity=granularity, semantics=semantics), np.float64)
    quantize = qz.fp8_quantize if act.kind == "fp8" else qz.int8_quantize
    q, s = quantize(x, scale, granularity=granularity, semantics=semantics)
    return np.asarray(q.astype(jnp.float32), np.float64) * np.asarray(s, np.float64)


def reference_moe(x, topk_weights, topk_ids, experts, *, apply_router_weight_on_input=False, dtype=np.float32):
    """``[T, H]`` output of ``experts`` (a QuarkMoE), computed in float64 and rounded to the activation
    ``dtype`` (float32 or bfloat16) where vLLM rounds: after GEMM1's epilogue, after the activation, after
    GEMM2's router weighting, after the combine. Returned as float32."""
    cfg = experts.quant_config
    params = experts.params()
    w13, w2 = (np.asarray(w, np.float64) for w in experts.dequantized_weights(jnp.float32))
    b13 = np.asarray(params["w13_bias"], np.float64) if "w13_bias" in params else None
    b2 = np.asarray(params["w2_bias"], np.float64) if "w2_bias" in params else None
    s13, s2 = params.get("w13_input_scale"), params.get("w2_input_scale")
    x = np.asarray(x, np.float32)
    t, hidden = x.shape
    h_pad = w13.shape[2]
    emap = (
        np.arange(experts.shape.num_experts)
        if experts.expert_map is None
        else np.asarray(experts.expert_map.get_value())
    )
    pairs = [(i, j, int(emap[topk_ids[i, j]])) for i in range(t) for j in range(topk_ids.shape[1])]
    pairs = [p for p in pairs if p[2] >= 0]

    def static(scale, e):
        if scale is None:
            return None
        scale = np.asarray(scale, np.float32)
        return scale if scale.ndim == 0 else scale[e]

    inputs = np.zeros((t, h_pad), np.float32)
    inputs[:, :hidden] = x
    if apply_router_weight_on_input:
        inputs = (inputs * np.asarray(topk_weights, np.float32)[:, :1]).astype(np.float32)
    per_expert_static = s13 is not None and np.ndim(s13) == 1
    if cfg.activation.granularity == "channel":
        quantized = _per_expert_rows(pairs, lambda p: inputs[p[0]], cfg)
    elif per_expert_static:
        quantized = {
            p: _quantized_values(inputs[p[0]][None], cfg.activation, cfg.weight.kind, cfg.semantics, static(s13, p[2]))[
                0
            ]
            for p in pairs
        }
    else:
        all_q = _quantized_values(inputs, cfg.activation, cfg.weight.kind, cfg.semantics, static(s13, 0))
        quantized = {p: all_q[p[0]] for p in pairs}
    intermediates = {}
    for p in pairs:
        _, _, e = p
        h = w13[e] @ quantized[p] + (b13[e] if b13 is not None else 0.0)
        intermediates[p] = activation_f64(
            h.astype(dtype).astype(np.float64), experts.activation, experts.swiglu_limit, dtype=dtype
        ).astype(np.float64)
    a2 = np.stack([intermediates[p] for p in pairs]) if pairs else np.zeros((0, w2.shape[2]), np.float32)
    if cfg.activation.granularity == "channel":
        by_pair = _per_expert_rows(pairs, lambda p: intermediates[p], cfg)
        a2q = np.stack([by_pair[p] for p in pairs]) if pairs else a2
    elif s2 is not None and np.ndim(s2) == 1:
        a2q = (
            np.stack(
                [
                    _quantized_values(a2[n][None], cfg.activation, cfg.weight.kind, cfg.semantics, static(s2, p[2]))[0]
                    for n, p in enumerate(pairs)
                ]
            )
            if pairs
            else a2
        )
    else:
        a2q = _quantized_values(a2, cfg.activation, cfg.weight.kind, cfg.semantics, static(s2, 0)) if pairs else a2
    out = np.zeros((t, h_pad), np.float64)
    for n, (i, j, e) in enumerate(pairs):
        y = w2[e] @ a2q[n] + (b2[e] if b2 is not None else 0.0)
        if not apply_router_weight_on_input:
            y = y * np.float64(np.float32(topk_weights[i, j]))
        out[i] += y.astype(dtype).astype(np.float64)
    return out[:, :hidden].astype(dtype).astype(np.float32)


def _per_expert_rows(pairs, row_of, cfg):
    """Quantize each expert's rows together (Quark's per-channel-over-tokens scales)."""
    out = {}
    for e in sorted({p[2] for p in pairs}):
        mine = [p for p in pairs if p[2] == e]
        values = _quantized_values(
            np.stack([row_of(p) for p in mine]), cfg.activation, cfg.weight.kind, cfg.semantics, None
        )
        out.update(zip(mine, values, strict=True))
    return out
