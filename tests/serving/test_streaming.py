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
    async with asyncio.timeout(30):  # a piece that never comes fails the test instead of hanging it
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


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The synthetic checkpoints' byte-level tokenizer (multi-byte characters split over tokens)."""
    from quarkmoe_jax.checkpoint.synthetic import write_synthetic_tokenizer
    from quarkmoe_jax.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_synthetic_tokenizer(folder)
    return load_tokenizer(folder, needed=True)


@pytest.mark.parametrize("stop", [(), ("e",), ("\u4e16", "ab")])
def test_pieces_of_random_ids_add_up_to_the_whole_decoding(byte_tokenizer, stop, key):
    """Random ids (invalid UTF-8 and characters split over tokens included), fed one or a few at a time: the
    pieces and the finish equal ``decode(all ids)`` cut before the first stop string."""
    import jax
    import numpy as np

    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    texts = ["né 世界 abc", "e\u4e16e", "plain ascii"]
    vocab = byte_tokenizer.get_vocab_size()
    for trial in range(60):
        if trial < len(texts):
            ids = byte_tokenizer.encode(texts[trial], add_special_tokens=False).ids
        else:
            ids = rng.integers(0, vocab, rng.integers(1, 30)).tolist()
        stream = TextStream(byte_tokenizer, stop)
        pieces, i = [], 0
        while i < len(ids):
            n = int(rng.integers(1, 4))
            pieces.append(stream.add(ids[i : i + n]))
            i += n
        text = "".join(pieces) + stream.finish()
        whole = byte_tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [whole.find(s) for s in stop if s in whole]
        assert text == (whole[: min(cuts)] if cuts else whole), (ids, stop)
