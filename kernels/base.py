"""What every kernel backend shares: the launch contract, the epilogue, the device facts the heuristics read,
and :class:`KernelBackend`, the one object a backend is.

A grouped GEMM of any backend computes ``out[r] = epilogue(a[r] @ W[tile_expert[r // block_m]]^T)`` over the
dispatch's row tiles (:mod:`quarkmoe_jax.moe.pair_sort`: pairs sorted by expert, each expert's group padded to
``block_m`` rows, ``tile_expert`` -1 for unused tiles) with the signature of
:func:`quarkmoe_jax.kernels.pallas.grouped_gemm.grouped_gemm`; :class:`TileConfig` and :class:`Epilogue` are
its static parameters, :func:`apply_epilogue` the epilogue's maths (in a kernel, or in XLA after a kernel that
writes its accumulators: :func:`epilogue_of_accumulators`).

A backend (:class:`KernelBackend`, one subclass per folder: ``kernels/pallas/``, ``kernels/triton/``) owns
its name, its GEMM, the layout it reads MX weights in, its tile and split-K rules, its kernel generations
(what ``auto``'s measured table must have timed) and what it needs to run here. The registry and ``auto``'s
order are in :mod:`quarkmoe_jax.kernels.registry`.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp

from quarkmoe_jax.activations import gated_activation, unary_activation
from quarkmoe_jax.formats import QArray

__all__ = [
    "TileConfig",
    "Epilogue",
    "apply_epilogue",
    "epilogue_of_accumulators",
    "dot_dtype",
    "accumulator_dtype",
    "DENSE_BLOCK_BYTES",
    "DENSE_MIN_K",
    "DENSE_WEIGHT_DTYPES",
    "REGIMES",
    "regime",
    "Load",
    "expected_load",
    "architecture",
    "FP8_TENSOR_CORES",
    "fp8_tensor_cores",
    "Generation",
    "KernelBackend",
]

DENSE_BLOCK_BYTES = 128
"""K extent of one dense-weight chunk in bytes: 64 bfloat16 or 128 int8 / e4m3 elements."""
DENSE_MIN_K = 16
"""Dense weights need K to be a multiple of this (the smallest K of a bfloat16 tensor-core dot)."""


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static tiling of one kernel launch (``block_m``, ``block_n`` powers of two >= 16; ``k_unroll`` K chunks
    per loop iteration, so each software-pipelined iteration has more bytes in flight; ``swap_ab`` computes
    the transposed product ``W_tile @ a_tile^T`` so the decoded weights are the MMA's M operand, for decode
    tiles with few rows; ``split_k`` splits the K loop over a third grid axis (more programs when the grid is
    smaller than the GPU): float32 partial sums, reduced and epilogued by XLA; not with ``out``. A table's
    ``block_n`` and ``split_k`` are upper bounds: :meth:`KernelBackend.fit_tile` makes them a launch's
    exact values)."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    k_unroll: int = 1
    swap_ab: bool = False
    split_k: int = 1
    prefetch_l2: int = 0  # the v2 MX kernels (triton/mx_gemm.py): > 0 = direct loads + L2 prefetch that far ahead
    fused_epilogue: bool = False  # the MX kernels (triton): epilogue and split-K sum in the kernel (v3)


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What the kernel does after the K loop (static).

    ``activation``: None (write ``acc + bias``), a gated name (GEMM1 with two accumulators) or a non-gated
    one. ``row_scales``: multiply the accumulator by a per-row float32 scale first (FP8 / INT8 activation
    scales); ``col_scales``: then by a per-output-column float32 scale of the expert (W8A8 weight scales).
    ``row_weights``: multiply by a per-row float32 weight last (GEMM2's router weight).
    """

    activation: str | None = None
    gated: bool = False
    interleaved: bool = False
    swiglu_limit: float | None = None
    activation_dtype: str = "bfloat16"
    has_bias: bool = False
    row_weights: bool = False
    row_scales: bool = False
    col_scales: bool = False


def apply_epilogue(
    accs, epilogue: Epilogue, out_dtype, row_scales=None, biases=None, row_weights=None, col_scales=None
):
    """The epilogue on the accumulators (in the kernel, or in XLA after a split-K reduction).

    Args:
      accs: one float32 or int32 ``[rows, cols]`` accumulator per weight shard (two for a gated activation).
      row_scales, row_weights: ``[rows, 1]`` float32 (as ``epilogue`` says); biases, col_scales: one per
        shard, broadcastable to ``[rows, cols]``.
    """
    accs = tuple(acc.astype(jnp.float32) for acc in accs)
    if epilogue.row_scales:
        accs = tuple(acc * row_scales for acc in accs)
    if epilogue.col_scales:
        accs = tuple(acc * scale for acc, scale in zip(accs, col_scales, strict=True))
    if epilogue.has_bias:
        accs = tuple(acc + bias for acc, bias in zip(accs, biases, strict=True))
    act_dtype = jnp.dtype(epilogue.activation_dtype)
    if epilogue.gated:
        out = gated_activation(
            accs[0].astype(act_dtype), accs[1].astype(act_dtype), epilogue.activation, limit=epilogue.swiglu_limit
        )
    elif epilogue.activation is not None:
        out = unary_activation(accs[0].astype(act_dtype), epilogue.activation)
    else:
        out = accs[0]
    if epilogue.row_weights:
        out = out.astype(jnp.float32) * row_weights
    return out.astype(out_dtype)


def epilogue_of_accumulators(
    acc, tile_expert, block_m: int, *, n_out, epilogue, out_dtype, bias, row_weights, row_scales, col_scales
):
    """The kernel's epilogue in XLA, for kernels that write their accumulators (split-K partial sums, the
    jax-triton kernels).

    Args:
      acc: float32 / int32 ``[M_pad, S*N]``, shard-major (``S = 2`` for a gated epilogue: gate columns
        ``[0, N)``, up columns ``[N, 2N)``, whatever the weight's row order).
      tile_expert, block_m: the row layout (rows of tile ``t`` belong to expert ``tile_expert[t]``).
      The rest: as :func:`grouped_gemm`.
    """
    shards = 2 if epilogue.gated else 1
    accs = (acc,) if shards == 1 else (acc[:, :n_out], acc[:, n_out:])

    def per_row(values):
        """``[E, S*N]`` expert values -> one ``[M_pad, N]`` array per shard, each row its tile's expert's."""
        rows = jnp.asarray(values, jnp.float32)[jnp.maximum(jnp.repeat(tile_expert, block_m), 0)]
        if shards == 1:
            return [rows]
        if epilogue.interleaved:
            return [rows[:, 0::2], rows[:, 1::2]]
        return [rows[:, :n_out], rows[:, n_out:]]

    return apply_epilogue(
        accs,
        epilogue,
        out_dtype,
        row_scales=jnp.asarray(row_scales, jnp.float32)[:, None] if epilogue.row_scales else None,
        biases=per_row(bias) if epilogue.has_bias else None,
        row_weights=jnp.asarray(row_weights, jnp.float32)[:, None] if epilogue.row_weights else None,
        col_scales=per_row(col_scales) if epilogue.col_scales else None,
    )


DENSE_WEIGHT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
"""Dense weight dtypes the kernels read as they are (other floats are cast to bfloat16)."""


def dot_dtype(operand_dtype, weight_dtype=None):
    """The dtype both MMA operands are cast to: int8 or float8_e4m3fn when operand and (dense) weights are
    both that dtype, else bfloat16 (MX weights: ``weight_dtype`` None)."""
    operand_dtype = jnp.dtype(operand_dtype)
    if weight_dtype is not None and operand_dtype == jnp.dtype(weight_dtype) and operand_dtype.itemsize == 1:
        return operand_dtype
    return jnp.dtype(jnp.bfloat16)


def accumulator_dtype(operand_dtype):
    """int32 for int8 x int8 products, else float32."""
    return jnp.dtype(jnp.int32) if jnp.dtype(operand_dtype) == jnp.dtype(jnp.int8) else jnp.dtype(jnp.float32)


REGIMES = ("decode", "mid", "prefill")
"""Regimes of a launch by rows per touched expert (:func:`regime`): the tile tables are keyed by them."""


def regime(rows_per_expert: float) -> str:
    """``"decode"`` (<= 16 rows per touched expert), ``"mid"`` (<= 128) or ``"prefill"``."""
    if rows_per_expert <= 16:
        return "decode"
    if rows_per_expert <= 128:
        return "mid"
    return "prefill"


@dataclasses.dataclass(frozen=True)
class Load:
    """The load a launch expects (:func:`expected_load`): ``touched`` experts, ``rows_per_expert`` each."""

    touched: int
    rows_per_expert: float

    @property
    def regime(self) -> str:
        return regime(self.rows_per_expert)


def expected_load(num_pairs: int, num_local: int, num_global: int) -> Load:
    """The :class:`Load` that the tile and prefill choices assume.

    ``num_pairs`` token-expert pairs over ``num_global`` experts, ``num_local`` of them here. An
    expert-parallel shard sees every pair of its token group but, under even routing, only its share
    ``num_local / num_global`` of them reaches its experts: counting them all made a one-expert Mixtral EP 8
    shard at 16 tokens take the 32-row ("mid") tiles instead of decode tiles (2.4x slower on an H100, MXFP4).
    Under the all-to-all exchange the shard's rows are already those with a local expert, so this share
    underestimates their local pairs (about 3x for Mixtral EP 8): an estimate, not a bound.
    """
    local_pairs = num_pairs * num_local / num_global
    touched = max(1, min(num_local, math.ceil(local_pairs)))
    return Load(touched, local_pairs / touched)


def architecture(device=None) -> str:
    """``"sm90"`` for a compute capability 9.0 GPU, ``"cpu"`` for the CPU (``device``: default the first)."""
    device = device or jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return device.platform
    return "sm" + str(capability).replace(".", "")


FP8_TENSOR_CORES: dict[str, bool] = {"cpu": True}
"""Overrides per device kind of whether FP8 W8A8 runs e4m3 x e4m3 on the fp8 tensor cores (else the e4m3
codes go in as bfloat16, exact, at half the tensor-core rate). Otherwise: GPUs of compute capability 8.9 and
later have them. The CPU interpreter runs the fp8 kernel path so that CI tests it."""


def fp8_tensor_cores(device_kind: str) -> bool:
    if device_kind in FP8_TENSOR_CORES:
        return FP8_TENSOR_CORES[device_kind]
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return False
    major, minor = (int(v) for v in str(capability).split(".")[:2])
    return (major, minor) >= (8, 9)


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generation of a backend's kernels for one kind of weights: ``number`` counts up whenever the
    kernels change enough that earlier timings no longer rank them; ``since`` (ISO date) is the day it
    landed, so a benchmark result that does not record its generations is dated to one."""

    number: int
    since: str


WEIGHT_CLASSES = ("mx", "dense")
"""The kinds of weights a backend's kernels are generationed by: MX (decoded in the kernel) and dense
(bfloat16, int8, e4m3)."""


class KernelBackend(abc.ABC):
    """A grouped-GEMM backend: everything the fused forward (:mod:`quarkmoe_jax.moe.fused`), the module's
    load-time layout and ``auto`` need to know about it, in one object.

    Attributes (class-level in each subclass):
      name: the backend's name (``backend=`` of the op, the module and the models; ``auto``'s table).
      layout: the name of the layout it reads MX weights in (a layout registered with
        :func:`quarkmoe_jax.formats.qarray.register_layout`); weights in another layout are re-laid on every
        call, so the load lays them out once for the backend ``auto`` prefers.
      generations: ``{"mx": Generation, "dense": Generation}``, the current generation of its kernels.
      prefill_dequantizes: whether prefill may dequantize MX weights to bfloat16 in bounded chunks and run
        the dense kernel (its ``gemm`` then takes an ``out`` buffer).
      has_paged_attention: whether it has a paged attention kernel (:meth:`paged_attention`), an attention
        backend of the serving engine (:mod:`quarkmoe_jax.models.paged`).
    """

    name: str
    layout: str
    generations: dict[str, Generation]
    prefill_dequantizes: bool = False
    has_paged_attention: bool = False

    @abc.abstractmethod
    def gemm(self, a, weight, tile_expert, *args, **kwargs):
        """The grouped GEMM, with the arguments and result of
        :func:`quarkmoe_jax.kernels.pallas.grouped_gemm.grouped_gemm` (the contract every backend's GEMM keeps:
        ``bias, row_weights, row_scales, out, col_scales`` and keyword-only ``n_out, config, epilogue,
        out_dtype, interpret``)."""

    def unavailable(self) -> str | None:
        """Why the backend cannot run on this machine (``None`` when it can)."""
        return None

    @abc.abstractmethod
    def tiles(
        self, device_kind: str, load: Load, contractions: tuple[int, int], mx: bool, arch: str | None = None
    ) -> tuple[TileConfig, TileConfig]:
        """GEMM1 and GEMM2 tiles (sharing ``block_m``) for ``load`` on ``device_kind`` (``arch`` default:
        the first device's), the GEMMs' contraction lengths ``(H, I)`` and MX (``mx``) or dense weights,
        before :meth:`fit_tile` fits them to a launch's N."""

    @abc.abstractmethod
    def fit_tile(self, config: TileConfig, n: int, weight, num_tiles: int) -> TileConfig:
        """A table's ``config`` made exact for one launch: ``n`` output rows, ``weight`` as the GEMM reads it
        (its K loop), ``num_tiles`` row tiles; raises ``NotImplementedError`` when no tile fits."""

    def prefill_dequant(self, device_kind: str, load: Load) -> bool:
        """Whether this launch dequantizes MX weights to bfloat16 first (only where
        :attr:`prefill_dequantizes`)."""
        return False

    @abc.abstractmethod
    def in_layout(self, weight: QArray) -> bool:
        """Whether MX ``weight`` is already in the layout this backend reads."""

    @abc.abstractmethod
    def to_layout(self, weight: QArray) -> QArray:
        """MX ``weight`` in this backend's layout (``ValueError`` when the layout cannot hold it)."""

    def generation(self, weight_class: str) -> int:
        return self.generations[weight_class].number

    def paged_attention_unsupported(self, block_size: int, key_dims: tuple[int, ...], value_dim: int) -> str | None:
        """Why this backend's paged attention cannot take these shapes (None: it can); a backend without a paged
        attention kernel says so."""
        return f"the {self.name} backend has no paged attention kernel"

    def paged_attention_preferred(self, num_tokens: int, context: int, key_dims: tuple[int, ...]) -> bool:
        """Whether ``auto`` runs this backend's kernel (where it takes the shapes) for a step of ``num_tokens``
        tokens (a bucket) over a cache of up to ``context`` positions a sequence, rather than XLA's gather
        (measured: docs/performance.md, "Paged attention")."""
        return True

    def paged_attention(self, q, key_caches, value_cache, block_tables, token_seq, positions, valid, **kwargs):
        """Paged attention with the arguments and result of
        :func:`quarkmoe_jax.kernels.pallas.paged_attention.paged_attention` (where
        :meth:`paged_attention_unsupported` is None)."""
        raise NotImplementedError(self.paged_attention_unsupported(0, (), 0))

    def __repr__(self) -> str:
        return f"<{self.name} kernel backend: MX layout {self.layout!r}>"


def weight_class(weight) -> str:
    """``"mx"`` for an MX :class:`QArray`, else ``"dense"``."""
    return "mx" if isinstance(weight, QArray) and weight.kind == "mx" else "dense"
