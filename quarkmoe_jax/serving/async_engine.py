"""The engine on its own thread, for a server: HTTP handlers queue requests and read their tokens, the engine
loop alone touches the :class:`~quarkmoe_jax.serving.Engine`.

``AsyncEngine(engine).start()``; in a handler, ``request_id, outputs = await async_engine.add(prompt_ids,
params)`` (a bad request raises :class:`~quarkmoe_jax.errors.InputError` here, naming the engine's field) and
``await outputs.get()`` gives each :class:`~quarkmoe_jax.serving.RequestOutput` (or an :class:`EngineFailure`)
in order; ``async_engine.abort(request_id)`` frees the request's blocks at the loop's next turn (a client that
went away). The loop runs a step whenever any request is unfinished and sleeps otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.serving.engine import Engine

__all__ = ["AsyncEngine", "EngineFailure", "EngineState"]

log = logging.getLogger("quarkmoe_jax.serving")

THROUGHPUT_WINDOW_S = 10.0
"""Generated tokens/s is measured over this many seconds."""


@dataclasses.dataclass(frozen=True)
class EngineFailure:
    """What a request's queue receives when a step raised: the request is over, with this message."""

    message: str


@dataclasses.dataclass(frozen=True)
class EngineState:
    """A snapshot for /metrics: requests running and waiting, the KV cache's used share, tokens counted."""

    running: int
    waiting: int
    kv_cache_usage: float
    prompt_tokens: int
    generation_tokens: int
    generation_tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class _Sink:
    """Where a request's outputs go: a queue owned by an event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, object]]) -> None:
    """Put each ``(queue, item)`` on its queue from the loop's own thread (a loop already closed drops them:
    its requests' handlers are gone)."""

    def put_all():
        for queue_, item in items:
            queue_.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:
        pass


class AsyncEngine:
    """An :class:`Engine` driven by one background thread; safe to call from an asyncio event loop."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._thread = threading.Thread(target=self._run, name="quarkmoe-engine", daemon=True)
        self._lock = threading.Lock()
        self._state = EngineState(0, 0, 0.0, 0, 0, 0.0)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._prompt_tokens = self._generation_tokens = 0

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the engine loop is running (False before :meth:`start`, after :meth:`shutdown`, or once a
        failure stopped it)."""
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still running get an :class:`EngineFailure`)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def state(self) -> EngineState:
        with self._lock:
            return self._state

    async def add(self, prompt_ids: list[int], params) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its outputs arrive on."""
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        outputs: asyncio.Queue = asyncio.Queue()

        def resolve(request_id: str | None, error: Exception | None) -> None:
            def settle():
                if accepted.done():
                    return
                if error is None:
                    accepted.set_result(request_id)
                else:
                    accepted.set_exception(error)

            loop.call_soon_threadsafe(settle)

        self._commands.put(("add", prompt_ids, params, resolve, _Sink(loop, outputs)))
        self._wake.set()
        request_id = await accepted
        return request_id, outputs

    def abort(self, request_id: str) -> None:
        """Drop a request (its blocks are freed before the next step); unknown or finished ids are ignored."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._publish()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, the server stays up
                log.exception("engine step failed")
                self._fail_all(f"the engine step failed: {type(e).__name__}: {e}")
                continue
            now = time.monotonic()
            deliveries: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
            for output in outputs:
                sink = self._sinks.get(output.request_id)
                if sink is not None:
                    deliveries[sink.loop].append((sink.queue, output))
                if output.finished:
                    self._sinks.pop(output.request_id, None)
            for loop, items in deliveries.items():  # one wake-up of each loop a step, not one per request
                _deliver(loop, items)
            self._generation_tokens += len(outputs)
            self._recent.append((now, len(outputs)))
            self._publish()
        self._fail_all("the server is shutting down")

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, prompt_ids, params, resolve, sink = command
                try:
                    request_id = self.engine.add_request(prompt_ids, params)
                except InputError as e:
                    resolve(None, e)
                    continue
                except Exception as e:  # noqa: BLE001 - reported to the handler, the loop goes on
                    resolve(None, InputError(f"the request was refused: {type(e).__name__}: {e}"))
                    continue
                self._sinks[request_id] = sink
                self._prompt_tokens += len(prompt_ids)
                resolve(request_id, None)
            else:
                request_id = command[1]
                if self._sinks.pop(request_id, None) is not None:
                    self.engine.abort_request(request_id)

    def _fail_all(self, message: str) -> None:
        for request_id, sink in list(self._sinks.items()):
            _deliver(sink.loop, [(sink.queue, EngineFailure(message))])
            self.engine.abort_request(request_id)
        self._sinks.clear()

    def _publish(self) -> None:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent.popleft()
        scheduler = self.engine.scheduler
        allocator = scheduler.allocator
        state = EngineState(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_cache_usage=1 - allocator.num_free / allocator.num_blocks,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            generation_tokens_per_s=sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S,
        )
        with self._lock:
            self._state = state
