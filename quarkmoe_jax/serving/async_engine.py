"""The engine behind a server: HTTP handlers queue requests and read their tokens; one loop alone touches the
:class:`~quarkmoe_jax.serving.Engine`, on a thread of this process or in a process of its own.

- ``AsyncEngine(engine)``: ``engine`` (built here, e.g. in a notebook or a test) runs on a thread of this process.
- ``AsyncEngine.spawn(build, *args)``: ``build(*args)`` makes the engine in a child process, whose loop serves it
  there (what ``quarkmoe serve`` does). The engine's host work (scheduling, the step's arrays, dispatch) and the
  server's work per token (detokenizing, JSON, SSE) then run on two cores instead of taking turns on one
  interpreter lock, as vLLM's engine core runs apart from its API server. Only the step's new tokens cross the
  pipe (plain tuples: a frozen dataclass pickles ~8x slower). This process never touches a JAX device.

Then ``start()``; in a handler, ``request_id, outputs = await async_engine.add(prompt_ids, params)`` (a bad
request raises :class:`~quarkmoe_jax.errors.InputError` here, naming the engine's field) and ``await
outputs.get()`` gives each :class:`~quarkmoe_jax.serving.RequestOutput` (or an :class:`EngineFailure`) in order;
``async_engine.abort(request_id)`` frees the request's blocks at the loop's next turn (a client that went away).
The loop runs a step whenever any request is unfinished and waits for commands otherwise. ``shutdown()`` ends
the loop (requests still running get an :class:`EngineFailure`) and, for a spawned engine, its process.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.serving.engine import RequestOutput

__all__ = ["AsyncEngine", "EngineFailure", "EngineInfo", "EngineState", "EngineUnavailable"]

log = logging.getLogger("quarkmoe_jax.serving")

THROUGHPUT_WINDOW_S = 10.0
"""Generated tokens/s is measured over this many seconds."""
IDLE_WAIT_S = 0.5
"""How long the loop waits for a command when no request is unfinished (a command wakes it at once)."""

# Commands (to the loop) and messages (from it); plain tuples, as they cross a pipe for a spawned engine.
_ADD, _ABORT, _STOP = "add", "abort", "stop"  # (ADD, token, prompt_ids, params), (ABORT, request_id), (STOP,)
_ACCEPTED, _REFUSED = "accepted", "refused"  # (ACCEPTED, token, request_id), (REFUSED, token, message, field)
_OUTPUTS, _STATE = "outputs", "state"  # (OUTPUTS, [(id, ids, finished, logprobs)], EngineState), (STATE, state)
_FAILED = "failed"  # (FAILED, message, final): every request ends with message; final: the loop has ended
_READY, _ERROR = "ready", "error"  # a spawned engine's first message: (READY, EngineInfo) or (ERROR, exception)


@dataclasses.dataclass(frozen=True)
class EngineFailure:
    """What a request's queue receives when a step raised or the engine stopped: the request is over, with
    this message."""

    message: str


class EngineUnavailable(RuntimeError):
    """:meth:`AsyncEngine.add` when the engine loop has ended (shut down, or its process exited)."""


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
class EngineInfo:
    """What a server needs to know of the engine it cannot touch: the context (prompt + generation, tokens),
    the vocabulary size, the config's end-of-sequence ids, the engine's one-line summary."""

    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    summary: str = ""

    @classmethod
    def of(cls, engine) -> EngineInfo:
        summary = engine.summary() if hasattr(engine, "summary") else ""
        config = engine.config
        return cls(engine.context.length, config.vocab_size, tuple(config.eos_token_ids), summary)


# ------------------------------------------------------------------------------ the loop, where the engine is


class _EngineLoop:
    """Takes commands, steps the engine, emits each step's outputs and the state; runs on the engine's thread
    or in the engine's process. ``take(timeout)`` returns the commands waiting (waiting up to ``timeout`` s for
    one when there are none); ``emit(message)`` hands a message to the front."""

    def __init__(self, engine, take: Callable[[float], list], emit: Callable[[tuple], None]):
        self.engine, self.take, self.emit = engine, take, emit
        self.requests: set[str] = set()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()
        self.prompt_tokens = self.generation_tokens = 0
        self.published: EngineState | None = None

    def run(self) -> None:
        while True:
            for command in self.take(0.0 if self.engine.has_unfinished() else IDLE_WAIT_S):
                if command[0] == _STOP:
                    self.fail_all("the server is shutting down", final=True)
                    return
                self.handle(command)
            if not self.engine.has_unfinished():
                self.publish()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, the server stays up
                log.exception("engine step failed")
                self.fail_all(f"the engine step failed: {type(e).__name__}: {e}")
                continue
            now = time.monotonic()
            tokens = 0
            for output in outputs:
                tokens += len(output.new_token_ids)
                if output.finished:
                    self.requests.discard(output.request_id)
            self.generation_tokens += tokens
            self.recent.append((now, tokens))
            wire = [(o.request_id, o.new_token_ids, o.finished, o.logprobs) for o in outputs]
            self.emit((_OUTPUTS, wire, self.state()))

    def handle(self, command: tuple) -> None:
        if command[0] == _ADD:
            _, token, prompt_ids, params = command
            try:
                request_id = self.engine.add_request(prompt_ids, params)
            except InputError as e:
                self.emit((_REFUSED, token, str(e), e.field))
                return
            except Exception as e:  # noqa: BLE001 - reported to the handler, the loop goes on
                self.emit((_REFUSED, token, f"the request was refused: {type(e).__name__}: {e}", None))
                return
            self.requests.add(request_id)
            self.prompt_tokens += len(prompt_ids)
            self.emit((_ACCEPTED, token, request_id))
        elif command[0] == _ABORT:
            if command[1] in self.requests:
                self.requests.discard(command[1])
                self.engine.abort_request(command[1])

    def fail_all(self, message: str, final: bool = False) -> None:
        """End every request with ``message``; ``final``: the loop ends too (no request is taken after)."""
        for request_id in self.requests:
            self.engine.abort_request(request_id)
        self.requests.clear()
        self.emit((_FAILED, message, final))

    def state(self) -> EngineState:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self.recent.popleft()
        scheduler = self.engine.scheduler
        allocator = scheduler.allocator
        return EngineState(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            kv_cache_usage=1 - allocator.num_free / allocator.num_blocks,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            generation_tokens_per_s=sum(n for _, n in self.recent) / THROUGHPUT_WINDOW_S,
        )

    def publish(self) -> None:
        """Emit the state if it changed (an idle loop sends nothing)."""
        state = self.state()
        if state != self.published:
            self.published = state
            self.emit((_STATE, state))


def _take_from_queue(commands: queue.SimpleQueue) -> Callable[[float], list]:
    def take(timeout: float) -> list:
        try:
            taken = [commands.get(timeout=timeout) if timeout else commands.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                taken.append(commands.get_nowait())
            except queue.Empty:
                return taken

    return take


def _take_from_pipe(connection) -> Callable[[float], list]:
    """Commands from the server's end of the pipe; the server gone (end of file) reads as a stop."""

    def take(timeout: float) -> list:
        taken = []
        try:
            if connection.poll(timeout):
                taken.append(connection.recv())
                while connection.poll(0):
                    taken.append(connection.recv())
        except (EOFError, OSError):
            taken.append((_STOP,))
        return taken

    return take


def _engine_process(connection, build, args: tuple, kwargs: dict) -> None:
    """A spawned engine's process: build the engine, say it is ready (or why not), run the loop until the
    server says stop or goes away. SIGINT and SIGTERM are ignored here: a terminal's Ctrl-C or a service
    manager reaches the whole process group, and the server's graceful shutdown still needs its engine to
    finish the running requests (the server stops it afterwards; its end of the pipe closing stops it too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = build(*args, **kwargs)
        info = EngineInfo.of(engine)
    except BaseException as e:  # noqa: BLE001 - told to the server, which raises it
        if not isinstance(e, ValueError | TypeError | NotImplementedError | OSError):
            log.exception("the engine could not be built")
        connection.send((_ERROR, _picklable(e)))
        return
    connection.send((_READY, info))

    def emit(message: tuple) -> None:
        try:
            connection.send(message)
        except (BrokenPipeError, OSError):
            pass  # the server went away: the next take reads end of file and stops the loop

    _EngineLoop(engine, _take_from_pipe(connection), emit).run()


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling as itself, else a RuntimeError with its type and message."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:  # noqa: BLE001 - any pickling trouble: send the text instead
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------- the front, in the server's process


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


class _ThreadTransport:
    """The engine on a thread of this process."""

    def __init__(self, engine, receive: Callable[[tuple], None]):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        loop = _EngineLoop(engine, _take_from_queue(self._commands), receive)
        self._thread = threading.Thread(target=loop.run, name="quarkmoe-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send(self, command: tuple) -> None:
        self._commands.put(command)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float) -> None:
        if self._thread.is_alive():
            self.send((_STOP,))
            self._thread.join(timeout)


class _ProcessTransport:
    """The engine in a child process; a reader thread here hands its messages to the front."""

    def __init__(self, process, connection, receive: Callable[[tuple], None]):
        self._process, self._connection, self._receive = process, connection, receive
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="quarkmoe-engine-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            self._receive(message)
        self._process.join(1.0)
        code = self._process.exitcode
        self._receive((_FAILED, f"the engine process exited (exit code {code})", True))

    def send(self, command: tuple) -> None:
        with self._send_lock:
            try:
                self._connection.send(command)
            except (BrokenPipeError, OSError):
                pass  # the engine is gone: its reader fails every request

    @property
    def alive(self) -> bool:
        return self._process.is_alive() and self._reader.is_alive()

    def shutdown(self, timeout: float) -> None:
        self.send((_STOP,))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)
        self._reader.join(5.0)
        self._connection.close()


class AsyncEngine:
    """An engine driven by one loop (a thread here, or a process: :meth:`spawn`); safe to call from asyncio
    event loops. ``info`` is the :class:`EngineInfo` a server needs."""

    def __init__(self, engine):
        self._setup(EngineInfo.of(engine))
        self._transport = _ThreadTransport(engine, self._receive)

    def _setup(self, info: EngineInfo) -> None:
        self.info = info
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, _Sink]] = {}
        self._sinks: dict[str, _Sink] = {}
        self._tokens = 0
        self._closed: str | None = None  # why the loop ended for good
        self._state = EngineState(0, 0, 0.0, 0, 0, 0.0)

    @classmethod
    def spawn(cls, build: Callable, *args, ready_timeout_s: float | None = None, **kwargs) -> AsyncEngine:
        """Run ``build(*args, **kwargs)`` (a module-level function returning an Engine, picklable with its
        arguments) in a new process and serve that engine from there. Returns once it is built (warm-up
        included if ``build`` does it); an exception ``build`` raised is raised here (its type kept where it
        pickles), and no process is left behind."""
        context = multiprocessing.get_context("spawn")  # never fork a process that has JAX's threads
        mine, theirs = context.Pipe()
        process = context.Process(
            target=_engine_process, args=(theirs, build, args, kwargs), name="quarkmoe-engine", daemon=True
        )
        process.start()
        theirs.close()
        deadline = None if ready_timeout_s is None else time.monotonic() + ready_timeout_s
        try:
            while not mine.poll(1.0):
                if not process.is_alive():
                    raise RuntimeError(f"the engine process exited (exit code {process.exitcode}) before it was ready")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the engine process was not ready in {ready_timeout_s} s")
            message = mine.recv()
        except BaseException:
            process.kill()
            process.join(5.0)
            mine.close()
            raise
        if message[0] == _ERROR:
            process.join(5.0)
            mine.close()
            raise message[1]
        front = cls.__new__(cls)
        front._setup(message[1])
        front._transport = _ProcessTransport(process, mine, front._receive)
        return front

    def start(self) -> AsyncEngine:
        self._transport.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the engine loop is running (False before :meth:`start`, after :meth:`shutdown`, or once its
        process ended)."""
        return self._transport.alive

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still running get an :class:`EngineFailure`) and a spawned engine's process."""
        self._transport.shutdown(timeout)

    @property
    def state(self) -> EngineState:
        with self._lock:
            return self._state

    async def add(self, prompt_ids: list[int], params) -> tuple[str, asyncio.Queue]:
        """Queue a request; returns its id and the queue its outputs arrive on."""
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed is not None:
                raise EngineUnavailable(self._closed)
            self._tokens += 1
            token = self._tokens
            self._pending[token] = (loop, accepted, _Sink(loop, outputs))
        self._transport.send((_ADD, token, prompt_ids, params))
        request_id = await accepted
        return request_id, outputs

    def abort(self, request_id: str) -> None:
        """Drop a request (its blocks are freed before the next step); unknown or finished ids are ignored."""
        with self._lock:
            known = self._sinks.pop(request_id, None) is not None
        if known:
            self._transport.send((_ABORT, request_id))

    # ---------------------------------------------------- messages from the loop (its thread, or the reader)

    def _receive(self, message: tuple) -> None:
        kind = message[0]
        if kind == _OUTPUTS:
            deliveries: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
            with self._lock:
                for request_id, new_token_ids, finished, logprobs in message[1]:
                    sink = self._sinks.pop(request_id, None) if finished else self._sinks.get(request_id)
                    if sink is not None:
                        output = RequestOutput(request_id, new_token_ids, finished, logprobs)
                        deliveries[sink.loop].append((sink.queue, output))
                self._state = message[2]
            for loop, items in deliveries.items():  # one wake-up of each loop a step, not one per request
                _deliver(loop, items)
        elif kind == _STATE:
            with self._lock:
                self._state = message[1]
        elif kind in (_ACCEPTED, _REFUSED):
            with self._lock:
                loop, future, sink = self._pending.pop(message[1])
                if kind == _ACCEPTED:
                    self._sinks[message[2]] = sink
            result = message[2] if kind == _ACCEPTED else InputError(message[2], field=message[3])
            _settle(loop, future, result)
        elif kind == _FAILED:
            failure = EngineFailure(message[1])
            with self._lock:
                sinks, self._sinks = self._sinks, {}
                pending, self._pending = self._pending, {}
                if message[2]:
                    self._closed = message[1]
            deliveries = collections.defaultdict(list)
            for sink in sinks.values():
                deliveries[sink.loop].append((sink.queue, failure))
            for loop, items in deliveries.items():
                _deliver(loop, items)
            for loop, future, _ in pending.values():  # an add the engine never answered
                _settle(loop, future, EngineUnavailable(failure.message))


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result) -> None:
    """Resolve an :meth:`AsyncEngine.add`'s future on its loop: a request id, or the exception to raise."""

    def settle():
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
