"""The server's streaming path in process: outputs that queue up while a piece is sent go out together (the engine
front's one wake-up of the event loop a step: tests/serving/test_async_engine.py)."""

from __future__ import annotations

import asyncio
import types

import pytest

pytest.importorskip("fastapi")
tokenizers = pytest.importorskip("tokenizers")

from quarkmoe_jax.serving import RequestOutput, SamplingParams  # noqa: E402
from quarkmoe_jax.serving.async_engine import EngineFailure  # noqa: E402
from quarkmoe_jax.serving.server import Api, ApiError  # noqa: E402
from quarkmoe_jax.serving.text import TextStream  # noqa: E402


def _tokenizer():
    """Id i reads " w<i>" (a word-level vocabulary, words joined with spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(16)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


class _Observed:
    def __init__(self):
        self.values = []

    def observe(self, value):
        self.values.append(value)


def _api():
    aborted = []
    engine = types.SimpleNamespace(abort=aborted.append)
    metrics = types.SimpleNamespace(ttft=_Observed(), tpot=_Observed())
    return types.SimpleNamespace(engine=engine, metrics=metrics), aborted


async def _pieces(items, *, one_by_one: bool, max_new_tokens=4, stop=()):
    """What ``Api.tokens`` yields for ``items`` queued at once, or each put after the previous piece."""
    api, aborted = _api()
    outputs: asyncio.Queue = asyncio.Queue()
    for item in items[:1] if one_by_one else items:
        outputs.put_nowait(item)
    stream = TextStream(_tokenizer(), stop)
    params = SamplingParams(max_new_tokens, stop_token_ids=())
    pieces = []
    async for piece in Api.tokens(api, "r", outputs, stream, params, 0.0):
        pieces.append(piece)
        if one_by_one and len(pieces) < len(items):
            outputs.put_nowait(items[len(pieces)])
    return pieces, api, aborted


def _outputs(ids):
    return [RequestOutput("r", [token], i == len(ids) - 1) for i, token in enumerate(ids)]


def test_outputs_queued_together_go_out_as_one_piece_with_every_token_counted():
    items = _outputs([3, 4, 5, 6])
    one_by_one, api, _ = asyncio.run(_pieces(items, one_by_one=True))
    assert [p[:3] for p in one_by_one] == [("w3", None, 1), (" w4", None, 2), (" w5", None, 3), (" w6", "length", 4)]
    merged, api, aborted = asyncio.run(_pieces(items, one_by_one=False))
    assert [p[:3] for p in merged] == [("w3 w4 w5 w6", "length", 4)]  # the same text, one chunk
    assert len(api.metrics.ttft.values) == 1 and len(api.metrics.tpot.values) == 1 and aborted == []


def test_a_stop_string_inside_merged_outputs_ends_the_request_there():
    pieces, _, aborted = asyncio.run(_pieces(_outputs([3, 4, 5, 6]), one_by_one=False, stop=("w5",)))
    assert [p[:2] for p in pieces] == [("w3 w4 ", "stop")] and aborted == ["r"]  # the engine stops making it


def test_a_failure_among_queued_outputs_is_reported_not_merged():
    items = [*_outputs([3, 4])[:1], EngineFailure("the engine step failed: boom")]
    with pytest.raises(ApiError, match="boom"):
        asyncio.run(_pieces(items, one_by_one=False))
