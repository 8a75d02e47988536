"""``quarkmoe serve``: an OpenAI-compatible HTTP server on the engine (FastAPI on uvicorn, the ``serve`` extra).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events ending with ``data: [DONE]``), ``GET /health``, ``GET /metrics`` (Prometheus text).

The engine runs in a process of its own under ``quarkmoe serve`` (or on a thread of this one for an engine
built here: :class:`~quarkmoe_jax.serving.async_engine.AsyncEngine`); handlers only check a request, queue it
and turn its tokens into text (:class:`~quarkmoe_jax.serving.text.TextStream`). A
client that disconnects has its request aborted at once (its cache blocks freed). uvicorn's graceful shutdown
(SIGTERM / SIGINT) stops accepting connections and lets the running requests finish, so no answer is cut
off half-written (``--shutdown-timeout`` bounds the wait).

A completion request may carry several prompts (a list of strings or of token-id lists) and any request ``n``
choices per prompt (at most ``MAX_CHOICES`` in all): each choice is its own engine request, so they batch with
everyone else's; choice ``i * n + j`` is prompt ``i``'s ``j``-th, sampled with ``seed + j`` when a seed is given.

A bad request is a 400 (an unknown model a 404, as OpenAI and vLLM answer) with an OpenAI-style JSON error
``{"error": {"message", "type", "param", "code"}}`` naming the field; the server keeps serving the others.
"""

import asyncio
import dataclasses
import json
import math
import sys
import time
import uuid
from collections.abc import AsyncIterator

from quarkmoe_jax.errors import InputError
from quarkmoe_jax.serving.async_engine import AsyncEngine, EngineFailure, EngineUnavailable
from quarkmoe_jax.serving.engine import Engine
from quarkmoe_jax.serving.params import MAX_LOGPROBS, SamplingParams
from quarkmoe_jax.serving.text import TextStream

__all__ = ["ServerSettings", "create_app", "ApiError", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20
"""The largest request body read (1 MiB): prompts beyond it are far longer than any context served here."""
MAX_CHOICES = 64
"""The most answers one request may ask for (prompts x ``n``)."""
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
DISCONNECT_POLL_S = 0.1
GIL_SWITCH_INTERVAL_S = 2e-4
"""The interpreter's thread switch interval while the app runs (Python's default is 5 ms): the engine's thread
(or, with the engine in its own process, the thread reading its pipe), back from a step, waits for the GIL while
the event loop streams the last step's tokens; a shorter interval hands it over sooner
(`benchmarks/server_capacity.py --step-ms 5 --engine thread` on a 2-core CPU, with the eighteenth session's other
streaming changes: 0.65 -> 0.69-0.73 of the engine alone's tokens/s for 200 streams, TPOT p50 11 -> 7.2 ms;
docs/performance.md, "Serving"). Restored when the app stops."""


class ApiError(Exception):
    """An OpenAI-style error response: ``status``, ``message``, the request ``param`` it names, ``type``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Choice:
    """One answer of a request being generated: its ``index`` in the response, the engine request, its
    :meth:`Api.tokens` generator and its :class:`LogprobsWriter` (None: no logprobs asked)."""

    index: int
    request_id: str
    pieces: AsyncIterator
    logprobs: "LogprobsWriter | None"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What the server answers with: the model's name in the API, and the request caps."""

    model_name: str
    max_body_bytes: int = MAX_BODY_BYTES


# ---------------------------------------------------------------------------------------------- request fields


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _typed(body: dict, name: str, kinds, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise ApiError(f"{name} must be {what}, got {json.dumps(value)}", name)
    if not isinstance(value, kinds):
        raise ApiError(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open=False) -> float:
    value = float(_typed(body, name, (int, float), default, "a number"))
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(f"{name} must be in {bounds}, got {value!r}", name)
    return value


def _int(body: dict, name: str, default, low: int, high: int):
    value = _typed(body, name, (int,), default, "an integer")
    if value is not None and not low <= value <= high:
        raise ApiError(f"{name} must be an integer in [{low}, {high}], got {value}", name)
    return value


class Api:
    """The request handling shared by the routes (one per app)."""

    def __init__(self, engine: AsyncEngine, tokenizer, chat_template, special: dict, settings: ServerSettings, metrics):
        self.engine, self.tokenizer, self.settings, self.metrics = engine, tokenizer, settings, metrics
        self.context = engine.info.context_length
        self.vocab = engine.info.vocab_size
        self._template = None
        if chat_template is not None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            # transformers' settings for chat templates (apply_chat_template)
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = raise_exception
            template = chat_template.get("default") if isinstance(chat_template, dict) else chat_template
            self._template = None if template is None else env.from_string(template)
        self._special = special

    # ------------------------------------------------------------------------------------------- prompts

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """``prompt``: a string, a list of token ids, or a list of either (one choice each, as vLLM takes)."""
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
            prompts, names = [prompt], ["prompt"]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > MAX_CHOICES:
                raise ApiError(f"prompt: at most {MAX_CHOICES} prompts in one request, got {len(prompt)}", "prompt")
            prompts, names = prompt, [f"prompt[{i}]" for i in range(len(prompt))]
        else:
            raise ApiError(
                "prompt must be a string, a list of token ids, or a list of those, got " + json.dumps(prompt)[:80],
                "prompt",
            )
        return [self._prompt_ids(p, name) for p, name in zip(prompts, names, strict=True)]

    def _prompt_ids(self, prompt, name: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids
        elif prompt and all(_is_id(t) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {self.vocab})", "prompt")
        else:
            raise ApiError(f"{name} must be a string or a non-empty list of token ids", "prompt")
        return self._check_prompt(ids, "prompt", name)

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
        plain = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(f"messages[{i}] must be an object with a string role", "messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
                ):
                    raise ApiError(f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(f"messages[{i}].content must be a string or a list of text parts", "messages")
            plain.append({**m, "content": content})
        if self._template is None:
            raise ApiError(
                "this model has no chat template (tokenizer_config.json has no chat_template): use /v1/completions",
                "messages",
            )
        from jinja2.exceptions import TemplateError

        try:
            text = self._template.render(messages=plain, add_generation_prompt=True, **self._special)
        except TemplateError as e:
            raise ApiError(f"messages: the chat template refused them: {e}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._check_prompt(ids, "messages")

    def _check_prompt(self, ids: list[int], field: str, name: str | None = None) -> list[int]:
        name = name or field
        if not ids:
            raise ApiError(f"{name}: the prompt has no tokens", field)
        if len(ids) >= self.context:
            raise ApiError(
                f"{name}: the prompt has {len(ids)} tokens; this model's context is {self.context} (prompt + "
                "max_tokens)",
                field,
            )
        return ids

    def choices(
        self, body: dict, prompts: list[list[int]], chat: bool
    ) -> list[tuple[list[int], SamplingParams, tuple]]:
        """``(prompt ids, SamplingParams, stop strings)`` of each choice: ``n`` per prompt, in the response's
        order (prompt ``i``'s choice ``j`` has index ``i * n + j``). With a ``seed``, choice ``j`` samples with
        ``seed + j``, so the ``n`` choices differ and each is reproducible."""
        n = _int(body, "n", 1, 1, MAX_CHOICES)
        if n * len(prompts) > MAX_CHOICES:
            raise ApiError(f"n = {n} for {len(prompts)} prompts is more than {MAX_CHOICES} choices", "n")
        out = []
        for ids in prompts:
            params, stop = self.sampling(body, len(ids), None if chat else 16, chat)
            for j in range(n):
                seeded = params if params.seed is None else dataclasses.replace(params, seed=(params.seed + j) % 2**63)
                out.append((ids, seeded, stop))
        return out

    # ------------------------------------------------------------------------------------------ sampling

    def logprobs(self, body: dict, chat: bool) -> int | None:
        """How many top tokens each new token's logprobs carry (None: no logprobs): completions' ``logprobs``
        (an integer), chat's ``logprobs`` (a boolean) with ``top_logprobs``."""
        if not chat:
            return _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        wanted = _typed(body, "logprobs", (bool,), False, "a boolean")
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not wanted:
            raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if wanted else None

    def sampling(
        self, body: dict, prompt_len: int, default_max_tokens: int | None, chat: bool = False
    ) -> tuple[SamplingParams, tuple]:
        logprobs = self.logprobs(body, chat)
        if body.get("best_of") not in (None, 1) or body.get("echo") not in (None, False):
            raise ApiError(
                "best_of and echo are not supported", "best_of" if body.get("best_of") not in (None, 1) else "echo"
            )
        room = self.context - prompt_len
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, name, default_max_tokens if default_max_tokens is not None else room, 1, 2**31)
        if max_tokens > room:
            raise ApiError(
                f"{name} = {max_tokens} with a prompt of {prompt_len} tokens exceeds this model's context of "
                f"{self.context} (at most {room})",
                name,
            )
        temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        top_k = _int(body, "top_k", 0, -1, self.vocab)
        seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is None:
            stop = []
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop)
        ):
            raise ApiError(
                f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_LENGTH} characters",
                "stop",
            )
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and (
            not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)
        ):
            raise ApiError("stop_token_ids must be a list of token ids", "stop_token_ids")
        ignore_eos = _typed(body, "ignore_eos", (bool,), False, "a boolean")
        eos = list(self.engine.info.eos_token_ids)
        stop_token_ids = list(stop_ids or []) + ([] if ignore_eos else eos)
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=max(top_k, 0),
                seed=None if seed is None else seed % 2**63,
                stop_token_ids=tuple(stop_token_ids),
                logprobs=logprobs,
            )
        except InputError as e:
            raise ApiError(str(e), _api_field(e)) from None
        return params, tuple(stop)

    # ---------------------------------------------------------------------------------------- generation

    async def submit(self, ids: list[int], params: SamplingParams):
        try:
            return await self.engine.add(ids, params)
        except InputError as e:
            raise ApiError(str(e), _api_field(e)) from None
        except EngineUnavailable as e:
            raise ApiError(f"the engine is not running: {e}", None, 503, "server_error") from None

    async def tokens(self, request_id: str, outputs: asyncio.Queue, stream: TextStream, params, arrival: float):
        """Yields ``(text piece, finish_reason or None, completion tokens, TokenLogprobs since the last yield)``
        until the request ends. Outputs that queued up while the client's last piece was being sent are taken
        together (one piece for several tokens: under load the server sends fewer, larger chunks, as vLLM's
        output collector merges them)."""
        count, first = 0, None
        finished = False
        records = []
        try:
            while True:
                items = [await outputs.get()]
                while not outputs.empty():
                    items.append(outputs.get_nowait())
                failure = next((item for item in items if isinstance(item, EngineFailure)), None)
                if failure is not None:
                    raise ApiError(failure.message, None, 500, "server_error")
                now = time.monotonic()
                if first is None:
                    first = now
                    self.metrics.ttft.observe(now - arrival)
                new_ids = [token for item in items for token in item.new_token_ids]
                count += len(new_ids)
                for item in items:
                    records += item.logprobs or ()
                piece = stream.add(new_ids)
                if stream.stopped:
                    finished = True
                    self.engine.abort(request_id)
                    yield piece, "stop", count, records
                    return
                if items[-1].finished:
                    finished = True
                    if count > 1:
                        self.metrics.tpot.observe((now - first) / (count - 1))
                    reason = "stop" if new_ids[-1] in params.stop_token_ids else "length"
                    yield piece + stream.finish(), reason, count, records
                    return
                if piece:
                    yield piece, None, count, records
                    records = []
        finally:
            if not finished:
                self.engine.abort(request_id)


LOGPROB_FLOOR = -9999.0
"""A logprob below this (-inf when a probability underflows float32) is sent as this: JSON has no -inf (vLLM's
choice)."""


class LogprobsWriter:
    """Turns a request's :class:`~quarkmoe_jax.serving.engine.TokenLogprobs` into the OpenAI response field:
    chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}`` or completions' ``{tokens, token_logprobs,
    top_logprobs, text_offset}``. A token's text is the tokenizer's decoding of it alone (a piece of a multi-byte
    character decodes to U+FFFD; chat's ``bytes`` are that text's UTF-8, as vLLM sends)."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def field(self, records) -> dict:
        if self.chat:
            content = []
            for r in records:
                top = [self._chat_entry(t, lp) for t, lp in r.top]
                content.append({**self._chat_entry(r.token_id, r.logprob), "top_logprobs": top})
            return {"content": content, "refusal": None}
        tokens = [self._text(r.token_id) for r in records]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [max(r.logprob, LOGPROB_FLOOR) for r in records],
            "top_logprobs": [self._top_dict(r.top) for r in records],
            "text_offset": offsets,
        }

    def _top_dict(self, top) -> dict:
        """``{text: logprob}``; tokens with the same text (pieces of characters all read U+FFFD) keep the best."""
        out = {}
        for token_id, logprob in top:
            out.setdefault(self._text(token_id), max(logprob, LOGPROB_FLOOR))
        return out

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": max(logprob, LOGPROB_FLOOR), "bytes": list(text.encode())}


ENGINE_TO_API_FIELD = {"max_new_tokens": "max_tokens", "prompt_ids": "prompt"}
"""The request field of an engine refusal's :attr:`~quarkmoe_jax.errors.InputError.field` where the names differ."""


def _api_field(error: InputError) -> str | None:
    return ENGINE_TO_API_FIELD.get(error.field, error.field)


class Metrics:
    """The Prometheus metrics of one app (its own registry)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self._engine = engine
        self.running = Gauge("quarkmoe_requests_running", "Requests in the running batch", registry=self.registry)
        self.waiting = Gauge("quarkmoe_requests_waiting", "Requests waiting to be scheduled", registry=self.registry)
        self.kv_usage = Gauge(
            "quarkmoe_kv_cache_usage", "Share of KV-cache blocks in use (0-1)", registry=self.registry
        )
        self.tokens_per_s = Gauge(
            "quarkmoe_generation_tokens_per_second", "Generated tokens/s over the last 10 s", registry=self.registry
        )
        self.prompt_tokens = Gauge("quarkmoe_prompt_tokens_total", "Prompt tokens accepted", registry=self.registry)
        self.generation_tokens = Gauge("quarkmoe_generation_tokens_total", "Tokens generated", registry=self.registry)
        self.requests = Counter("quarkmoe_requests", "Requests answered, by status", ["status"], registry=self.registry)
        buckets = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
        self.ttft = Histogram("quarkmoe_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=self.registry)
        self.tpot = Histogram(
            "quarkmoe_time_per_output_token_seconds", "TPOT", buckets=buckets[:-4], registry=self.registry
        )
        self.info = Gauge("quarkmoe_model_info", "The served model", list(labels), registry=self.registry)
        self.info.labels(**labels).set(1)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        state = self._engine.state
        self.running.set(state.running)
        self.waiting.set(state.waiting)
        self.kv_usage.set(state.kv_cache_usage)
        self.tokens_per_s.set(state.generation_tokens_per_s)
        self.prompt_tokens.set(state.prompt_tokens)
        self.generation_tokens.set(state.generation_tokens)
        return generate_latest(self.registry)


def create_app(engine: Engine | AsyncEngine, tokenizer, tokenizer_config, settings: ServerSettings):
    """The FastAPI app serving ``engine``: an :class:`Engine` (run on a thread of this process) or an
    :class:`AsyncEngine` not yet started (``AsyncEngine.spawn``: the engine in its own process, as ``quarkmoe
    serve`` runs it); started and stopped with the app's lifespan."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    async_engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    metrics = Metrics(async_engine, settings.model_name)
    special = {
        "bos_token": (tokenizer_config.bos_token if tokenizer_config else None) or "",
        "eos_token": (tokenizer_config.eos_token if tokenizer_config else None) or "",
    }
    template = tokenizer_config.chat_template if tokenizer_config else None
    api = Api(async_engine, tokenizer, template, special, settings, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()
            sys.setswitchinterval(switch_interval)

    app = FastAPI(title="quarkmoe-jax", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        metrics.requests.labels(status=str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    async def read_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(f"the request body has {declared} bytes, more than {settings.max_body_bytes}", None, 413)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > settings.max_body_bytes:
                raise ApiError(f"the request body exceeds {settings.max_body_bytes} bytes", None, 413)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != settings.model_name:
            raise ApiError(
                f"The model `{model}` does not exist (this server serves `{settings.model_name}`)",
                "model",
                404,
                "NotFoundError",
            )
        if not isinstance(body.get("stream", False), bool):
            raise ApiError("stream must be a boolean", "stream")
        return body

    @app.get("/health")
    async def health():
        alive = async_engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "quarkmoe-jax"}
        return {"object": "list", "data": [{**card, "max_model_len": api.context}]}

    async def run(request: Request, chat: bool):
        arrival = time.monotonic()
        body = await read_body(request)
        prompts = [api.chat_prompt(body)] if chat else api.completion_prompts(body)
        choices = api.choices(body, prompts, chat)
        submitted: list[Choice] = []
        try:
            for index, (ids, params, stop) in enumerate(choices):
                request_id, outputs = await api.submit(ids, params)
                pieces = api.tokens(request_id, outputs, TextStream(tokenizer, stop), params, arrival)
                writer = None if params.logprobs is None else LogprobsWriter(tokenizer, chat)
                submitted.append(Choice(index, request_id, pieces, writer))
        except BaseException:
            for choice in submitted:
                async_engine.abort(choice.request_id)
            raise
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": response_id, "created": int(time.time()), "model": settings.model_name}
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.get("stream", False):
            events = _events(submitted, head, chat, prompt_tokens, body)
            return StreamingResponse(events, media_type="text/event-stream")
        return await _whole(request, submitted, head, chat, prompt_tokens)

    async def _whole(request, submitted, head, chat, prompt_tokens):
        async def collect(choice):
            text, reason, count, records = [], None, 0, []
            async for piece, finish, counted, new_records in choice.pieces:
                text.append(piece)
                records += new_records
                reason, count = finish, counted
            return "".join(text), reason, count, records

        tasks = [asyncio.ensure_future(collect(choice)) for choice in submitted]
        gathered = asyncio.gather(*tasks)
        while not gathered.done():
            await asyncio.wait([gathered], timeout=DISCONNECT_POLL_S)
            if not gathered.done() and await request.is_disconnected():
                gathered.cancel()
                for choice in submitted:
                    async_engine.abort(choice.request_id)
                with contextlib.suppress(asyncio.CancelledError, ApiError):
                    await gathered
                metrics.requests.labels(status="disconnected").inc()
                return Response(status_code=499)
        answers, completion_tokens = [], 0
        for choice, (text, reason, count, records) in zip(submitted, gathered.result(), strict=True):
            completion_tokens += count
            field = None if choice.logprobs is None else choice.logprobs.field(records)
            if chat:
                message = {"role": "assistant", "content": text}
                answers.append({"index": choice.index, "message": message, "logprobs": field, "finish_reason": reason})
            else:
                answers.append({"index": choice.index, "text": text, "logprobs": field, "finish_reason": reason})
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        metrics.requests.labels(status="200").inc()
        kind = "chat.completion" if chat else "text_completion"
        return {**head, "object": kind, "choices": answers, "usage": usage}

    async def _events(submitted, head, chat, prompt_tokens, body) -> AsyncIterator[bytes]:
        """The choices' chunks as they come (each names its choice's index), then usage if asked, then
        ``[DONE]``; a client that goes away cancels every choice (their requests are aborted)."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")

        def event(choice, usage=None) -> bytes:
            chunk = {**head, "object": kind, "choices": [choice] if choice else []}
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        tasks = []

        async def arrivals():
            """``(choice, item)`` as the choices' pieces come: an item, an ApiError, or None when one ended."""
            if len(submitted) == 1:  # one choice (most requests): read it directly, no task and queue in between
                (choice,) = submitted
                try:
                    async for item in choice.pieces:
                        yield choice, item
                except ApiError as e:
                    yield choice, e
                yield choice, None
                return
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(choice):
                try:
                    async for item in choice.pieces:
                        await merged.put((choice, item))
                except ApiError as e:
                    await merged.put((choice, e))
                finally:
                    await merged.put((choice, None))

            tasks.extend(asyncio.ensure_future(pump(choice)) for choice in submitted)
            running = len(submitted)
            while running:
                arrival = await merged.get()
                running -= arrival[1] is None
                yield arrival

        counts = {choice.index: 0 for choice in submitted}
        try:
            if chat:
                for choice in submitted:
                    yield event(
                        {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    )
            async for choice, item in arrivals():
                if item is None:
                    continue
                if isinstance(item, ApiError):
                    yield f"data: {json.dumps(item.body())}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
                piece, reason, counted, records = item
                counts[choice.index] = counted
                field = None if choice.logprobs is None else choice.logprobs.field(records)
                if chat:
                    delta = {"content": piece} if piece else {}
                    yield event({"index": choice.index, "delta": delta, "logprobs": field, "finish_reason": reason})
                else:
                    yield event({"index": choice.index, "text": piece, "logprobs": field, "finish_reason": reason})
            if include_usage:
                completion_tokens = sum(counts.values())
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield event(None, usage)
            yield b"data: [DONE]\n\n"
            metrics.requests.labels(status="200").inc()
        finally:  # also when the client went away: the choices' generators abort their requests
            for task in tasks:
                task.cancel()
            for choice in submitted:
                async_engine.abort(choice.request_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    app.state.async_engine = async_engine
    return app
