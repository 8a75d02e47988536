"""How a whole model is split over a ``jax.sharding.Mesh`` (docs/distributed.md, "Whole models").

The mesh is the MoE layer's (:func:`~quarkmoe_jax.moe.sharding.moe_mesh`: axes ``data``, ``expert``,
``tensor``), so every MoE layer splits exactly as :class:`~quarkmoe_jax.moe.sharding.MoESharding` says, and the
rest of the model follows vLLM's tensor parallelism over the ``tensor`` axis, replicated over the other axes
(what ``quarkmoe plan`` counts):

* attention: query heads split (``q_proj`` / ``q_b_proj`` / ``kv_b_proj`` rows, ``o_proj`` columns, gpt-oss's
  sinks); key / value heads split, and where there are fewer than ``tp`` each is repeated ``tp / kv`` times at
  load so that every shard holds the one its query heads read (vLLM's ``QKVParallelLinear``); DeepSeek's
  ``q_a_proj``, ``kv_a_proj_with_mqa``, the norms and the latent cache replicated (vLLM's MLA);
* dense MLPs: tensor-parallel as a shared expert (:meth:`MoESharding.for_shared_experts`);
* embeddings and LM head: vocabulary rows split, the vocabulary padded to a multiple of 64 as vLLM's
  ``VocabParallelEmbedding`` pads it (the padding's logits are dropped);
* the KV cache: split over key / value heads (one per shard where they were repeated); the latent cache
  replicated.

Only the parameters' and the cache's placement is chosen here; the forward is the single-device program,
compiled by ``jit`` for the whole mesh (XLA's SPMD partitioner inserts the all-reduce after ``o_proj`` and the
vocabulary gathers), with each MoE layer's own ``shard_map`` inside it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.checkpoint.plan import VOCAB_PADDING, split_problem
from quarkmoe_jax.errors import QuarkMoEError
from quarkmoe_jax.formats import QArray
from quarkmoe_jax.formats.mx import MX_BLOCK_SIZE, round_up
from quarkmoe_jax.models.decoder_config import DecoderConfig
from quarkmoe_jax.moe.sharding import MoESharding
from quarkmoe_jax.nn import QuarkMoE, QuarkMoEBlock

__all__ = ["ModelSharding", "COLUMN", "ROW", "REPLICATED", "LINEAR_SPLITS", "KV_PROJECTIONS"]


COLUMN, ROW, REPLICATED = "column", "row", "replicated"
"""How a Linear's weight ``[N, K]`` is split: output rows (``N``), input columns (``K``), or not at all."""

LINEAR_SPLITS = {
    "q_proj": COLUMN,
    "k_proj": COLUMN,  # key / value heads: repeated to ``tp`` first where fewer (ModelSharding.kv_head_rows)
    "v_proj": COLUMN,
    "o_proj": ROW,
    "q_a_proj": REPLICATED,
    "q_b_proj": COLUMN,
    "kv_a_proj_with_mqa": REPLICATED,
    "kv_b_proj": COLUMN,
    "lm_head": COLUMN,  # the padded vocabulary's rows
}
"""How each Linear of the model splits over the tensor axis, by its name (the loader and :meth:`ModelSharding.
shard_model` read this table)."""
KV_PROJECTIONS = ("k_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class ModelSharding:
    """A whole model's placement over ``moe.mesh`` (static; hashable).

    Attributes:
      moe: every MoE layer's :class:`~quarkmoe_jax.moe.sharding.MoESharding` (its mesh is the model's).
      num_heads / num_kv_heads / vocab_size: the model's, checked against the tensor-parallel size.
    """

    moe: MoESharding
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @classmethod
    def of(cls, mesh: Mesh | MoESharding, config: DecoderConfig) -> ModelSharding:
        """The placement of ``config``'s model on ``mesh`` (or on an :class:`MoESharding`'s mesh, keeping its
        placement and exchange). Raises :class:`QuarkMoEError` for a split vLLM cannot run either
        (:func:`~quarkmoe_jax.checkpoint.plan.split_problem`, the rule ``quarkmoe plan`` marks layouts by)."""
        moe = mesh if isinstance(mesh, MoESharding) else MoESharding(mesh)
        sharding = cls(moe, config.num_heads, config.num_kv_heads, config.vocab_size)
        problem = split_problem(
            sharding.tp, config.num_heads, config.num_kv_heads, config.vocab_size, config.mla is not None
        )
        if problem is not None:
            raise QuarkMoEError(f"mesh {dict(moe.mesh.shape)} cannot hold this model: {problem}")
        return sharding

    @property
    def mesh(self) -> Mesh:
        return self.moe.mesh

    @property
    def tp(self) -> int:
        return self.moe.tp

    @property
    def dense(self) -> MoESharding:
        """A dense MLP's (or shared expert's) sharding: tensor-parallel, the expert axis acting as data."""
        return self.moe.for_shared_experts()

    @property
    def padded_vocab(self) -> int:
        return round_up(self.vocab_size, VOCAB_PADDING) if self.tp > 1 else self.vocab_size

    @property
    def kv_repeats(self) -> int:
        """How many times each key / value head is stored: ``tp / kv`` where there are fewer heads than tensor
        shards (each shard then holds one), else 1."""
        return max(1, self.tp // self.num_kv_heads)

    def kv_head_rows(self, head_dim: int) -> np.ndarray:
        """The checkpoint rows of ``k_proj`` / ``v_proj`` (``[kv * head_dim, H]``) each stored row reads: head
        ``j`` of the ``kv * kv_repeats`` stored heads is checkpoint head ``j // kv_repeats``."""
        heads = np.repeat(np.arange(self.num_kv_heads), self.kv_repeats)
        return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)

    def _tensor(self, split: bool):
        return self.moe.tensor_axis if split and self.tp > 1 else None

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    # -- parameters ---------------------------------------------------------------------------------

    def place_linear(self, weight, split: str, rows: np.ndarray | None = None):
        """A Linear weight ``[N, K]`` (a float array or a :class:`QArray`) on the mesh, split as ``split``
        (:data:`COLUMN`, :data:`ROW`, :data:`REPLICATED`). A dimension that does not divide into whole shards
        (for MX codes: whole 32-element scale blocks) stays whole; per-tensor scales, and the per-output-channel
        scales of a row split, are replicated. ``rows``: the row of ``weight`` each placed row takes (the
        repeated key / value heads); every per-row leaf (codes, row scales) takes the same rows."""
        if rows is not None:
            n = weight.shape[0]
            weight = jax.tree.map(lambda a: a[rows] if a.ndim and a.shape[0] == n else a, weight)
        if not isinstance(weight, QArray):
            return self.place(weight, self.matrix_spec(weight.shape, split, block=1))
        block = MX_BLOCK_SIZE if weight.scales is not None and weight.scales.ndim == weight.values.ndim else 1
        k = weight.values.shape[-1] if block == 1 else weight.scales.shape[-1] * block
        spec = self.matrix_spec((weight.values.shape[0], k), split, block)

        def place_leaf(leaf):
            if leaf.ndim == 0 or (leaf.ndim == 1 and split == ROW):
                return self.place(leaf, P())
            return self.place(leaf, P(*spec[: leaf.ndim]))

        return jax.tree.map(place_leaf, weight)

    def matrix_spec(self, shape: tuple[int, ...], split: str, block: int = 1) -> P:
        """The spec of a matrix ``[N, K]`` split as ``split`` where its dimension divides into whole shards
        (of ``block``-element groups along ``K``), else replicated."""
        n, k = shape[0], shape[-1]
        if split == COLUMN and n % self.tp == 0:
            return P(self._tensor(True), None)
        if split == ROW and k % (self.tp * block) == 0:
            return P(None, self._tensor(True))
        return P(None, None)

    def vector_spec(self, length: int, split: bool) -> P:
        """A per-head or per-output vector (biases, gpt-oss's sinks) split with its rows."""
        axis = self._tensor(split and length % self.tp == 0)
        return P(axis) if axis else P()

    def vocab_spec(self) -> P:
        """Embedding / LM-head rows ``[padded_vocab, H]``."""
        return P(self._tensor(True), None)

    def place(self, value, spec: P) -> jax.Array:
        """``value`` on the mesh as ``spec`` says."""
        return jax.device_put(value, self.named(spec))

    def from_view(self, view: np.ndarray, spec: P, dtype, rows: int | np.ndarray | None = None) -> jax.Array:
        """A global array read shard by shard from ``view`` (a memory-mapped checkpoint tensor): each device's
        block is sliced from the view and converted alone, so no whole copy of the tensor exists on the host.
        ``rows``: the array's first dimension when larger than the view's (zero rows appended: the padded
        vocabulary), or the view's row each row reads (repeated key / value heads)."""
        row_map = np.arange(view.shape[0]) if rows is None or np.ndim(rows) == 0 else np.asarray(rows)
        length = rows if rows is not None and np.ndim(rows) == 0 else len(row_map)
        shape = (int(length), *view.shape[1:])
        dtype = jnp.dtype(dtype)

        def block(index):
            start, stop, _ = index[0].indices(shape[0])
            rest = [len(range(*i.indices(n))) for i, n in zip(index[1:], shape[1:], strict=True)]
            part = np.zeros((stop - start, *rest), dtype)
            source = row_map[start : min(stop, len(row_map))]
            if source.size:
                first, contiguous = int(source[0]), bool(np.all(np.diff(source) == 1))
                picked = slice(first, first + source.size) if contiguous else source  # a slice reads a range
                part[: source.size] = np.asarray(view[(picked, *index[1:])]).astype(dtype)
            return part

        return jax.make_array_from_callback(shape, self.named(spec), block)

    # -- KV cache -----------------------------------------------------------------------------------

    def cache_share(self, latent: bool) -> float:
        """The fraction of the model's one-device cache bytes each device holds: ``max(1, kv / tp) / kv`` of
        the key / value heads; the whole latent cache."""
        return 1.0 if latent else max(1, self.num_kv_heads // self.tp) / self.num_kv_heads

    def cache_spec(self, name: str, ndim: int) -> P:
        """A cache entry ``[B or blocks, S or block_size, heads, dim]`` (``k`` / ``v``) split over key / value
        heads; latent entries ``[.., .., dim]`` replicated."""
        if name in ("k", "v") and ndim == 4 and self.tp > 1:
            return P(None, None, self.moe.tensor_axis, None)
        return P(*([None] * ndim))

    def allocate_cache(self, shapes: list[dict[str, jax.ShapeDtypeStruct]]) -> list[dict[str, jax.Array]]:
        """Zero cache arrays of ``shapes``, each created split on the devices (never whole on one)."""
        shardings = [{n: self.named(self.cache_spec(n, s.ndim)) for n, s in entry.items()} for entry in shapes]
        make = jax.jit(
            lambda: [{n: jnp.zeros(s.shape, s.dtype) for n, s in entry.items()} for entry in shapes],
            out_shardings=shardings,
        )
        return make()

    # -- a model built on one device ----------------------------------------------------------------

    def shard_model(self, model):
        """Move a one-device :class:`~quarkmoe_jax.models.QuarkMoEForCausalLM` (its experts in Quark's layout,
        not yet laid out for a kernel) onto the mesh, in place, by the rules the loader follows; returns it.
        For a model that does not fit one device, load it per shard: ``from_pretrained(path, mesh=...)``."""
        if model.sharding is not None:
            raise ValueError("shard_model() takes a model on one device")
        for layer in model.layers:
            attn = layer.self_attn
            for name, split in LINEAR_SPLITS.items():
                linear = getattr(attn, name, None)
                if linear is None:
                    continue
                rows = self.kv_head_rows(attn.head_dim) if name in KV_PROJECTIONS else None
                self._shard_linear(linear, split, rows)
            if getattr(attn, "k_proj", None) is not None:
                attn.num_kv_heads = attn.k_proj.out_features // attn.head_dim
            if getattr(attn, "sinks", None) is not None:
                attn.sinks.set_value(self.place(attn.sinks.get_value(), self.vector_spec(attn.num_heads, True)))
            mlp = layer.mlp
            if isinstance(mlp, QuarkMoEBlock):
                mlp.experts = mlp.experts.shard(self.moe)
                if mlp.shared is not None:
                    mlp.shared = mlp.shared.shard(self.dense)
            elif isinstance(mlp, QuarkMoE):
                layer.mlp = mlp.shard(self.dense)
        embed = model.embed_tokens.get_value()
        model.embed_tokens.set_value(self.place(self._pad_rows(embed), self.vocab_spec()))
        if model.lm_head is not None:
            self._shard_linear(model.lm_head, LINEAR_SPLITS["lm_head"], None, pad=True)

        self.replicate_rest(model)
        model.sharding = self
        return model

    def replicate_rest(self, model) -> None:
        """Every parameter of ``model`` not yet on the mesh (norms, routers) replicated over it, in place."""

        def replicated(leaf):
            on_mesh = isinstance(getattr(leaf, "sharding", None), NamedSharding) and leaf.sharding.mesh == self.mesh
            return leaf if on_mesh else self.place(leaf, P())

        nnx.update(model, jax.tree.map(replicated, nnx.state(model)))

    def _pad_rows(self, value):
        pad = self.padded_vocab - value.shape[0]
        return value if pad == 0 else jnp.pad(value, [(0, pad)] + [(0, 0)] * (value.ndim - 1))

    def _shard_linear(self, linear, split: str, rows, pad: bool = False) -> None:
        weight = linear.restore_checkpoint_layout().weight.get_value()
        if pad and not isinstance(weight, QArray):
            weight = self._pad_rows(weight)
        linear.weight.set_value(self.place_linear(weight, split, rows))
        if linear.bias is not None:
            bias = linear.bias.get_value()
            bias = bias[rows] if rows is not None else self._pad_rows(bias) if pad else bias
            linear.bias.set_value(self.place(bias, self.vector_spec(bias.shape[0], split == COLUMN)))
