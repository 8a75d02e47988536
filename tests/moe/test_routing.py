"""Routing against an independent numpy formulation, and the block forward (router + experts + shared)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quarkmoe_jax.moe.routing import RoutingConfig, route


def numpy_route(logits, cfg: RoutingConfig, bias=None):
    logits = np.asarray(logits, np.float64)
    t, e = logits.shape
    if cfg.softmax_after_topk:
        ids = np.argsort(-logits, axis=-1, kind="stable")[:, : cfg.top_k]
        top = np.take_along_axis(logits, ids, -1)
        w = np.exp(top - top.max(-1, keepdims=True))
        return w / w.sum(-1, keepdims=True), ids
    if cfg.scoring == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    selection = scores + (0 if bias is None else np.asarray(bias, np.float64))
    if cfg.num_expert_group:
        g = cfg.num_expert_group
        grouped = selection.reshape(t, g, e // g)
        if bias is not None:
            group_scores = np.sort(grouped, -1)[..., -2:].sum(-1)
        else:
            group_scores = grouped.max(-1)
        keep = np.argsort(-group_scores, -1, kind="stable")[:, : cfg.topk_group]
        mask = np.zeros((t, g), bool)
        np.put_along_axis(mask, keep, True, -1)
        selection = np.where(np.repeat(mask, e // g, -1), selection, -np.inf)
    ids = np.argsort(-selection, axis=-1, kind="stable")[:, : cfg.top_k]
    w = np.take_along_axis(scores, ids, -1)
    if cfg.renormalize:
        w = w / w.sum(-1, keepdims=True)
    return w * cfg.routed_scaling_factor, ids


CONFIGS = {
    "mixtral": RoutingConfig(top_k=2),
    "qwen2": RoutingConfig(top_k=4, renormalize=False),
    "sigmoid": RoutingConfig(top_k=3, scoring="sigmoid"),
    "deepseek_v2": RoutingConfig(
        top_k=3, num_expert_group=4, topk_group=2, renormalize=False, routed_scaling_factor=16.0
    ),
    "deepseek_v3": RoutingConfig(
        top_k=4, scoring="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5
    ),
    "gpt_oss": RoutingConfig(top_k=4, softmax_after_topk=True, renormalize=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_route_matches_numpy(name, key):
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (50, 16)) * 2
    bias = jax.random.normal(k2, (16,)) * 0.3 if name == "deepseek_v3" else None
    weights, ids = route(logits, CONFIGS[name], bias)
    want_w, want_ids = numpy_route(np.asarray(logits), CONFIGS[name], None if bias is None else np.asarray(bias))
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=2e-6, atol=1e-7)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32


def test_correction_bias_selects_but_does_not_weight():
    logits = jnp.zeros((1, 8)).at[0, 0].set(1.0)
    bias = jnp.zeros(8).at[7].set(10.0)
    cfg = RoutingConfig(top_k=1, scoring="sigmoid", renormalize=False)
    w, ids = route(logits, cfg, bias)
    assert int(ids[0, 0]) == 7 and float(w[0, 0]) == pytest.approx(0.5)  # sigmoid(0), not sigmoid(0) + 10


def test_ties_go_to_the_lower_expert_id():
    w, ids = route(jnp.zeros((2, 6)), RoutingConfig(top_k=3))
    assert np.asarray(ids).tolist() == [[0, 1, 2], [0, 1, 2]]
    _, ids = route(jnp.zeros((1, 8)), RoutingConfig(top_k=2, num_expert_group=4, topk_group=2))
    assert np.asarray(ids).tolist() == [[0, 1]]


def test_bad_routing_configs():
    with pytest.raises(ValueError, match="top_k 9 must be in 1..8"):
        route(jnp.zeros((2, 8)), RoutingConfig(top_k=9))
    with pytest.raises(ValueError, match="do not split"):
        route(jnp.zeros((2, 10)), RoutingConfig(top_k=2, num_expert_group=4, topk_group=1))
    with pytest.raises(ValueError, match="scoring"):
        RoutingConfig(top_k=2, scoring="relu")
