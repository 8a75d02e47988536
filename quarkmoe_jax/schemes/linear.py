"""One dense Linear layer's weight ``[N, K]`` through a MoE scheme's lifecycle (vLLM's ``LinearMethodBase``).

A quantized Linear layer (an attention projection, ``lm_head``) is stored as one expert's projection is:
``<linear>.weight`` codes ``[N, K]`` (MX: packed along K), ``.weight_scale``, ``.input_scale`` and zero
points. :class:`LinearMethod` hands it to the layer's :class:`~quarkmoe_jax.schemes.base.MoEScheme` as the
down projection (``w2``, ``[hidden = N, intermediate = K]``) of a one-expert, non-gated layer, so every check
the experts get applies to it too: dtypes and shapes, NaN E8M0 scales, non-finite or non-positive scales,
zero points; and the scheme's post-load step (vLLM's or Quark's view) makes the weight. The gate/up half
(``w13``) of that one-expert layer is created empty (no rows): a Linear has none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quarkmoe_jax.contracts import MoEQuantConfig, MoEShape
from quarkmoe_jax.errors import CheckpointError
from quarkmoe_jax.schemes.base import MoEScheme, ParamSpec

__all__ = ["LinearMethod"]

_AS = "w2"  # the shard a Linear's weight is loaded as


class LinearMethod:
    """``create_weights`` -> ``load_weights`` (one call per checkpoint tensor) -> ``process_weights_after_loading``
    for a Linear layer ``[out_features, in_features]`` quantized by ``scheme``."""

    def __init__(self, scheme: MoEScheme, out_features: int, in_features: int):
        self.scheme = scheme
        self.out_features, self.in_features = out_features, in_features

    def create_weights(self) -> dict[str, ParamSpec]:
        scheme = self.scheme
        shape = MoEShape(1, self.out_features, self.in_features, gated=False)
        specs = scheme.create_weights(shape)
        if scheme.padded_intermediate != self.in_features:
            raise CheckpointError(
                f"{scheme.name}: in_features {self.in_features} of a Linear layer would be padded to "
                f"{scheme.padded_intermediate} ({scheme.name} pads K to whole 32-element MX blocks); not supported"
            )
        rows = shape.num_shards * scheme.padded_intermediate
        for key, spec in specs.items():  # the gate/up half: no rows
            if key.startswith("w13_") and len(spec.shape) >= 2 and spec.shape[1] == rows:
                specs[key] = ParamSpec((spec.shape[0], 0, *spec.shape[2:]), spec.dtype, spec.fill)
        return specs

    def required_suffixes(self) -> tuple[str, ...]:
        return self.scheme.required_suffixes()

    def load_weights(self, buffers: dict[str, np.ndarray], suffix: str, tensor: np.ndarray, name: str) -> None:
        """One checkpoint tensor ``<linear>.<suffix>`` (weight, weight_scale, input_scale, zero points)."""
        self.scheme.load_weights(buffers, suffix, tensor, 0, _AS, name)

    def process_weights_after_loading(self, buffers: dict[str, np.ndarray]) -> dict[str, Any]:
        """``{"weight": QArray [N, K], "input_scale": float32 [] or None}``."""
        params = self.scheme.process_weights_after_loading(buffers)
        weight = params["w2"][0]
        if weight.shape[0] != self.out_features:  # MX pads N to whole blocks: padding rows dropped
            weight = params["w2"][0, : self.out_features]
        input_scale = params.get("w2_input_scale")
        if input_scale is not None:
            input_scale = np.asarray(input_scale, np.float32).reshape(())
        return {"weight": weight, "input_scale": input_scale}

    def quant_config(self) -> MoEQuantConfig:
        return self.scheme.quant_config()
