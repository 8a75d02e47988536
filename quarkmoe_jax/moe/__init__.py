"""The MoE forward: routing, activations, dispatch, the emulation oracle and the backend registry."""

from quarkmoe_jax.activations import ACTIVATIONS, apply_activation, is_gated
from quarkmoe_jax.moe.routing import RoutingConfig, route, router_logits
