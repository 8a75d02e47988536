"""Router: logits -> ``(topk_weights fp32 [T, k], topk_ids int32 [T, k])`` (global expert ids), as vLLM routes.

Modes (all in float32):
* softmax / sigmoid scores over all experts -> top-k -> optional renormalization (divide by the top-k sum);
* grouped top-k (DeepSeek): selection scores ``= scores + e_score_correction_bias`` (bias for selection
  only); group score = sum of the top-2 biased scores in the group when there is a correction bias, else the
  group max; keep ``topk_group`` of ``num_expert_group`` groups; top-k inside them; weights are the
  *unbiased* scores of the chosen experts, renormalized if asked, then times ``routed_scaling_factor``;
* gpt-oss: top-k on the logits, then softmax over the k chosen logits.

Ties are broken toward the lower expert id (``lax.top_k`` is stable), for experts and for groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["RoutingConfig", "route", "router_logits"]


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """How router logits become ``(topk_weights, topk_ids)``; read from the architecture's config.json
    (``MoEArchitecture.routing``)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    softmax_after_topk: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown scoring {self.scoring!r}; expected 'softmax' or 'sigmoid'")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("grouped top-k needs both num_expert_group and topk_group")

    @classmethod
    def from_architecture(cls, arch) -> RoutingConfig:
        """The routing of a :class:`~quarkmoe_jax.checkpoint.architectures.MoEArchitecture` (which holds one)."""
        return arch.routing


def router_logits(x, weight, bias=None):
    """``x [T, H] @ weight[E, H]^T (+ bias)`` in float32 -> ``[T, E]``."""
    logits = jnp.dot(x.astype(jnp.float32), jnp.asarray(weight, jnp.float32).T, precision=lax.Precision.HIGHEST)
    return logits if bias is None else logits + jnp.asarray(bias, jnp.float32)


def route(logits, config: RoutingConfig, correction_bias=None):
    """Top-k routing of ``logits [T, E]``; returns ``(topk_weights f32 [T, k], topk_ids int32 [T, k])``."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [T, E], got shape {logits.shape}")
    t, e = logits.shape
    k = config.top_k
    if not 1 <= k <= e:
        raise ValueError(f"top_k {k} must be in 1..{e}")
    if config.softmax_after_topk:
        top_logits, ids = lax.top_k(logits, k)
        return jax.nn.softmax(top_logits, axis=-1), ids.astype(jnp.int32)
    scores = jax.nn.softmax(logits, axis=-1) if config.scoring == "softmax" else jax.nn.sigmoid(logits)
    if config.num_expert_group is None:
        if correction_bias is not None:
            _, ids = lax.top_k(scores + jnp.asarray(correction_bias, jnp.float32), k)
            weights = jnp.take_along_axis(scores, ids, axis=-1)
        else:
            weights, ids = lax.top_k(scores, k)
    else:
        weights, ids = _grouped_topk(scores, config, correction_bias)
    if config.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if config.routed_scaling_factor != 1.0:
        weights = weights * jnp.float32(config.routed_scaling_factor)
    return weights, ids.astype(jnp.int32)


def _grouped_topk(scores, config: RoutingConfig, correction_bias):
    t, e = scores.shape
    groups = config.num_expert_group
    if e % groups:
        raise ValueError(f"{e} experts do not split into num_expert_group={groups} groups")
    if not 1 <= config.topk_group <= groups:
        raise ValueError(f"topk_group {config.topk_group} must be in 1..{groups}")
    selection = scores if correction_bias is None else scores + jnp.asarray(correction_bias, jnp.float32)
    grouped = selection.reshape(t, groups, e // groups)
    if correction_bias is not None:
        group_scores = lax.top_k(grouped, min(2, e // groups))[0].sum(-1)
    else:
        group_scores = grouped.max(-1)
    _, keep = lax.top_k(group_scores, config.topk_group)
    group_mask = jnp.zeros((t, groups), bool).at[jnp.arange(t)[:, None], keep].set(True)
    expert_mask = jnp.repeat(group_mask, e // groups, axis=-1)
    masked = jnp.where(expert_mask, selection, -jnp.inf)
    _, ids = lax.top_k(masked, config.top_k)
    return jnp.take_along_axis(scores, ids, axis=-1), ids
