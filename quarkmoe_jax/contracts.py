"""What every part of the library agrees on, at the bottom of the import graph (it imports nothing of ours).

* ``semantics``: which numerics a quantized layer reproduces: ``"vllm"`` (what vLLM's Quark MoE methods
  compute, the default) or ``"quark"`` (Quark's own fake-quant); docs/checkpoints.md, "Two numeric semantics".
  :class:`Numerics` (``Numerics.of(semantics)``) is what a semantics means, one flag per behaviour the code
  branches on; the code reads the flags, never the name.
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
    "Numerics",
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
class Numerics:
    """What a semantics changes: one flag per behaviour that differs between vLLM's and Quark's numerics.

    Built by :meth:`of` (the only place that reads a semantics name); every part reads the flags.

    Attributes:
      semantics: the name it was built from (display, and the quantizers' public ``semantics=`` argument).
      quark_quantizers: FP8 / INT8 activation quantizers use Quark's fake-quant formulas (``s = amax / 448`` or
        ``amax / 127.5``, float32 eps for a zero amax, FP8 ``x / s`` exactly, dequant ``q * s`` in float32)
        rather than vLLM's (minimum FP8 scaling factor, ``x * (1 / s)``, dequant through float16, INT8
        ``127 / absmax`` per token rounded half away from zero); ``formats.quantizers``.
      fp8_fake_quant_of_mx: FP8 activations of MX weights are fake-quantized (``q * s`` in float32) before the
        GEMM, as Quark computes; otherwise the e4m3 codes enter the GEMM and ``s`` multiplies the float32
        accumulator (:meth:`fp8_input_fake_quant`).
      mx_scale_mode_from_config: MX activations round their scales with the config's
        ``scale_calculation_mode``; otherwise always ``"even"`` (vLLM).
      channel_scales_by_ch_axis: dynamic ``per_channel`` activations with ``ch_axis`` 1 / -1 get one scale per
        input channel over each expert's rows (Quark's observer on the 2-D expert input); otherwise per token.
      static_input_scales_per_expert: static input scales stay one per expert; otherwise the maximum over all
        experts, one scalar (vLLM).
      tensor_weight_scales_per_shard: per-tensor W8A8 weight scales stay one per w1 / w3 shard (granularity
        ``"shard"``); otherwise each expert's shards are requantized to the larger scale (vLLM).
      asymmetric_int8_refused: nonzero INT8 zero points and asymmetric INT8 activations are refused; otherwise
        they run as symmetric with a warning (vLLM).
      int8_w8a16_for_dynamic_tensor: per-tensor INT8 weights with dynamic per-tensor INT8 activations run
        with unquantized activations (vLLM 0.33 builds ``int8_w8a16`` for that pair).
    """

    semantics: Semantics
    quark_quantizers: bool
    fp8_fake_quant_of_mx: bool
    mx_scale_mode_from_config: bool
    channel_scales_by_ch_axis: bool
    static_input_scales_per_expert: bool
    tensor_weight_scales_per_shard: bool
    asymmetric_int8_refused: bool
    int8_w8a16_for_dynamic_tensor: bool

    @staticmethod
    def of(semantics: str | Numerics) -> Numerics:
        """The numerics of a semantics name (a :class:`Numerics` is returned as it is); ``ValueError`` for an
        unknown name."""
        if isinstance(semantics, Numerics):
            return semantics
        return _NUMERICS[check_semantics(semantics)]

    def fp8_input_fake_quant(self, activation: ActivationQuant, weight_kind: str) -> bool:
        """Whether a GEMM input is FP8 fake-quantized (``q * s`` in float32) rather than entering the GEMM as
        e4m3 codes with its scale in the epilogue: FP8 activations of MX weights under Quark's numerics."""
        return self.fp8_fake_quant_of_mx and activation.kind == "fp8" and weight_kind == "mx"


def _numerics(semantics: Semantics) -> Numerics:
    quark = semantics == "quark"
    return Numerics(
        semantics,
        quark_quantizers=quark,
        fp8_fake_quant_of_mx=quark,
        mx_scale_mode_from_config=quark,
        channel_scales_by_ch_axis=quark,
        static_input_scales_per_expert=quark,
        tensor_weight_scales_per_shard=quark,
        asymmetric_int8_refused=quark,
        int8_w8a16_for_dynamic_tensor=not quark,
    )


_NUMERICS: dict[str, Numerics] = {name: _numerics(name) for name in SEMANTICS}


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

    def check_data(self, qtype, name: str = "weights") -> None:
        """Refuse data whose static type (a :class:`quarkmoe_jax.formats.QType`: ``kind``, ``element``,
        ``granularity``) says otherwise than this config: a different kind, MX format or scale granularity.
        ``"shard"`` (per-tensor scales kept per w1 / w3 shard) also accepts ``"tensor"`` scales (w2 is one
        shard) and per-row ``"channel"`` ones (tensor parallelism re-orders w13's rows and turns each shard's
        scale into its rows' scales: ``moe.shard_layout.scales_for_tensor_split``).

        Raises ``ValueError`` naming both descriptions.
        """
        agrees = qtype.kind == self.kind
        if agrees and self.kind == "mx":
            agrees = qtype.element == self.mx_format
        elif agrees and self.kind in ("int8", "fp8"):
            accepted = ("shard", "tensor", "channel") if self.granularity == "shard" else (self.granularity,)
            agrees = qtype.granularity in accepted
        if not agrees:
            raise ValueError(
                f"{name}: the quant config says {self} but the data is {qtype.element} with {qtype.granularity} "
                f"scales ({qtype}); the config and the weights must describe the same quantization"
            )


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

    @property
    def static_scaled(self) -> bool:
        """FP8 / INT8 with a static (stored, calibrated) input scale."""
        return self.kind in ("fp8", "int8") and not self.dynamic


@dataclasses.dataclass(frozen=True)
class MoEQuantConfig:
    """Everything the MoE forward needs to know about a layer's quantization."""

    scheme: str
    weight: WeightQuant
    activation: ActivationQuant
    semantics: str = DEFAULT_SEMANTICS
    numerics: Numerics = dataclasses.field(init=False, repr=False, compare=False)  # Numerics.of(semantics)

    def __post_init__(self):
        object.__setattr__(self, "numerics", Numerics.of(self.semantics))

    @property
    def fp8_input_fake_quant(self) -> bool:
        """Whether the GEMM inputs are FP8 fake-quantized before the GEMM (:meth:`Numerics.fp8_input_fake_quant`)."""
        return self.numerics.fp8_input_fake_quant(self.activation, self.weight.kind)

    @property
    def family(self) -> str:
        """The scheme's family (the key of ``kernels/backend_table.json``): the weight format by element width
        (both MXFP6 formats share ``"mxfp6"``; float weights are ``"bf16"``), a slash, the activation kind;
        e.g. ``"mxfp4/mx"``, ``"mxfp6/none"``, ``"mxfp8/mx"``, ``"int8/int8"``, ``"int8/none"`` (W8A16),
        ``"fp8/fp8"``, ``"bf16/none"``."""
        weight = self.weight
        if weight.kind == "mx":
            name = weight.mx_format.split("_")[0]
        else:
            name = {"none": "bf16"}.get(weight.kind, weight.kind)
        return f"{name}/{self.activation.kind}"
