"""Continuous batching: which requests run in an engine step, and how many of their tokens.

Each step the scheduler fills a token budget: first the running requests (a decode token each, or the next
chunk of a prompt), in the order they were admitted, then waiting requests (first come, first served), whose
prompts are cut into chunks that fit what is left of the budget. A request holds the cache blocks of every
position it has computed (:class:`BlockAllocator`). When the blocks run out, the most recently admitted
running request is preempted: its blocks are freed, and it waits at the head of the queue to be recomputed
(its prompt and the tokens it has produced so far are prefilled again; no token is lost or changed).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from quarkmoe_jax.serving.params import SamplingParams

__all__ = ["BlockAllocator", "PLACEHOLDER", "Request", "Scheduler"]


class BlockAllocator:
    """The free list of a paged cache's ``num_blocks`` blocks (host side)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` free block ids, or None (nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclasses.dataclass(eq=False)
class Request:
    """One request's state. ``tokens``: its prompt followed by what it produced (``output``);
    ``num_computed``: how many of ``tokens`` have their keys and values in the cache (in ``blocks``);
    ``key_data`` uint32 ``[2]``: its PRNG key (the token at output index ``i`` is drawn with ``fold_in(key, i)``)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    key_data: np.ndarray
    output: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0
    #: ``(step, row)`` while the last token is :data:`PLACEHOLDER`: launched, not yet copied back (the engine's
    #: step ``step`` samples it at ``row``; a next step reads it there, on the device)
    in_flight: tuple[object, int] | None = None

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys and values are not in the cache yet (>= 1 while the request runs)."""
        return len(self.tokens) - self.num_computed

    @property
    def complete(self) -> bool:
        """Every token it may produce is sampled or in flight: nothing more to compute."""
        return len(self.output) >= self.params.max_new_tokens


#: a token sampled by a step still running on the device (its value comes back with that step's tokens)
PLACEHOLDER = -1


class Scheduler:
    """Chooses each step's ``[(request, number of its tokens)]`` under ``max_num_batched_tokens`` and
    ``max_num_seqs``, holding ``blocks_per_request`` blocks of ``block_size`` positions at most per request."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator, self.block_size = allocator, block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Request, int]]:
        budget, chosen, preempted = self.max_num_batched_tokens, [], False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.complete:  # its last token is in flight; it finishes when that comes back
                index += 1
                continue
            count = min(request.num_pending, budget)
            if not self._hold(request, request.num_computed + count):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                continue
            chosen.append((request, count))
            budget -= count
            index += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            count = min(request.num_pending, budget)
            if not self._hold(request, count):
                break
            self.waiting.popleft()
            self.running.append(request)
            chosen.append((request, count))
            budget -= count
        return chosen

    def finish(self, request: Request) -> None:
        """Release a finished (or aborted) request's blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.free(request.blocks)
        request.blocks = []

    def _hold(self, request: Request, positions: int) -> bool:
        """Make ``request`` hold the blocks of ``positions`` positions; False (nothing taken) if too few are free."""
        missing = math.ceil(positions / self.block_size) - len(request.blocks)
        if missing <= 0:
            return True
        blocks = self.allocator.allocate(missing)
        if blocks is None:
            return False
        request.blocks.extend(blocks)
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.allocator.free(request.blocks)
        request.blocks, request.num_computed = [], 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
