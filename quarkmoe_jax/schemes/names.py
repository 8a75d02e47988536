"""The scheme-name grammar, in one place: what :func:`~quarkmoe_jax.schemes.get_moe_scheme` names a scheme and
what the exporter (``checkpoint/exporter.py``) parses back into a Quark config.

* OCP MX: ``w_<weight format>`` plus, for quantized activations, ``_a_<activation>``: an MX format name
  (``w_mxfp4_a_mxfp4``, ``w_mxfp8_e4m3_a_mxfp8_e4m3``), ``fp8`` (static per-tensor), ``fp8_dynamic_token`` or
  ``fp8_dynamic_tensor``; e.g. ``w_mxfp6_e2m3_a_fp8``.
* W8A8: ``w8a8_<int8|fp8>_<weight granularity: channel|tensor>_<static|dynamic_token|dynamic_tensor>``; e.g.
  ``w8a8_int8_channel_dynamic_token``.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["SchemeName", "FP8_ACTIVATIONS", "W8A8_KINDS", "W8A8_WEIGHT_GRANULARITIES", "W8A8_ACTIVATIONS"]

FP8_ACTIVATIONS = ("fp8", "fp8_dynamic_token", "fp8_dynamic_tensor")
"""The FP8 activation names of MX weights: static per tensor, dynamic per token, dynamic per tensor."""
W8A8_KINDS = ("int8", "fp8")
W8A8_WEIGHT_GRANULARITIES = ("channel", "tensor")
W8A8_ACTIVATIONS = ("static", "dynamic_token", "dynamic_tensor")

_MX = re.compile(r"w_(mxfp\w+?)(?:_a_(.+))?")
_W8A8 = re.compile(r"w8a8_([a-z0-9]+)_([a-z]+)_(.+)")


@dataclasses.dataclass(frozen=True)
class SchemeName:
    """A scheme's name, parsed.

    Attributes:
      weight: the MX format name (``"mxfp4"``, ...) or the W8A8 kind (``"int8"`` / ``"fp8"``).
      activation: MX weights: ``None`` (weight-only), an MX format name or one of :data:`FP8_ACTIVATIONS`;
        W8A8: one of :data:`W8A8_ACTIVATIONS`.
      weight_granularity: W8A8 only: ``"channel"`` or ``"tensor"``.
    """

    weight: str
    activation: str | None = None
    weight_granularity: str | None = None

    @property
    def w8a8(self) -> bool:
        return self.weight_granularity is not None

    @staticmethod
    def fp8_dynamic(granularity: str) -> str:
        """MX weights' name of dynamic FP8 activations of ``granularity`` ``"token"`` / ``"tensor"``."""
        return f"fp8_dynamic_{granularity}"

    @staticmethod
    def w8a8_dynamic(granularity: str) -> str:
        """W8A8's name of dynamic activations of ``granularity`` ``"token"`` / ``"tensor"``."""
        return f"dynamic_{granularity}"

    @staticmethod
    def w8a8_prefix(kind: str) -> str:
        """``w8a8_<kind>``: how a W8A8 scheme is named before its granularities are known (in refusals)."""
        return f"w8a8_{kind}"

    def __str__(self) -> str:
        if self.w8a8:
            return f"{self.w8a8_prefix(self.weight)}_{self.weight_granularity}_{self.activation}"
        return f"w_{self.weight}" + (f"_a_{self.activation}" if self.activation else "")

    @staticmethod
    def parse(name: str) -> SchemeName:
        """The parts of a scheme name; ``ValueError`` if it is not one of the grammar's (module docstring).

        Whether the named formats exist is the caller's check (the exporter's list of the schemes it writes)."""
        match = _W8A8.fullmatch(name)
        if match and match[1] in W8A8_KINDS and match[2] in W8A8_WEIGHT_GRANULARITIES and match[3] in W8A8_ACTIVATIONS:
            return SchemeName(match[1], match[3], match[2])
        match = _MX.fullmatch(name)
        if match:
            return SchemeName(match[1], match[2])
        raise ValueError(f"{name!r} is not a scheme name (w_<mx format>[_a_<activation>] or w8a8_<kind>_<g>_<act>)")
