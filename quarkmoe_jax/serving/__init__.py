"""Serving: an engine that runs many requests at once (continuous batching over a paged KV cache), and
offline batch generation through it."""

from quarkmoe_jax.serving.engine import Engine, RequestOutput
from quarkmoe_jax.serving.offline import generate
from quarkmoe_jax.serving.params import SamplingParams

__all__ = ["Engine", "RequestOutput", "SamplingParams", "generate"]
