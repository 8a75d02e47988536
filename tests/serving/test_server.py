"""`quarkmoe serve` as a subprocess on 127.0.0.1, spoken to with the real `openai` client and raw HTTP (httpx).

The checkpoint is `quarkmoe synthetic`'s (byte-level tokenizer, chat template); one server serves the module
(a second one is started for SIGTERM). Every wait is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from quarkmoe_jax.checkpoint.synthetic import write_float_checkpoint  # noqa: E402
from quarkmoe_jax.models import from_pretrained  # noqa: E402
from quarkmoe_jax.serving import Engine, SamplingParams, generate  # noqa: E402
from quarkmoe_jax.serving.text import TextStream  # noqa: E402
from quarkmoe_jax.tokenizer import load_tokenizer  # noqa: E402

STARTUP_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: pathlib.Path, log: pathlib.Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            "--port",
            str(self.port),
            "--max-batch",
            "8",
            "--max-num-batched-tokens",
            "64",
            "--max-model-len",
            "512",
            "--dtype",
            "float32",  # the checkpoint says bfloat16; the offline references below run in float32
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "quarkmoe_jax.cli", "serve", str(checkpoint), *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not start in {STARTUP_S} s: {log.read_text()[-2000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(10)
        return self.process.returncode


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_float_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", "mixtral", tokenizer=True)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    server = Server(checkpoint, tmp_path_factory.mktemp("log") / "server.log")
    yield server
    assert server.stop() in (0, 128 + signal.SIGTERM)  # uvicorn re-raises the SIGTERM after its graceful stop


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def offline(checkpoint):
    """What the engine gives offline: the text of each (prompt, SamplingParams) request."""
    model = from_pretrained(checkpoint, dtype="float32")
    tokenizer = load_tokenizer(checkpoint, needed=True)

    def run(prompts: list[str], params: list[SamplingParams]) -> list[str]:
        ids = [tokenizer.encode(p).ids for p in prompts]
        return [tokenizer.decode(new) for new in generate(model, ids, params)]

    return run


def test_models_and_health(server, client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.max_model_len == 512
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_equals_the_engine_offline(client, offline):
    out = client.completions.create(model="tiny", prompt="Bonjour, é世", max_tokens=12, temperature=0.7, seed=5)
    (want,) = offline(["Bonjour, é世"], [SamplingParams(12, temperature=0.7, seed=5)])
    assert out.choices[0].text == want
    assert out.usage.prompt_tokens == len("Bonjour, é世".encode()) and out.usage.completion_tokens >= 1
    assert out.choices[0].finish_reason in ("stop", "length")


def test_completion_logprobs_are_the_engine_s(client, checkpoint):
    out = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0, logprobs=3)
    model = from_pretrained(checkpoint, dtype="float32")
    tokenizer = load_tokenizer(checkpoint, needed=True)
    engine = Engine(model, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=512)
    engine.add_request(tokenizer.encode("Hi").ids, SamplingParams(5, logprobs=3))
    records = []
    while engine.has_unfinished():
        records += [r for o in engine.step() for r in o.logprobs]
    logprobs = out.choices[0].logprobs
    assert len(records) == out.usage.completion_tokens == len(logprobs.tokens) == len(logprobs.token_logprobs)
    assert logprobs.tokens == [tokenizer.decode([r.token_id], skip_special_tokens=False) for r in records]
    assert logprobs.token_logprobs == pytest.approx([r.logprob for r in records], abs=1e-5)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)  # pieces of characters share the key U+FFFD
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(records))]
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(records[0].top[0][1], abs=1e-5)


def test_chat_logprobs_streamed_and_whole(client):
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Hey"}],
        max_tokens=6,
        temperature=0.8,
        seed=2,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**kwargs)
    streamed = [
        e
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == len(streamed)
    for entry, again in zip(content, streamed, strict=True):
        assert entry.token == again.token and entry.logprob == pytest.approx(again.logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6 and entry.logprob <= 0
    bare = client.chat.completions.create(**{**kwargs, "top_logprobs": None})
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_several_prompts_and_n_choices_each_equal_the_engine_offline(server, offline):
    """Two prompts (text and token ids) x n = 2 with a seed: choice i * n + j is prompt i sampled with seed + j,
    whole and streamed."""
    prompts = ["abc", [104, 105, 33]]
    body = {"prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0.9, "seed": 40, "ignore_eos": True}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
    texts = {c["index"]: c["text"] for c in whole["choices"]}
    assert sorted(texts) == [0, 1, 2, 3] and whole["usage"]["completion_tokens"] == 4 * 6
    assert whole["usage"]["prompt_tokens"] == 3 + 3
    wanted = offline(
        ["abc", "abc", "hi!", "hi!"],
        [SamplingParams(6, temperature=0.9, seed=40 + j, stop_token_ids=()) for j in (0, 1, 0, 1)],
    )
    assert [texts[i] for i in range(4)] == wanted and wanted[0] != wanted[1]
    streamed = {i: "" for i in range(4)}
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed[choice["index"]] += choice["text"]
    assert streamed == texts


def test_chat_stream_equals_chat_whole(client):
    messages = [{"role": "user", "content": "Say something."}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=10, temperature=0.9, seed=11)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"


def test_32_concurrent_clients_each_get_their_offline_output(server, offline):
    prompts = [f"request {i}: " + "ab" * (i % 5) for i in range(32)]
    params = [SamplingParams(6 + i % 5, temperature=0.8, seed=100 + i, stop_token_ids=()) for i in range(32)]

    def ask(i):
        body = {"prompt": prompts[i], "max_tokens": params[i].max_new_tokens, "temperature": 0.8}
        body |= {"seed": 100 + i, "ignore_eos": True, "stream": i % 2 == 0}
        with httpx.Client(timeout=120) as http:
            if not body["stream"]:
                return http.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
            text = []
            with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text.append(json.loads(line[6:])["choices"][0]["text"])
            return "".join(text)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    assert got == offline(prompts, params)


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_client_that_disconnects_frees_its_request(server, client):
    body = {"prompt": "a long one", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then the client goes away
    deadline = time.monotonic() + 30
    while _metric(server, "quarkmoe_kv_cache_usage") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(server, "quarkmoe_kv_cache_usage") == 0 and _metric(server, "quarkmoe_requests_running") == 0
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x" * 600}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 600}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": 7}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 65}, 400, "n"),
        ("/v1/completions", {"prompt": ["x", "y"], "n": 33}, 400, "n"),
        ("/v1/completions", {"prompt": ["x"] * 65}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["x", 5]}, 400, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["x", "y" * 600]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [99999]}, 400, "stop_token_ids"),  # the engine's
        ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, 400, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        ("/v1/completions", "[1, 2]", 400, None),
        ("/v1/completions", "{not json", 400, None),
    ],
)
def test_bad_requests_get_an_openai_error_naming_the_field(server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_a_body_over_the_cap_is_refused(server):
    response = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20))
    assert response.status_code == 413 and "bytes" in response.json()["error"]["message"]


def test_stop_strings_cut_the_text(client):
    # A stop string taken from the free text: the first clean character after the first two, over a few seeds
    # (the random model may decode invalid UTF-8, shown as U+FFFD, which is no stop string).
    for seed in range(3, 13):
        kwargs = dict(model="tiny", prompt="q", max_tokens=12, seed=seed, extra_body={"ignore_eos": True})
        text = client.completions.create(**kwargs).choices[0].text
        clean = [i for i in range(2, len(text)) if text[i] != "\ufffd" and text[i] not in text[:i]]
        if clean:
            break
    else:
        pytest.fail(f"ten seeds gave no clean character to stop on (last text {text!r})")
    stop = text[clean[0]]
    cut = client.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].text == text[: clean[0]] and cut.choices[0].finish_reason == "stop"


def test_sigterm_lets_streaming_requests_finish(checkpoint, tmp_path):
    server = Server(checkpoint, tmp_path / "server.log")
    engine_processes = _children(server.process.pid)  # the engine's (and multiprocessing's resource tracker)
    body = {"prompt": "go", "max_tokens": 40, "ignore_eos": True, "stream": True}
    lines, error = [], []

    def stream():
        try:
            with httpx.Client(timeout=120) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if len([x for x in lines if x.startswith("data: ")]) == 2:
                        server.process.send_signal(signal.SIGTERM)
        except Exception as e:  # noqa: BLE001 - recorded for the assertion below
            error.append(e)

    stream()
    assert not error, error
    assert lines[-1] == "" or lines[-1] == "data: [DONE]"
    assert "data: [DONE]" in lines  # the answer was finished, not cut
    finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines if x.startswith("data: {")]
    assert finish[-1] == "length"
    assert server.process.wait(60) in (0, 128 + signal.SIGTERM)
    assert engine_processes, "the server runs its engine in a child process"
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in engine_processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in engine_processes), "the engine process outlived the server"


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_text_stream_waits_for_whole_characters_and_holds_back_stop_prefixes(checkpoint):
    tokenizer = load_tokenizer(checkpoint, needed=True)
    ids = tokenizer.encode("né 世界 stop here").ids
    stream = TextStream(tokenizer, stop=("stop",))
    pieces = [stream.add([t]) for t in ids]
    assert "".join(pieces) + stream.finish() == "né 世界 "
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(ord("s"))] == ""  # "s" may begin "stop": held back
    lone = TextStream(tokenizer)
    assert lone.add([0xE4]) == "" and lone.finish() == "\ufffd"  # an unfinished character at the end
