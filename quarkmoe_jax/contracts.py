"""What every part of the library agrees on, at the bottom of the import graph (it imports nothing of ours).

* ``semantics``: which numerics a quantized layer reproduces: ``"vllm"`` (what vLLM's Quark MoE methods
  compute, the default) or ``"quark"`` (Quark's own fake-quant); docs/checkpoints.md, "Two numeric semantics".
* :class:`MoEShape`: one MoE layer's logical sizes.
* :class:`WeightQuant`, :class:`ActivationQuant`, :class:`MoEQuantConfig`: what the forward needs to know about
  a layer's quantization. The schemes (``quarkmoe_jax.schemes``) produce them from a Quark config; the op,
  its backends and the kernels read them and never parse a config.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = [
    "Semantics",
    "SEMANTICS",
    "DEFAULT_SEMANTICS",
    "check_semantics",
    "MoEShape",
    "WeightQuant",
    "ActivationQuant",
    "MoEQuantConfig",
]

Semantics = Literal["vllm", "quark"]
SEMANTICS: tuple[str, ...] = ("vllm", "quark")
DEFAULT_SEMANTICS: Semantics = "vllm"


def check_semantics(semantics) -> Semantics:
    """``semantics`` itself if it is one of :data:`SEMANTICS`; otherwise a ``ValueError`` naming it."""
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; expected one of {SEMANTICS}")
    return semantics


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """Logical sizes of one MoE layer's experts (before any padding).

    Attributes:
      num_experts: experts held by this layer (local experts under expert parallelism).
      hidden_size: H.
      intermediate_size: I, per partition.
      has_bias: whether the checkpoint has ``w13_bias`` / ``w2_bias``.
      gated: gate+up (2 shards in w13) or a non-gated activation (1 shard).
      interleaved: gpt-oss layout, w13 rows alternate gate/up instead of ``[gate; up]``.
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    has_bias: bool = False
    gated: bool = True
    interleaved: bool = False

    @property
    def num_shards(self) -> int:
        return 2 if self.gated else 1


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How expert weights are stored. ``kind`` is "mx", "int8", "fp8" or "none" (float weights).

    ``mx_format``: the MX format name for ``kind == "mx"`` ("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3").
    ``granularity`` for int8/fp8 scales: "channel" (``[E, N]``), "tensor" (``[E]``) or "shard" (per-tensor
    scales kept per w1/w3 shard, ``[E, S]`` for w13, Quark semantics).
    """

    kind: Literal["mx", "int8", "fp8", "none"]
    mx_format: str | None = None
    granularity: Literal["channel", "tensor", "shard"] | None = None


@dataclasses.dataclass(frozen=True)
class ActivationQuant:
    """How a GEMM input is quantized: not at all, MX (dynamic), FP8 or INT8 (static or dynamic)."""

    kind: Literal["none", "mx", "fp8", "int8"] = "none"
    mx_format: str | None = None
    dynamic: bool = True
    # "channel": one scale per input channel over the tokens routed to each expert, which is what Quark's
    # fake-quant computes for dynamic per_channel inputs with ch_axis 1 / -1 on the 2-D expert inputs.
    granularity: Literal["tensor", "token", "channel"] | None = None
    scale_mode: str = "even"  # MX activations: vLLM always uses "even"; Quark semantics use the config's mode


@dataclasses.dataclass(frozen=True)
class MoEQuantConfig:
    """Everything the MoE forward needs to know about a layer's quantization."""

    scheme: str
    weight: WeightQuant
    activation: ActivationQuant
    semantics: str = DEFAULT_SEMANTICS
