"""Float expert weights: a MoE layer that the config excludes (vLLM's ``UnquantizedFusedMoEMethod``)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from quarkmoe_jax.errors import CheckpointError
from quarkmoe_jax.formats import float_qarray
from quarkmoe_jax.schemes.base import (
    ActivationQuant,
    MoEQuantConfig,
    MoEScheme,
    MoEShape,
    ParamSpec,
    WeightQuant,
    _copy_into,
)

__all__ = ["UnquantizedScheme"]


class UnquantizedScheme(MoEScheme):
    """``w13 [E, S*I, H]`` and ``w2 [E, H, I]`` in ``dtype`` (bfloat16 by default)."""

    vllm_method = "UnquantizedFusedMoEMethod"

    def __init__(self, semantics: str = "vllm", dtype=ml_dtypes.bfloat16):
        super().__init__(None, semantics, "unquantized")
        self.dtype = np.dtype(dtype)

    def create_weights(self, shape: MoEShape) -> dict[str, ParamSpec]:
        self.shape = shape
        e, s, h, i = shape.num_experts, shape.num_shards, shape.hidden_size, shape.intermediate_size
        specs = {"w13_weight": ParamSpec((e, s * i, h), self.dtype), "w2_weight": ParamSpec((e, h, i), self.dtype)}
        specs.update(self._bias_specs())
        return specs

    def required_suffixes(self) -> tuple[str, ...]:
        return ("weight",)

    def _load_weight(self, buffers, tensor, expert, shard, name):
        if tensor.dtype.kind != "f" and tensor.dtype != ml_dtypes.bfloat16:
            raise CheckpointError(f"{name}: an unquantized layer needs float weights, found dtype {tensor.dtype}")
        h, i = self.shape.hidden_size, self.shape.intermediate_size
        if shard == "w2":  # the copy casts to self.dtype
            _copy_into(buffers["w2_weight"][expert], tensor, (h, i), name, "w2 weight")
        else:
            rows = self._rows(shard)
            _copy_into(
                buffers["w13_weight"][expert, rows], tensor, (rows.stop - rows.start, h), name, f"{shard} weight"
            )

    def process_weights_after_loading(self, buffers: dict[str, np.ndarray]) -> dict[str, Any]:
        params = {"w13": float_qarray(buffers["w13_weight"]), "w2": float_qarray(buffers["w2_weight"])}
        params.update(self._bias_and_input_scale_params(buffers))
        return params

    def quant_config(self) -> MoEQuantConfig:
        return MoEQuantConfig(self.name, WeightQuant("none"), ActivationQuant("none"), self.semantics)
