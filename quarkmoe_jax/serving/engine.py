"""The inference engine: many requests at once over one paged KV cache (continuous batching).

``engine = Engine(model)``; ``engine.add_request(prompt_ids, SamplingParams(...))`` returns a request id;
each ``engine.step()`` runs one compiled step over every scheduled request (prefill chunks and decode tokens
together, :mod:`~quarkmoe_jax.serving.scheduler`) and returns the :class:`RequestOutput` of the requests that
produced a token; ``engine.has_unfinished()``. Only the step's new tokens (int32, one per sequence row) come
back to the host.

Async scheduling (the default, as vLLM's ``--async-scheduling``): a call schedules and launches step ``n + 1``
before it waits for step ``n``'s tokens, so the host's work (scheduling, the step's arrays, dispatch, handing
out tokens) runs while the device computes. A decode token whose value is not back yet is read by the next
step from the last step's tokens on the device; a request's sampled token at output index ``i`` is the same
either way. The cost: a request that meets a stop token has one more token computed and dropped.

Compiled shapes: the step's tokens are padded to a power of two ``N`` (at least 8, at most
``max_num_batched_tokens`` rounded up) and its sequence rows to ``min(N, max_num_seqs`` rounded up to a power
of two) (a step never has more sequences than tokens); every block table has the blocks of a whole context. So
the engine compiles at most ``log2`` (tokens) x 2 (all greedy or not) programs, :meth:`Engine.warm_up` compiles
them all at once, and a steady state compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.models import inputs
from quarkmoe_jax.models.paged import PagedBatch
from quarkmoe_jax.models.sampling import sample_tokens, token_logprobs
from quarkmoe_jax.serving.params import MAX_LOGPROBS, SamplingParams
from quarkmoe_jax.serving.scheduler import PLACEHOLDER, BlockAllocator, Request, Scheduler

__all__ = ["Engine", "RequestOutput", "TokenLogprobs"]

log = logging.getLogger("quarkmoe_jax.serving")

#: the fewest tokens a step is padded to by default: on a GPU one (a decode step of one request runs one token
#: slot: the MoE kernels size their grid and K split for the bucket, and one token's split is 1.6x faster at
#: Mixtral's shape on an H100 than eight slots' -- docs/performance.md); on the CPU eight (fewer programs to compile)
MIN_STEP_TOKENS = {"gpu": 1, "cpu": 8}


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """One new token's log-probability and the ``k`` best tokens' ``(id, logprob)`` at its step, best first
    (``k`` = the request's ``SamplingParams.logprobs``)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one request produced in one step: ``new_token_ids`` (one token), whether it has finished, and
    (if the request asked, ``SamplingParams.logprobs``) one :class:`TokenLogprobs` per new token."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    logprobs: list[TokenLogprobs] | None = None


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class Engine:
    """Serves generation requests on one model with continuous batching and a paged KV cache.

    Args:
      model: a :class:`~quarkmoe_jax.models.QuarkMoEForCausalLM`.
      max_num_seqs: requests running at once (default 16).
      max_num_batched_tokens: tokens one step computes (default 256): prompts longer than what is left of it
        are prefilled in chunks over several steps.
      block_size: positions per cache block (default 16).
      num_blocks: cache blocks (default: enough for ``max_num_seqs`` requests of a whole context, capped by
        ``memory_fraction``; at least one whole context).
      memory_fraction: on a GPU, the share of its memory the model and the cache may take together (vLLM's
        ``gpu_memory_utilization``; the cache gets what loading left of it); on the CPU, the host's memory is
        shared with everything else and the cache may take ``1 - memory_fraction`` of it (default 0.9).
      max_model_len: the longest prompt + new tokens (default: the model's context, :attr:`model.context`).
      seed: draws the seed of each request that sets none (default 0).
      attention_backend: "auto" (default: the paged attention kernel on a GPU where it takes the model's head
        dims and ``block_size`` and, token bucket by token bucket, where it measured faster than XLA; else XLA),
        "pallas" or "xla" (:mod:`quarkmoe_jax.models.paged`).
      async_scheduling: schedule and launch the next step while the device runs this one (default True; the
        outputs of a step come back with the next :meth:`step` call). False: each call waits for its own step.
        The attribute may be switched between calls.
      min_step_tokens: the smallest token bucket, a power of two (default: 1 on a GPU, 8 on the CPU,
        :data:`MIN_STEP_TOKENS`); each bucket from it up to ``max_num_batched_tokens`` is one compiled program.
    """

    def __init__(
        self,
        model,
        *,
        max_num_seqs: int = 16,
        max_num_batched_tokens: int = 256,
        block_size: int = 16,
        num_blocks: int | None = None,
        memory_fraction: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        async_scheduling: bool = True,
        min_step_tokens: int | None = None,
    ):
        self.model = model
        self.config = model.config
        self.context = model.context if max_model_len is None else inputs.context_of(model.config, max_model_len)
        self.max_num_seqs = inputs.positive_int(max_num_seqs, "max_num_seqs")
        self.max_num_batched_tokens = inputs.positive_int(max_num_batched_tokens, "max_num_batched_tokens")
        self.block_size = inputs.positive_int(block_size, "block_size")
        if (
            isinstance(memory_fraction, bool)
            or not isinstance(memory_fraction, (int, float))
            or not (0 < memory_fraction <= 1)
        ):
            raise InputError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        self.blocks_per_request = math.ceil(self.context.length / self.block_size)
        if num_blocks is None:
            num_blocks = self._blocks_that_fit(memory_fraction)
        num_blocks = inputs.positive_int(num_blocks, "num_blocks")
        if num_blocks < self.blocks_per_request:
            raise InputError(
                f"num_blocks = {num_blocks} cannot hold one request of {self.context} ({self.blocks_per_request} "
                f"blocks of {self.block_size}); lower max_model_len or free device memory"
            )
        self.num_blocks = num_blocks
        self.cache = model.init_paged_cache(num_blocks, self.block_size)
        self.scheduler = Scheduler(
            BlockAllocator(num_blocks), self.block_size, self.max_num_seqs, self.max_num_batched_tokens
        )
        graphdef, state = nnx.split(model)
        # the parameters flattened once: a step passes a flat list (nnx's Python flatten of the whole state
        # cost ~0.4 ms a step at 32 layers), their structure static beside the graph
        self._params, params_def = jax.tree.flatten(state)
        self._structure = _Structure.of(graphdef, params_def)
        self._requests: dict[str, Request] = {}
        self._seeds = np.random.default_rng(inputs.check_seed(seed))
        self._ids = itertools.count()
        if min_step_tokens is None:
            min_step_tokens = MIN_STEP_TOKENS.get(jax.default_backend(), MIN_STEP_TOKENS["gpu"])
        self.min_step_tokens = inputs.positive_int(min_step_tokens, "min_step_tokens")
        if self.min_step_tokens & (self.min_step_tokens - 1):
            raise InputError(f"min_step_tokens must be a power of two, got {min_step_tokens}", field="min_step_tokens")
        self._max_step_tokens = _power_of_two_at_least(max(self.max_num_batched_tokens, self.min_step_tokens))
        self._max_step_seqs = _power_of_two_at_least(self.max_num_seqs)
        if not isinstance(async_scheduling, bool):
            raise InputError(f"async_scheduling must be True or False, got {async_scheduling!r}")
        self.async_scheduling = async_scheduling
        self._in_flight: _Launched | None = None
        # where every step's tokens live (whole on every device of a mesh): one compiled shape and sharding
        self._no_tokens = jax.device_put(
            np.zeros(self._max_step_seqs, np.int32), None if model.sharding is None else model.sharding.named(P())
        )
        self.attention_backend = model.paged_attention_backend(attention_backend, self.block_size)
        self._step_attention = {  # auto may run XLA for some token buckets (a kernel slower there)
            n: model.paged_attention_backend(attention_backend, self.block_size, n, self.context.length)
            for n in self.step_buckets()
        }
        log.info("%s", self.summary())

    def summary(self) -> str:
        """One line: the cache's size and what it holds."""
        cache_bytes = inputs.cache_bytes(self.config, self.num_blocks, self.block_size, self.model.dtype)
        return (
            f"KV cache: {self.num_blocks} blocks x {self.block_size} positions ({cache_bytes / 2**30:.3g} GiB, "
            f"{self.num_blocks * self.block_size / self.context.length:.3g} whole contexts of "
            f"{self.context.length}); up to {self.max_num_seqs} requests and {self.max_num_batched_tokens} tokens "
            f"a step; attention: {self._attention_summary()}; scheduling: "
            f"{'async' if self.async_scheduling else 'waiting for each step'}; steps of {self.min_step_tokens} to "
            f"{self._max_step_tokens} token slots"
        )

    def _attention_summary(self) -> str:
        xla = [n for n, name in self._step_attention.items() if name != self.attention_backend]
        if not xla:
            return self.attention_backend
        return f"{self.attention_backend} (steps of <= {max(xla)} tokens: {self._step_attention[max(xla)]})"

    def _blocks_that_fit(self, memory_fraction: float) -> int:
        wanted = self.max_num_seqs * self.blocks_per_request
        per_block = inputs.cache_bytes(self.config, 1, self.block_size, self.model.dtype)
        if self.model.sharding is not None:  # one device's share of a block, beside its share of the weights
            per_block *= self.model.sharding.cache_share(latent=self.config.mla is not None)
        memory = inputs.device_memory()
        if memory is None:
            free = math.inf
        elif memory.accelerator:
            free = memory.total * memory_fraction - memory.in_use
        else:
            free = memory.total * (1 - memory_fraction)  # the host's memory, shared with everything else
        return int(min(wanted, max(free // per_block, 0)))

    # ------------------------------------------------------------------------------------------- requests

    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id. ``prompt_ids``: a non-empty sequence of token ids in
        ``[0, vocab)``. A bad request raises :class:`~quarkmoe_jax.errors.InputError` naming the field; the
        engine keeps serving the others."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}", field="params")
        if isinstance(prompt_ids, (str, bytes)):
            raise InputError("prompt_ids must be a list of token ids (tokenize the text first)", field="prompt_ids")
        try:
            prompt = np.asarray(prompt_ids)
        except (ValueError, TypeError, OverflowError) as e:
            raise InputError(f"prompt_ids must be a list of token ids ({e})", field="prompt_ids") from None
        if prompt.ndim != 1:
            raise InputError(
                f"prompt_ids must be one sequence of token ids, got shape {prompt.shape}", field="prompt_ids"
            )
        if prompt.size == 0:
            raise InputError("prompt_ids must hold at least one token id, got an empty prompt", field="prompt_ids")
        prompt = inputs.check_input_ids(prompt[None], self.config.vocab_size, self.context, name="prompt_ids")[0]
        inputs.check_max_new_tokens(params.max_new_tokens, len(prompt), self.context)
        stop_ids = None if params.stop_token_ids is None else list(params.stop_token_ids)
        stop = inputs.check_eos(stop_ids, self.config, name="stop_token_ids")
        if request_id is None:
            request_id = str(next(self._ids))
            while request_id in self._requests:
                request_id = str(next(self._ids))
        elif not isinstance(request_id, str) or request_id in self._requests:
            raise InputError(f"request_id must be a new string, got {request_id!r}", field="request_id")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**63))
        key_data = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
        request = Request(request_id, [int(t) for t in prompt], params, frozenset(int(s) for s in stop), key_data)
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Drop a request (its blocks are freed; it produces nothing more). Unknown ids are ignored."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request)

    def has_unfinished(self) -> bool:
        """Requests waiting or running, or a launched step whose outputs :meth:`step` has not returned yet."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def step_buckets(self) -> list[int]:
        """The token counts a step is padded to (one compiled program each, per greedy / sampled)."""
        buckets, n = [], self.min_step_tokens
        while n < self._max_step_tokens:
            buckets.append(n)
            n *= 2
        return buckets + [self._max_step_tokens]

    def warm_up(self, sampled: bool = True) -> float:
        """Compile every step program now (the greedy ones, and with ``sampled`` the sampling ones), as a server
        does before it takes requests; returns the seconds it took. Each runs once on padding tokens only, which
        write nothing to the cache."""
        start = time.perf_counter()
        for n in self.step_buckets():
            s = min(n, self._max_step_seqs)
            paged = PagedBatch(
                np.zeros(n, np.int32),
                np.zeros(n, np.int32),
                np.full(n, self.num_blocks * self.block_size, np.int32),
                np.zeros((s, self.blocks_per_request), np.int32),
                np.zeros(s, np.int32),
                np.zeros(n, bool),
            )
            sampling = (np.ones(s, np.float32), np.ones(s, np.float32), np.zeros(s, np.int32))
            keys = (np.zeros((s, 2), np.uint32), np.zeros(s, np.int32))
            for greedy in (True, False) if sampled else (True,):
                tokens, _, self.cache = _engine_step(
                    self._params,
                    self.cache,
                    self._no_tokens,
                    np.zeros(n, np.int32),
                    np.full(n, -1, np.int32),
                    paged,
                    *sampling,
                    *keys,
                    greedy=greedy,
                    attention_backend=self._step_attention[n],
                    structure=self._structure,
                )
                jax.block_until_ready(tokens)
        seconds = time.perf_counter() - start
        log.info("compiled %d step programs in %.1f s", len(self.step_buckets()) * (2 if sampled else 1), seconds)
        return seconds

    # ----------------------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Advance every scheduled request by one engine step; returns the outputs of the requests that produced
        a token (in scheduling order).

        With ``async_scheduling`` the step is launched and the outputs returned are those of the step launched
        by the previous call (the first call returns ``[]``; a call with nothing new to schedule only collects):
        the host schedules and builds step ``n + 1`` while the device runs step ``n``, and step ``n + 1`` reads
        the tokens step ``n`` sampled on the device."""
        launched = self._launch()
        previous, self._in_flight = self._in_flight, launched
        outputs = [] if previous is None else self._collect(previous)  # async, or just switched off
        if launched is not None and not self.async_scheduling:
            self._in_flight = None
            outputs += self._collect(launched)
        return outputs

    def _launch(self) -> _Launched | None:
        """Schedule a step and dispatch it (not waiting for it); None when nothing can be scheduled. Each request
        that will produce a token gets a :data:`PLACEHOLDER` for it, filled by :meth:`_collect`."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return None
        arrays, greedy = self._step_arrays(scheduled)
        attention = self._step_attention[len(arrays[0])]
        previous = self._no_tokens if self._in_flight is None else self._in_flight.tokens
        tokens, logprobs, self.cache = _engine_step(
            self._params,
            self.cache,
            previous,
            *arrays,
            greedy=greedy,
            attention_backend=attention,
            structure=self._structure,
        )
        launched = _Launched(tokens, logprobs, [])
        for row, (request, count) in enumerate(scheduled):
            request.num_computed += count
            if request.num_pending:
                continue  # a prompt chunk: the token sampled after it is not the request's yet
            launched.produced.append((row, request, len(request.output)))
            request.output.append(PLACEHOLDER)
            request.tokens.append(PLACEHOLDER)
            request.in_flight = (launched, row)
        return launched

    def _collect(self, launched: _Launched) -> list[RequestOutput]:
        """Wait for a launched step's tokens and hand them to their requests (those finished or aborted since are
        skipped: their rows were computed for nothing)."""
        tokens = np.asarray(launched.tokens)
        if any(request.params.logprobs is not None for _, request, _ in launched.produced):
            chosen, top_ids, top_logprobs = (np.asarray(a) for a in launched.logprobs)
        outputs = []
        for row, request, index in launched.produced:
            if self._requests.get(request.request_id) is not request:
                continue
            token = int(tokens[row])
            request.output[index] = token
            request.tokens[len(request.prompt) + index] = token
            if request.in_flight is not None and request.in_flight[0] is launched:
                request.in_flight = None
            finished = token in request.stop_ids or index + 1 >= request.params.max_new_tokens
            if finished:  # a token launched after this one (async scheduling) is dropped
                del request.output[index + 1 :], request.tokens[len(request.prompt) + index + 1 :]
                request.in_flight = None
                self.scheduler.finish(request)
                del self._requests[request.request_id]
            k = request.params.logprobs
            token_logprobs = None
            if k is not None:
                top = tuple(zip(top_ids[row, :k].tolist(), top_logprobs[row, :k].tolist(), strict=True))
                token_logprobs = [TokenLogprobs(token, float(chosen[row]), top)]
            outputs.append(RequestOutput(request.request_id, [token], finished, token_logprobs))
        return outputs

    def _step_arrays(self, scheduled: list[tuple[Request, int]]):
        """The step's host arrays, padded to its token bucket (per-token and per-sequence work vectorized: the
        loop over requests only copies each one's new token ids and block table). A request whose last token
        is still in flight reads it from the previous step's tokens (``from_previous``: that token's row there,
        else -1)."""
        rows = len(scheduled)
        counts = np.fromiter((count for _, count in scheduled), np.int64, rows)
        starts = np.fromiter((request.num_computed for request, _ in scheduled), np.int64, rows)
        total = int(counts.sum())
        n = min(_power_of_two_at_least(max(total, self.min_step_tokens)), self._max_step_tokens)
        s = min(n, self._max_step_seqs)
        ids = np.zeros(n, np.int32)
        from_previous = np.full(n, -1, np.int32)
        tables = np.zeros((s, self.blocks_per_request), np.int32)
        ends = np.cumsum(counts)
        for row, (request, count) in enumerate(scheduled):
            start = request.num_computed
            if request.in_flight is None:
                ids[ends[row] - count : ends[row]] = request.tokens[start : start + count]
            else:  # decoding on from a token not back yet: only that token is pending
                step, previous_row = request.in_flight
                if step is not self._in_flight or count != 1:
                    raise RuntimeError(f"request {request.request_id!r}: a token in flight from an older step")
                from_previous[ends[row] - 1] = previous_row
            tables[row, : len(request.blocks)] = request.blocks
        token_seq = np.zeros(n, np.int32)
        token_seq[:total] = np.repeat(np.arange(rows), counts)
        positions = np.zeros(n, np.int32)
        positions[:total] = np.arange(total) - np.repeat(ends - counts - starts, counts)
        slots = np.full(n, self.num_blocks * self.block_size, np.int32)
        real = slice(0, total)
        pos = positions[real]
        slots[real] = tables[token_seq[real], pos // self.block_size] * self.block_size + pos % self.block_size
        last = np.zeros(s, np.int32)
        last[:rows] = ends - 1
        params = [request.params for request, _ in scheduled]
        temperature, top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
        top_k, counters = np.zeros(s, np.int32), np.zeros(s, np.int32)
        temperature[:rows] = [p.temperature for p in params]
        top_p[:rows] = [p.top_p for p in params]
        top_k[:rows] = [p.top_k for p in params]
        counters[:rows] = [len(request.output) for request, _ in scheduled]
        key_data = np.zeros((s, 2), np.uint32)
        key_data[:rows] = [request.key_data for request, _ in scheduled]
        valid = np.arange(n) < total
        paged = PagedBatch(token_seq, positions, slots, tables, last, valid)
        greedy = all(p.greedy for p in params)
        return (ids, from_previous, paged, temperature, top_p, top_k, key_data, counters), greedy


@dataclasses.dataclass(eq=False)
class _Launched:
    """A dispatched step: its sampled tokens int32 ``[max_step_seqs]`` and logprobs (device arrays, maybe still
    being computed), and ``produced``: ``(row, request, output index)`` of every token it samples for a request."""

    tokens: jax.Array
    logprobs: tuple | None
    produced: list[tuple[int, Request, int]]


class _Structure:
    """A model's graph and parameter tree structure: the step's static argument. Hashed once and compared by
    identity (hashing a whole model's graph costs milliseconds, too much for every step); :meth:`of` gives
    one object per distinct structure, so engines over equal models share their compiled steps."""

    _interned: dict = {}

    def __init__(self, graphdef, params_def):
        self.graphdef, self.params_def = graphdef, params_def
        self._hash = hash((graphdef, params_def))

    @classmethod
    def of(cls, graphdef, params_def) -> _Structure:
        return cls._interned.setdefault((graphdef, params_def), cls(graphdef, params_def))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other


@functools.partial(jax.jit, static_argnames=("greedy", "attention_backend", "structure"), donate_argnames=("cache",))
def _engine_step(
    params,
    cache,
    previous,
    ids,
    from_previous,
    paged,
    temperature,
    top_p,
    top_k,
    key_data,
    counters,
    *,
    greedy,
    attention_backend,
    structure,
):
    """One step: ``previous`` int32 ``[max_step_seqs]`` the last step's tokens, read where ``from_previous >= 0``
    instead of ``ids``; returns the sampled tokens padded to ``[max_step_seqs]`` (one compiled shape for the next
    step's ``previous``), the logprobs (None when greedy) and the cache."""
    ids = jnp.where(from_previous >= 0, previous[jnp.maximum(from_previous, 0)], ids)
    model = nnx.merge(structure.graphdef, jax.tree.unflatten(structure.params_def, params))
    logits, cache = model.paged_logits(ids, paged, cache, attention_backend)
    keys = jax.vmap(lambda data, count: jax.random.fold_in(jax.random.wrap_key_data(data), count))(key_data, counters)
    tokens = sample_tokens(logits, keys, temperature, top_p, top_k, greedy=greedy, per_row_keys=True)
    logprobs = None if greedy else token_logprobs(logits, tokens, min(MAX_LOGPROBS, logits.shape[-1]))
    tokens = jnp.pad(tokens.astype(jnp.int32), (0, previous.shape[0] - tokens.shape[0]))
    if model.sharding is not None:
        tokens = jax.lax.with_sharding_constraint(tokens, model.sharding.named(P()))
    return tokens, logprobs, cache
