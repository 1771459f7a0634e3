"""The FastAPI app: OpenAI-compatible routes over one loaded :class:`Pipeline`.

Handlers only validate, tokenize, queue and format; decoding happens in the pipeline on the
worker thread (:mod:`.worker`). Every check that can fail fast (model name, types, budget,
engine) runs before a request is queued, so a bad request never waits behind good ones.

Streaming (``stream: true``): one SSE chunk per generated token that releases text (tokens
committed together by a speculative round are still sent one by one), then a last chunk with
``finish_reason``, ``usage`` and ``speculative_metrics`` (always), then, when
``stream_options.include_usage`` is set, OpenAI's extra usage-only chunk with empty ``choices``,
then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import GenerationConfig, SamplingConfig, ServeConfig, SpeculationConfig
from ..engines import GenerationResult
from ..errors import ConfigError, SpecBranchError
from ..pipeline import Pipeline
from . import schemas
from .errors import APIError, error_body, error_response, install_error_handlers
from .metrics import MetricsMiddleware, ServerMetrics
from .stream import DONE, TokenTextStream, sse
from .worker import Job, QueueFull, Worker, WorkerClosed

MAX_BODY_BYTES = 16 << 20  # far above any prompt that fits a context; refuses memory-exhausting bodies
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
KNOWN_PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


def default_model_id(target: str) -> str:
    """The id under which the target is served: its registry name, folder name or GGUF file stem."""
    p = Path(target)
    if p.suffix == ".gguf":
        return p.stem
    return p.name if ("/" in target or p.exists()) else target


class GuardMiddleware:
    """API key (Bearer, on every path but /health) and request-size limit, answered before routing."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            err = None
            if self.expected and scope["path"] != "/health":
                if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                    err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
            length = headers.get(b"content-length", b"")
            if err is None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                err = APIError(413, f"request body of {int(length)} bytes exceeds {MAX_BODY_BYTES} bytes",
                               code="request_too_large")
            if err is not None:
                extra = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
                await error_response(err, headers=extra)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Service:
    """Turns validated requests into queued generations and generations into OpenAI bodies."""

    def __init__(self, pipeline: Pipeline, cfg: ServeConfig, spec: SpeculationConfig) -> None:
        self.pipeline, self.cfg, self.spec = pipeline, cfg, spec
        self.model = cfg.model_name or default_model_id(pipeline.cfg.target)
        self.default_engine = cfg.default_engine(pipeline.draft is not None)
        self.worker = Worker(pipeline, cfg.max_queue)
        self.metrics = ServerMetrics(KNOWN_PATHS)
        self.metrics.track_queue(lambda: self.worker.waiting, lambda: self.worker.running)

    # ------------------------------------------------------------ checks (before queueing)

    def check_model(self, name: str) -> None:
        if name not in (self.model, self.pipeline.cfg.target):
            raise APIError(404, f"model {name!r} does not exist on this server; it serves {self.model!r}",
                           param="model", code="model_not_found")

    def completion_ids(self, req: schemas.CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: send a string, not a list of several prompts",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.pipeline.tokenizer.encode(prompt)
        else:
            vocab = self.pipeline.tokenizer.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: send some text", param="prompt")
        return ids

    def chat_ids(self, req: schemas.ChatRequest) -> list[int]:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = self.pipeline.tokenizer.encode(self.pipeline.tokenizer.apply_chat_template(messages))
        if not ids:
            raise APIError(400, "the chat template rendered an empty prompt", param="messages")
        return ids

    def budget(self, requested: int | None, prompt_tokens: int, param: str) -> int:
        """max_new_tokens for this request: OpenAI's max_tokens, checked against limit and context."""
        room = self.pipeline.room(prompt_tokens)
        max_len = self.pipeline.cfg.max_len
        if room < 1:
            raise APIError(413, f"the prompt is {prompt_tokens} tokens; this server's context of {max_len} tokens "
                                f"holds at most {self.pipeline.room(0) - 1} prompt tokens: shorten the prompt "
                                "(or restart the server with a larger --max-len)",
                           param=param, code="context_length_exceeded")
        if requested is None:
            return min(self.cfg.default_max_tokens, self.cfg.max_tokens_limit, room)
        if requested < 1:
            raise APIError(400, f"max_tokens must be >= 1 (got {requested})", param="max_tokens", code="invalid_value")
        if requested > self.cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens ({requested}) exceeds this server's limit of {self.cfg.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")
        if requested > room:
            raise APIError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({requested}) exceed the context of "
                                f"{max_len} tokens: ask for at most {room} tokens",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def configs(self, req: schemas.GenerationRequest, max_new_tokens: int
                ) -> tuple[GenerationConfig, SamplingConfig, SpeculationConfig]:
        unsupported = req.unsupported()
        if unsupported:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported_parameter")
        sp = req.speculative or schemas.Speculative()
        try:
            gen = GenerationConfig(max_new_tokens=max_new_tokens, stop=req.stops(), chat_template=False,
                                   engine=sp.engine or self.default_engine)
        except ConfigError as e:
            raise APIError(400, str(e), param="speculative.engine" if "engine" in str(e) else "stop") from None
        if gen.engine != "ar" and self.pipeline.draft is None:
            raise APIError(400, f"engine {gen.engine!r} needs a draft model, and this server has none loaded: "
                                "use engine 'ar' or restart the server with --draft", param="speculative.engine")
        over = {k: v for k, v in (("gamma", sp.num_draft_tokens), ("branches", sp.branches), ("tau", sp.tau),
                                  ("draft_sampling", sp.draft_sampling)) if v is not None}
        try:
            spec = dataclasses.replace(self.spec, **over)
        except ConfigError as e:
            raise APIError(400, f"invalid 'speculative' settings: {e} (gamma is num_draft_tokens)",
                           param="speculative") from None
        # OpenAI defaults: temperature 1, top_p 1; without a seed every request samples afresh.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        sampling = SamplingConfig(temperature=1.0 if req.temperature is None else req.temperature,
                                  top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=seed)
        return gen, sampling, spec

    # ------------------------------------------------------------ running

    def submit(self, job: Job, endpoint: str) -> None:
        job.future.add_done_callback(lambda f: self._record(endpoint, job, f))
        try:
            self.worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {self.worker.waiting} requests are already waiting for the "
                                f"engine (--max-queue {self.cfg.max_queue}); retry later",
                           type="rate_limit_error", code="queue_full") from None
        except WorkerClosed:
            raise APIError(503, "the server is shutting down", type="server_error") from None

    def _record(self, endpoint: str, job: Job, fut) -> None:
        # Runs on the worker thread when a job ends; prometheus_client is thread-safe.
        if not fut.cancelled() and fut.exception() is None:
            self.metrics.observe(endpoint, job.gen.engine, fut.result(), job.submitted_at, job.started_at,
                                 job.first_token_at)

    async def wait(self, request: Request, job: Job) -> GenerationResult | None:
        """The job's result, or None if the client went away (the job is then cancelled)."""
        fut = asyncio.wrap_future(job.future)
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
                if not fut.done() and await request.is_disconnected():
                    job.cancel()
                    return None
        except asyncio.CancelledError:
            job.cancel()
            raise
        if job.future.cancelled():
            raise APIError(503, "the server is shutting down", type="server_error")
        return job.future.result()  # re-raises a generation error (SpecBranchError -> 400)

    async def run(self, request: Request, req: schemas.GenerationRequest, ids: list[int], chat: bool) -> Response:
        endpoint = request.url.path
        requested = req.max_tokens
        if chat and getattr(req, "max_completion_tokens", None) is not None:
            requested = req.max_completion_tokens  # type: ignore[attr-defined]
        max_new = self.budget(requested, len(ids), "messages" if chat else "prompt")
        gen, sampling, spec = self.configs(req, max_new)
        job = Job(ids, gen, sampling, spec)
        rid = schemas.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[list[int] | None] = asyncio.Queue()
            job.on_tokens = lambda tokens: _post(loop, events, tokens)
            job.future.add_done_callback(lambda _: _post(loop, events, None))  # None = the job has ended
            self.submit(job, endpoint)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.stream(job, events, rid, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.submit(job, endpoint)
        result = await self.wait(request, job)
        if result is None:  # nobody is listening; 499 = client closed request (counted in /metrics)
            return JSONResponse(error_body("client closed the request"), status_code=499)
        body = schemas.chat_body if chat else schemas.completion_body
        return JSONResponse(body(rid, self.model, gen.engine, result))

    async def stream(self, job: Job, events: asyncio.Queue, rid: str, chat: bool,
                     include_usage: bool) -> AsyncIterator[str]:
        model, engine = self.model, job.gen.engine

        def chunk(piece: str, finish: str | None = None) -> dict:
            if chat:
                return schemas.chat_chunk(rid, model, {"content": piece} if piece or not finish else {}, finish)
            return schemas.completion_chunk(rid, model, piece, finish)

        text = TokenTextStream(self.pipeline.tokenizer.decode, job.gen.stop)
        try:
            if chat:
                yield sse(schemas.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            while (tokens := await events.get()) is not None:
                for token in tokens:  # one chunk per token, even when a round committed several
                    piece = text.push(token)
                    if piece:
                        yield sse(chunk(piece))
            fut = job.future
            if fut.cancelled() or fut.exception() is not None:
                exc = None if fut.cancelled() else fut.exception()
                msg = "the server is shutting down" if exc is None else str(exc)
                kind = "invalid_request_error" if isinstance(exc, SpecBranchError) else "server_error"
                yield sse(error_body(msg, kind))
                yield DONE
                return
            result: GenerationResult = fut.result()
            tail = text.finish(result.text)
            if tail:
                yield sse(chunk(tail))
            last = chunk("", result.finish_reason)
            last["usage"] = schemas.usage(result)
            last["speculative_metrics"] = schemas.speculative_metrics(engine, result)
            yield sse(last)
            if include_usage:
                yield sse(schemas.usage_chunk(rid, model, last["object"], result))
            yield DONE
        finally:
            # Reached early when the client disconnects (the response task is cancelled): stop the
            # generation within one round instead of decoding for nobody. A no-op once it is done.
            job.cancel()


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item: list[int] | None) -> None:
    """Hand an item from the worker thread to a stream on the event loop (asyncio queues are not
    thread-safe). After shutdown the loop is closed and nobody is listening: drop it."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, item)
    except RuntimeError:
        pass


def create_app(pipeline: Pipeline, cfg: ServeConfig | None = None, spec: SpeculationConfig | None = None) -> FastAPI:
    """The server app for a loaded pipeline; ``spec`` gives the speculation defaults of requests."""
    svc = Service(pipeline, cfg or ServeConfig(), spec or SpeculationConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.worker.start()
        yield
        svc.worker.close()

    app = FastAPI(title="specbranch", description="OpenAI-compatible lossless speculative decoding", lifespan=lifespan)
    app.state.service = svc
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=svc.cfg.api_key)
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)  # outermost: also counts 401/413

    def model_card() -> dict:
        return {"id": svc.model, "object": "model", "created": 0, "owned_by": "specbranch"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": svc.model, "waiting": svc.worker.waiting, "running": svc.worker.running}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        svc.check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        svc.check_model(body.model)
        return await svc.run(request, body, svc.completion_ids(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatRequest, request: Request) -> Response:
        svc.check_model(body.model)
        return await svc.run(request, body, svc.chat_ids(body), chat=True)

    return app


def build_server(pipeline: Pipeline, cfg: ServeConfig, spec: SpeculationConfig | None = None) -> uvicorn.Server:
    """A uvicorn server for the app; ``.run()`` blocks (``.run(sockets=[...])`` on a bound socket)."""
    app = create_app(pipeline, cfg, spec)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
