"""One quantized-array type for every weight format and layout (after qwix's ``QArray``).

A :class:`QArray` is a frozen pytree: ``values`` and ``scales`` (and, for some kernel layouts, an ``extra``
bit plane) are leaves; its :class:`QType` is static and says everything else, explicitly:

* ``element``: an MX format (``"mxfp4"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``, ``"mxfp8_e4m3"``), ``"int8"``,
  ``"float8_e4m3fn"``, or a float dtype (``"bfloat16"``, ``"float16"``, ``"float32"``) for unquantized data;
* ``granularity`` of the scales: ``"block32"`` (MX: one E8M0 byte per 32 elements along the last axis),
  ``"channel"`` (one float32 scale per output row, ``[E, N]``), ``"tensor"`` (one per expert, ``[E]``),
  ``"shard"`` (one per w1 / w3 shard of an expert, ``[E, S]``, each covering ``N / S`` consecutive rows), or
  ``"none"``;
* ``layout``: ``"checkpoint"`` (the bytes as Quark stores them: MX codes packed along the last axis, 8-bit
  codes or floats as they are) or a named kernel layout registered by the module that makes it
  (``"chunk"``: :mod:`quarkmoe_jax.formats.kernel_layout`; ``"fragment"``:
  :mod:`quarkmoe_jax.formats.fragment_layout`), with that layout's static parameters.

Every layout converts back to ``"checkpoint"`` exactly (:meth:`QArray.to_checkpoint_layout`), so
:meth:`QArray.dequantize`, :meth:`QArray.codes` and expert indexing work on any of them.

``MXTensor`` is the name of a checkpoint-layout MX :class:`QArray` (``MXTensor(packed, scales, fmt)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from quarkmoe_jax.formats import mx as mxc
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE, MX_FORMATS, MXFormat, mx_format

__all__ = [
    "GRANULARITIES",
    "QType",
    "QArray",
    "MXTensor",
    "LayoutCodec",
    "register_layout",
    "quantize",
    "dequantize",
    "float_qarray",
    "scaled_qarray",
]

GRANULARITIES = ("block32", "channel", "tensor", "shard", "none")
_EIGHT_BIT = {"int8": jnp.int8, "float8_e4m3fn": jnp.float8_e4m3fn}
_FLOATS = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class QType:
    """The static part of a :class:`QArray` (module docstring).

    Attributes:
      element: element format name.
      granularity: scale granularity, one of :data:`GRANULARITIES`.
      layout: ``"checkpoint"`` or a registered kernel layout.
      layout_params: that layout's static parameters (e.g. the chunk length; the logical ``(N, K)`` of a
        padded layout), a tuple of hashables.
    """

    element: str
    granularity: str
    layout: str = "checkpoint"
    layout_params: tuple = ()

    def __post_init__(self):
        if self.element in MX_FORMATS:
            expected = ("block32",)
        elif self.element in _EIGHT_BIT:
            expected = ("channel", "tensor", "shard")
        elif self.element in _FLOATS:
            expected = ("none",)
        else:
            known = sorted(MX_FORMATS) + sorted(_EIGHT_BIT) + list(_FLOATS)
            raise ValueError(f"unknown QArray element {self.element!r}; expected one of {known}")
        if self.granularity not in expected:
            raise ValueError(f"{self.element} takes granularity {expected}, got {self.granularity!r}")
        if self.layout != "checkpoint" and self.layout not in _LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected 'checkpoint' or one of {sorted(_LAYOUTS)}")

    @property
    def kind(self) -> str:
        """``"mx"``, ``"int8"``, ``"fp8"`` or ``"none"`` (as :class:`~quarkmoe_jax.contracts.WeightQuant`)."""
        if self.element in MX_FORMATS:
            return "mx"
        if self.element in _EIGHT_BIT:
            return "int8" if self.element == "int8" else "fp8"
        return "none"

    @property
    def mx_format(self) -> MXFormat | None:
        return MX_FORMATS.get(self.element)

    @property
    def has_row_scales(self) -> bool:
        """8-bit codes (INT8, FP8) with float32 scales, one per output row once expanded
        (:meth:`QArray.row_scales`); MX scales are E8M0 per block, float data has none."""
        return self.element in _EIGHT_BIT

    @property
    def operand_exact_in_bfloat16(self) -> bool:
        """Whether the GEMM operand of these weights is exact in bfloat16: MXFP4 / MXFP6 values (``codes x
        2^e``: at most 4 significant bits, every scale in range), 8-bit codes (scales go to the epilogue),
        bfloat16 data. Not MXFP8: e4m3 subnormals times the smallest scales fall below bfloat16's range."""
        fmt = self.mx_format
        if fmt is not None:
            return fmt.bits < 8
        return self.element in ("int8", "float8_e4m3fn", "bfloat16")

    def with_layout(self, layout: str, layout_params: tuple = ()) -> QType:
        return dataclasses.replace(self, layout=layout, layout_params=tuple(layout_params))


@dataclasses.dataclass(frozen=True)
class LayoutCodec:
    """How a kernel layout relates to the checkpoint layout.

    Attributes:
      to_checkpoint: ``QArray`` in this layout -> the same values in the ``"checkpoint"`` layout, exactly.
      shape: the logical shape ``[..., N, K]`` of a ``QArray`` in this layout.
      take: ``(qarray, index) -> qarray`` selecting leading (expert) axes in this layout.
    """

    to_checkpoint: Callable[[QArray], QArray]
    shape: Callable[[QArray], tuple[int, ...]]
    take: Callable[[QArray, Any], QArray]


_LAYOUTS: dict[str, LayoutCodec] = {}


def register_layout(name: str, codec: LayoutCodec) -> None:
    """Register a kernel layout (done by the module that makes it, at import)."""
    _LAYOUTS[name] = codec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
    """A quantized (or plain float) array with its scales and static :class:`QType`.

    Attributes:
      values: checkpoint layout: MX uint8 codes packed along the last axis ``[..., N, packed(K)]``;
        int8 / float8_e4m3fn codes or floats ``[..., N, K]``. Kernel layouts: that layout's main array.
      scales: MX: uint8 E8M0 ``[..., N, K/32]`` (kernel layouts: their own arrangement); 8-bit: float32
        ``[E, N]`` (channel), ``[E]`` (tensor) or ``[E, S]`` (shard); floats: ``None``.
      qtype: static :class:`QType`; an :class:`~quarkmoe_jax.formats.mx.MXFormat` or MX format name is
        accepted for the checkpoint layout (``QArray(packed, scales, "mxfp4")``).
      extra: a kernel layout's second plane (FP6's other bits), else ``None``.

    Index leading axes with ``q[e]`` (experts); the last axis cannot be indexed.
    """

    values: jax.Array
    scales: jax.Array | None
    qtype: QType = dataclasses.field(metadata=dict(static=True))
    extra: jax.Array | None = None

    def __post_init__(self):
        if isinstance(self.qtype, (MXFormat, str)):
            object.__setattr__(self, "qtype", QType(mx_format(self.qtype).name, "block32"))

    # -- what every layout answers ------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, packed, scales, fmt: str | MXFormat, name: str = "tensor") -> QArray:
        """Wrap MX arrays read from a checkpoint, checking dtypes and shapes; errors name ``name``."""
        fmt = mx_format(fmt)
        packed, scales = jnp.asarray(packed), jnp.asarray(scales)
        if packed.dtype != jnp.uint8:
            raise TypeError(f"{name}: packed {fmt.name} weights must be uint8, found {packed.dtype}")
        if scales.dtype != jnp.uint8:
            raise TypeError(f"{name}: E8M0 scales must be uint8, found {scales.dtype}")
        n = packed.shape[-1] if packed.ndim else 0
        if packed.ndim == 0 or (n * 8) % fmt.bits:
            raise ValueError(f"{name}: packed {fmt.name} last axis {n} is not a whole number of elements")
        k = fmt.logical_length(n)
        mxc._check_block_axis(k, f"{name} logical last axis (packed length {n})")
        expected = packed.shape[:-1] + (k // MX_BLOCK_SIZE,)
        if scales.shape != expected:
            raise ValueError(
                f"{name}: scales shape {scales.shape} does not match packed {fmt.name} shape {packed.shape}; "
                f"expected {expected} (one E8M0 byte per {MX_BLOCK_SIZE} elements)"
            )
        return cls(packed, scales, fmt)

    @property
    def layout(self) -> str:
        return self.qtype.layout

    @property
    def kind(self) -> str:
        return self.qtype.kind

    @property
    def fmt(self) -> MXFormat:
        """The MX format (MX elements only)."""
        fmt = self.qtype.mx_format
        if fmt is None:
            raise AttributeError(f"a {self.qtype.element} QArray has no MX format")
        return fmt

    @property
    def packed(self) -> jax.Array:
        """MX codes packed as Quark stores them (checkpoint layout)."""
        return self.to_checkpoint_layout().values

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape ``[..., N, K]``."""
        if self.layout != "checkpoint":
            return _LAYOUTS[self.layout].shape(self)
        fmt = self.qtype.mx_format
        if fmt is None:
            return tuple(self.values.shape)
        return tuple(self.values.shape[:-1]) + (fmt.logical_length(self.values.shape[-1]),)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        arrays = [a for a in (self.values, self.scales, self.extra) if a is not None]
        return int(sum(a.size * a.dtype.itemsize for a in arrays))

    def to_checkpoint_layout(self) -> QArray:
        """The same values in Quark's layout (exact)."""
        return self if self.layout == "checkpoint" else _LAYOUTS[self.layout].to_checkpoint(self)

    def codes(self):
        """MX: unpacked uint8 element codes ``[..., K]``; 8-bit / float: the values."""
        q = self.to_checkpoint_layout()
        return mxc.unpack_codes(q.values, q.fmt) if q.kind == "mx" else q.values

    def dequantize(self, dtype=jnp.bfloat16):
        """Float values ``[..., N, K]`` in ``dtype``, scales applied.

        MX: exact in float32 / bfloat16 (E8M0 code 0xFF gives NaN). 8-bit: ``values * scale`` in float32 per
        the granularity, then cast. Floats: cast.
        """
        q = self.to_checkpoint_layout()
        if q.kind == "mx":
            exponents = q.scales.astype(jnp.int32) - 127
            return mxc._rescale(q.codes(), exponents, mxc.el.e8m0_is_nan(q.scales), q.fmt, dtype)
        values = q.values.astype(jnp.float32)
        if q.kind != "none":
            values = values * q.row_scales(values.shape[-2])[..., None]
        return values.astype(dtype)

    def row_scales(self, num_rows: int | None = None):
        """8-bit weights: the scale of every output row, float32 ``[..., N]`` (``N`` = ``num_rows`` or the
        weight's own), from the explicit granularity, never from shapes."""
        if not self.qtype.has_row_scales:
            raise ValueError(f"row_scales: a {self.qtype.element} QArray has no per-row float scales")
        n = self.shape[-2] if num_rows is None else num_rows
        scale = jnp.asarray(self.scales, jnp.float32)
        granularity = self.qtype.granularity
        if granularity == "channel":
            return scale
        if granularity == "tensor":
            return jnp.broadcast_to(scale[..., None], (*scale.shape, n))
        return jnp.repeat(scale, n // scale.shape[-1], axis=-1)  # "shard": [..., S], N / S rows each

    def __getitem__(self, index) -> QArray:
        """Select leading axes: experts (and, for MX and float data, rows); 8-bit scales hold one value per
        expert or per row, so their rows cannot be selected apart from the scales' granularity."""
        index = index if isinstance(index, tuple) else (index,)
        leading = self.ndim - (2 if self.qtype.has_row_scales else 1)
        if any(i is Ellipsis for i in index) or len(index) > leading:
            raise IndexError(f"QArray indexing selects the {leading} leading axes only, got {len(index)} indices")
        if self.layout != "checkpoint":
            return _LAYOUTS[self.layout].take(self, index)
        scales = None if self.scales is None else self.scales[index]
        return dataclasses.replace(self, values=self.values[index], scales=scales)

    def __repr__(self) -> str:
        q = self.qtype
        layout = "" if q.layout == "checkpoint" else f", layout={q.layout}"
        granularity = "" if q.granularity in ("block32", "none") else f", {q.granularity} scales"
        return f"QArray({q.element}{granularity}, shape={self.shape}{layout})"


MXTensor = QArray
"""MX data in Quark's layout: ``MXTensor(packed, scales, fmt)`` is a :class:`QArray`. The same class: an
``isinstance`` check is true for every QArray; ``q.kind == "mx"`` tells MX data."""


def quantize(x, fmt: str | MXFormat, scale_mode: str = "even") -> QArray:
    """Quantize ``x [..., K]`` (float32/bfloat16/float16, K a multiple of 32) to an MX :class:`QArray`.

    Bit-exact to amd-quark's exporter (observer -> scale -> ``scaled_real_quantize`` -> pack -> E8M0).
    ``scale_mode`` is ``"even"`` (Quark's default), ``"floor"`` (OCP MX v1.0) or ``"ceil"``.
    """
    fmt = mx_format(fmt)
    packed, scales = mxc.quantize_packed(x, fmt, scale_mode)
    return QArray(packed, scales, fmt)


def dequantize(packed, scales, fmt: str | MXFormat, dtype=jnp.bfloat16):
    """Dequantize MX arrays read straight from a Quark checkpoint.

    Args:
      packed: uint8 ``[..., K/2]`` (mxfp4), ``[..., 3K/4]`` (mxfp6) or ``[..., K]`` (mxfp8).
      scales: uint8 E8M0 ``[..., K/32]``.
      fmt: ``"mxfp4"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``, ``"mxfp8_e4m3"`` (or Quark's ``"fp4"``…).
      dtype: output dtype.

    Returns:
      ``[..., K]`` array of ``dtype``.
    """
    return QArray.from_arrays(packed, scales, fmt).dequantize(dtype)


def float_qarray(values) -> QArray:
    """Unquantized weights ``[..., N, K]`` (bfloat16 / float16 / float32) as a :class:`QArray`."""
    values = jnp.asarray(values)
    return QArray(values, None, QType(jnp.dtype(values.dtype).name, "none"))


def scaled_qarray(values, scales, granularity: str) -> QArray:
    """8-bit weights ``[..., N, K]`` (int8 or float8_e4m3fn) with float32 scales of ``granularity``
    (``"channel"`` ``[..., N]``, ``"tensor"`` ``[...]``, ``"shard"`` ``[..., S]`` with S dividing N) as a
    :class:`QArray`; a scale shape that does not fit raises ``ValueError``."""
    values = jnp.asarray(values)
    scales = jnp.asarray(scales, jnp.float32)
    lead, n = values.shape[:-2], values.shape[-2]
    fits = {
        "channel": scales.shape == (*lead, n),
        "tensor": scales.shape == lead,
        "shard": scales.shape[:-1] == lead and scales.ndim == len(lead) + 1 and n % max(scales.shape[-1], 1) == 0,
    }.get(granularity)
    if not fits:
        raise ValueError(f"{granularity} scales of shape {scales.shape} do not fit weights of shape {values.shape}")
    return QArray(values, scales, QType(jnp.dtype(values.dtype).name, granularity))
