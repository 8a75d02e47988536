"""The server's engine front (`AsyncEngine`) with the engine on a thread of this process and in a process of its
own (what `quarkmoe serve` runs): the same outputs, refusals naming the field, aborts; a spawned engine's build
error and death reach the server as errors, never as a hang or a process left behind.

The engine here is a model-free stand-in (the front only needs the engine's request interface); the real engine
behind the real server is tests/serving/test_server.py's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
import types

import pytest

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.serving import RequestOutput, SamplingParams
from quarkmoe_jax.serving import async_engine as async_engine_module
from quarkmoe_jax.serving.async_engine import AsyncEngine, EngineFailure, EngineState, EngineUnavailable

WAIT_S = 60
"""The longest wait for one output or answer: a test fails rather than hangs."""


class CountingEngine:
    """Each step gives every request its next token, ``len(prompt) + i`` for its ``i``-th, until its
    ``max_new_tokens``; ``step_s`` makes a step take that long. Prompts must be non-empty."""

    def __init__(self, step_s: float = 0.0):
        self.context = types.SimpleNamespace(length=64)
        self.config = types.SimpleNamespace(vocab_size=100, eos_token_ids=(2,))
        self.step_s = step_s
        self.requests: dict[str, list[int]] = {}
        self.count = 0

    @property
    def scheduler(self):
        allocator = types.SimpleNamespace(num_free=64 - len(self.requests), num_blocks=64)
        return types.SimpleNamespace(running=list(self.requests), waiting=[], allocator=allocator)

    def add_request(self, prompt_ids, params) -> str:
        if not prompt_ids:
            raise InputError("prompt_ids: expected at least one token, found none", field="prompt_ids")
        self.count += 1
        self.requests[f"r{self.count}"] = [len(prompt_ids), 0, params.max_new_tokens]
        return f"r{self.count}"

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[1] += 1
            finished = state[1] == state[2]
            outputs.append(RequestOutput(request_id, [state[0] + state[1] - 1], finished))
            if finished:
                del self.requests[request_id]
        return outputs


def refuse_to_build():
    raise InputError("max_num_seqs must be a positive integer, got int 0", field="max_num_seqs")


async def _collect(outputs: asyncio.Queue) -> list:
    items = []
    while not items or not (isinstance(items[-1], EngineFailure) or items[-1].finished):
        items.append(await asyncio.wait_for(outputs.get(), WAIT_S))
    return items


@pytest.fixture(params=["thread", "process"])
def front(request):
    engine = AsyncEngine(CountingEngine()) if request.param == "thread" else AsyncEngine.spawn(CountingEngine)
    engine.start()
    yield engine
    engine.shutdown()
    assert not engine.alive


def test_both_homes_give_every_request_its_tokens_and_refuse_by_field(front):
    assert front.info == async_engine_module.EngineInfo(64, 100, (2,), "")

    async def run():
        added = [await front.add(list(range(n)), SamplingParams(k, stop_token_ids=())) for n, k in ((3, 4), (5, 2))]
        with pytest.raises(InputError, match="prompt_ids") as refused:
            await front.add([], SamplingParams(2))
        assert refused.value.field == "prompt_ids"
        return [(request_id, await _collect(outputs)) for request_id, outputs in added]

    (id_a, a), (id_b, b) = asyncio.run(run())
    assert [o.new_token_ids for o in a] == [[3], [4], [5], [6]] and a[-1].finished
    assert [o.new_token_ids for o in b] == [[5], [6]] and all(o.request_id == id_b for o in b)
    deadline = time.monotonic() + WAIT_S
    while front.state.generation_tokens < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    state = front.state
    assert (state.prompt_tokens, state.generation_tokens, state.running) == (8, 6, 0)


def test_an_aborted_request_stops_and_frees_its_place(front):
    async def run():
        long_id, long_out = await front.add([1], SamplingParams(10_000, stop_token_ids=()))
        await asyncio.wait_for(long_out.get(), WAIT_S)
        front.abort(long_id)
        front.abort("never-seen")  # ignored
        _, short_out = await front.add([1, 2], SamplingParams(3, stop_token_ids=()))
        return await _collect(short_out), long_out

    short, long_out = asyncio.run(run())
    assert [o.new_token_ids for o in short] == [[2], [3], [4]]
    deadline = time.monotonic() + WAIT_S
    while front.state.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert front.state.running == 0 and front.state.kv_cache_usage == 0
    late = [long_out.get_nowait() for _ in range(long_out.qsize())]  # handed over before the abort, if any
    assert not any(o.finished for o in late) and len(late) < 10_000


def test_a_build_error_is_raised_here_and_no_process_is_left():
    with pytest.raises(InputError, match="max_num_seqs must be a positive integer"):
        AsyncEngine.spawn(refuse_to_build)
    assert not multiprocessing.active_children()


def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones():
    front = AsyncEngine.spawn(CountingEngine, step_s=0.01).start()
    try:

        async def run():
            _, outputs = await front.add([1], SamplingParams(10_000, stop_token_ids=()))
            await asyncio.wait_for(outputs.get(), WAIT_S)
            os.kill(front._transport._process.pid, signal.SIGKILL)
            items = await _collect(outputs)
            with pytest.raises(EngineUnavailable, match="exit code -9"):
                await asyncio.wait_for(front.add([1], SamplingParams(2)), WAIT_S)
            return items

        items = asyncio.run(run())
        assert isinstance(items[-1], EngineFailure) and "exit code -9" in items[-1].message
        assert not front.alive
    finally:
        front.shutdown()
    assert not multiprocessing.active_children()


def test_a_spawned_engine_ignores_sigint_and_sigterm_until_the_server_stops_it():
    front = AsyncEngine.spawn(CountingEngine).start()
    pid = front._transport._process.pid
    os.kill(pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    os.kill(pid, signal.SIGTERM)

    async def run():
        _, outputs = await front.add([1, 2, 3], SamplingParams(2, stop_token_ids=()))
        return await _collect(outputs)

    assert [o.new_token_ids for o in asyncio.run(run())] == [[3], [4]]
    front.shutdown()
    assert not front.alive and not multiprocessing.active_children()


def test_the_front_wakes_each_event_loop_once_a_step():
    calls = []

    class Loop:
        def call_soon_threadsafe(self, callback, *args):
            calls.append(callback)
            callback(*args)

    loop = Loop()
    queues = [asyncio.Queue() for _ in range(3)]
    front = AsyncEngine(CountingEngine())  # not started: messages are handed to it directly
    front._sinks = {f"r{i}": async_engine_module._Sink(loop, q) for i, q in enumerate(queues)}
    state = EngineState(3, 0, 0.5, 3, 3, 0.3)
    front._receive(("outputs", [(f"r{i}", [i], i == 2, None) for i in range(3)], state))
    assert len(calls) == 1  # one wake-up for the three requests' outputs
    assert [q.get_nowait() for q in queues] == [RequestOutput(f"r{i}", [i], i == 2) for i in range(3)]
    assert front.state == state and set(front._sinks) == {"r0", "r1"}  # a finished request's sink is dropped
