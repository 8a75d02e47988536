"""Which mesh axes split a sharded MoE forward's tensors, so that dynamic activation scales computed on one
shard equal those of the whole (single-device) tensor.

A backend core running inside ``shard_map`` (:mod:`quarkmoe_jax.moe.sharded`) sees a slice of the work: the
tokens of one data-parallel group, the pairs routed to its local experts, a slice of the intermediate
dimension ``I``. A dynamic scale covers a set of values; where that set is split across devices, its
``amax`` is reduced (``lax.pmax``) over the splitting axes. MX scales cover 32 elements of one row inside a
shard (the ``I`` slices are 32-aligned) and need nothing.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ShardAxes"]


@dataclasses.dataclass(frozen=True)
class ShardAxes:
    """Mesh axes of an enclosing ``shard_map`` (static; hashable).

    Attributes:
      data: axes splitting the tokens (data-parallel groups; each group sees its own tokens).
      expert: axes splitting the experts (each shard runs its local experts' pairs).
      tensor: axes splitting the intermediate dimension ``I`` (GEMM1's output columns, GEMM2's K).
    """

    data: tuple[str, ...] = ()
    expert: tuple[str, ...] = ()
    tensor: tuple[str, ...] = ()

    def amax_axes(self, gemm: int, granularity: str | None) -> tuple[str, ...]:
        """Axes a dynamic ``amax`` of GEMM ``gemm``'s (1 or 2) input is reduced over.

        * ``"tensor"``: every row and column: GEMM1's rows are all tokens (split over data and, under an
          all-to-all exchange, expert axes), GEMM2's rows are all pairs and its columns are split over
          tensor axes.
        * ``"token"`` (one scale per row): only the columns: GEMM2's ``I`` under tensor parallelism.
        * ``"channel"`` (Quark: one scale per input channel over each expert's rows): the expert's rows,
          split over data axes.
        """
        if granularity in (None, "tensor"):
            return self.data + self.expert + (self.tensor if gemm == 2 else ())
        if granularity == "token":
            return self.tensor if gemm == 2 else ()
        if granularity == "channel":
            return self.data
        raise ValueError(f"unknown activation scale granularity {granularity!r}")
