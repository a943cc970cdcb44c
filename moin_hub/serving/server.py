"""`moin-hub serve`: an OpenAI-compatible HTTP server that routes each request to its topic expert.

Endpoints (JSON; errors as OpenAI's ``{"error": {"message", "type", "param", "code"}}``):

- ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's request and response shapes. The
  ``model`` field chooses the expert: ``moin:auto`` routes by the prompt's content with the server's mode,
  ``moin:top1`` / ``moin:topk`` / ``moin:adaptive`` route with that mode, ``moin:base`` uses no expert, and an
  expert id or repo id forces that expert. Each response carries a ``moin`` object: the experts used, their
  weights and similarities, the registry commit. ``stream: true`` answers with server-sent events as OpenAI
  does (stop strings honoured across chunks; a client that leaves stops its generation).
- ``POST /v1/route``: routing only (no generation).
- ``GET /v1/experts``: what is registered and what is loaded (so a front router can send requests where
  their expert already lives); ``GET /v1/models``: the model names above, OpenAI style.
- ``GET /metrics``: Prometheus text (requests, cache hits/misses, loads, evictions, route latency, batch
  sizes, tokens/s); ``GET /health``.

Requests are batched across experts: an :class:`~moin_hub.serving.batching.ExpertBatcher` collects requests
for a few milliseconds and runs those with the same sampling settings as one padded batch on the one base
model, each row with its own expert (PEFT's per-row ``adapter_names``: the base weights are shared, each
LoRA update applies to its rows). Requests for a weighted mixture of several experts batch with requests for
the same mixture.

This module is the app (:func:`create_app`, :func:`start_server`); the request models and errors are in
:mod:`moin_hub.serving.openai_api`, the batcher in :mod:`moin_hub.serving.batching` and ``/metrics`` in
:mod:`moin_hub.serving.metrics`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..errors import EmptyQueryError, MoinHubError
from ..hub.mixing import MODES, Mixture
from .batching import ExpertBatcher, Job
from .engine import ExpertEngine
from .generation import Completion, truncate_at_stop
from .metrics import ServerMetrics, render_metrics
from .openai_api import (
    AUTO_MODEL,
    BASE_MODEL,
    MODE_MODELS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    RouteRequest,
    Sampling,
    _text_of,
    api_error,
    expert_entry,
    held_back,
)

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How `moin-hub serve` routes, batches and limits requests.

    Args:
        mode: routing mode of ``moin:auto`` (``top1``, ``topk`` or ``adaptive``).
        k / temperature / mass: mixing settings (see :func:`moin_hub.hub.mixing.mix_weights`).
        threshold: below this best similarity a routed request gets the base model (None: never).
        max_batch_size: most requests run together in one batch.
        batch_window_ms: how long the batcher waits for more requests before running a batch that is not full
            (right after a batch, also a share of its run time: :func:`~moin_hub.serving.batching.batch_deadline`).
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_prompt_chars: the longest prompt (or chat) accepted, in characters.
        api_key: when set, requests must send ``Authorization: Bearer <api_key>`` (it is never logged).
        refresh_seconds: how often to follow the registry's head, so that newly pushed experts are served
            (0: never; an engine started on a fixed ``revision`` never moves).
    """

    mode: str = "top1"
    k: int = 3
    temperature: float = 0.05
    mass: float = 0.8
    threshold: float | None = None
    max_batch_size: int = 8
    batch_window_ms: float = 5.0
    max_tokens_limit: int = 512
    max_prompt_chars: int = 32_000
    api_key: str | None = field(default=None, repr=False)
    refresh_seconds: float = 60.0

    def __post_init__(self) -> None:
        from ..hub.mixing import mix_weights

        mix_weights([1.0], mode=self.mode, k=self.k, temperature=self.temperature, mass=self.mass)  # validates
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between -1 and 1, got {self.threshold!r}.")
        for name in ("max_batch_size", "max_tokens_limit", "max_prompt_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (0 <= self.batch_window_ms <= 1000 and math.isfinite(self.batch_window_ms)):
            raise ValueError(f"batch_window_ms must be between 0 and 1000, got {self.batch_window_ms!r}.")
        if not (0 <= self.refresh_seconds and math.isfinite(self.refresh_seconds)):
            raise ValueError(f"refresh_seconds must be a number >= 0, got {self.refresh_seconds!r}.")


# ------------------------------------------------------------------------------------------ the app


def create_app(engine: ExpertEngine, config: ServeConfig | None = None) -> Any:
    """The FastAPI app of `moin-hub serve` over ``engine`` (a batcher thread starts with the app's lifespan).

    Example:
        >>> import uvicorn  # doctest: +SKIP
        >>> uvicorn.run(create_app(ExpertEngine("acme/moin-registry")), port=8000)  # doctest: +SKIP
    """
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    metrics = ServerMetrics()
    state: dict[str, ExpertBatcher] = {}

    async def follow_registry() -> None:
        """Follow the registry's head every ``refresh_seconds``; a failed look is logged and retried later."""
        while True:
            await asyncio.sleep(config.refresh_seconds)
            try:
                if await run_in_threadpool(engine.refresh):
                    metrics.count_refresh()
                    logger.info("registry %s moved to %s: %d experts", engine.registry.registry_id,
                                engine.registry.revision[:12], len(engine.registry))
            except Exception as err:  # noqa: BLE001 - serving goes on with the registry it has
                logger.warning("registry refresh failed: %s", str(err).splitlines()[0][:200] if str(err) else err)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):  # noqa: ANN202
        state["batcher"] = ExpertBatcher(engine, max_batch_size=config.max_batch_size,
                                         window_ms=config.batch_window_ms, on_batch=metrics.batch_sizes.observe)
        refresher = asyncio.create_task(follow_registry()) if config.refresh_seconds else None
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
            state.pop("batcher").close()
            engine.close()

    app = FastAPI(title="moin-hub serve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions routed to topic LoRA experts (MoIN).")

    max_body = 4 * config.max_prompt_chars * max(1, config.max_batch_size) + 64 * 1024  # UTF-8, JSON escapes

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        open_paths = ("/health", "/metrics", "/docs", "/openapi.json")
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > max_body:
            metrics.count_request(request.url.path, 413)
            return JSONResponse(ApiError(413, f"The request body is over {max_body:,} bytes.",
                                         code="request_too_large").body(), status_code=413)
        if config.api_key and request.url.path not in open_paths:
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent.encode(), f"Bearer {config.api_key}".encode()):
                response = JSONResponse(ApiError(401, "Missing or wrong API key (Authorization: Bearer ...).",
                                                 code="invalid_api_key").body(), status_code=401)
                metrics.count_request(request.url.path, 401)
                return response
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.count_request(getattr(route, "path", "other"), response.status_code)
        return response

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, err: ApiError) -> Any:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, err: StarletteHTTPException) -> Any:  # unparsable body, 404, 405
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail)[:500], code=code).body(),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, err: RequestValidationError) -> Any:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(ApiError(400, message[:500], param=param).body(), status_code=400)

    async def on_known(_request: Request, err: Exception) -> Any:
        answer = api_error(err)
        return JSONResponse(answer.body(), status_code=answer.status)

    # known errors (answered, counted); anything else is a 500 with the traceback in the server log only
    for kind in (MoinHubError, ValueError, RuntimeError, Exception):
        app.add_exception_handler(kind, on_known)

    def check_sampling(req: Sampling) -> tuple[int, tuple[str, ...]]:
        if req.n != 1:
            raise ApiError(400, "Only n=1 is supported.", param="n", code="unsupported")
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens_limit}.",
                           param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4:
            raise ApiError(400, "At most 4 stop sequences.", param="stop")
        return max_tokens, stop

    def choose(model: str, query: str) -> tuple[Mixture, dict[str, Any]]:
        """The mixture a request gets and the ``moin`` object describing it (runs in a worker thread)."""
        registry = engine.registry
        info: dict[str, Any] = {"registry": registry.registry_id, "registry_revision": registry.revision}
        if model == BASE_MODEL:
            return Mixture((), (), "base"), {**info, "mode": "base", "experts": []}
        if model == AUTO_MODEL or model in MODE_MODELS:
            mode = config.mode if model == AUTO_MODEL else MODE_MODELS[model]
            start = time.perf_counter()
            plan = engine.plan(query, mode=mode, k=config.k, temperature=config.temperature, mass=config.mass,
                               threshold=config.threshold)
            metrics.route_seconds.observe(time.perf_counter() - start)
            sims = {r.expert.expert_id: r for r in plan.route.routes}
            experts = [{**expert_entry(sims[e].expert, w), "similarity": round(sims[e].similarity, 6)}
                       for e, w in zip(plan.mixture.experts, plan.mixture.weights, strict=True)]
            best = plan.route.best
            return plan.mixture, {**info, "mode": mode, "experts": experts, "route_ms": round(plan.route_ms, 3),
                                  "best": {"expert_id": best.expert.expert_id,
                                           "similarity": round(best.similarity, 6)}}
        record = registry.get(model)  # ExpertNotFoundError -> 404 model_not_found
        return Mixture((record.expert_id,), (1.0,), "forced"), {
            **info, "mode": "forced", "experts": [expert_entry(record, 1.0)]}

    def submit(job: Job) -> Future:
        """Count the job's experts and hand it to the batcher."""
        for expert in job.mixture.experts or ("base",):
            metrics.count_expert(expert)
        return state["batcher"].submit(job)

    async def run(mixture: Mixture, prompt_ids: list[int], max_tokens: int, stop: tuple[str, ...],
                  req: Sampling) -> Completion:
        job = Job(mixture, prompt_ids, max_tokens, req.temperature, req.top_p, stop, req.seed)
        return await asyncio.wrap_future(submit(job))

    def check_length(text: str, what: str) -> str:
        if not text.strip():
            raise EmptyQueryError()
        if len(text) > config.max_prompt_chars:
            raise ApiError(400, f"The {what} is {len(text):,} characters; the limit is {config.max_prompt_chars:,}.",
                           param=what)
        return text

    def usage(outputs: Sequence[Completion]) -> dict[str, int]:
        prompt = sum(o.prompt_tokens for o in outputs)
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(kind: str, req: Sampling, mixture: Mixture, moin: dict[str, Any], prompt_ids: list[int],
               max_tokens: int, stops: tuple[str, ...]) -> Any:
        """Server-sent events as OpenAI streams them: chunks of new text, a last chunk with the finish reason,
        then ``[DONE]``. Stop strings are honoured across chunks; a client that goes away stops generation."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def push(token: int | None) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        job = Job(mixture, prompt_ids, max_tokens, req.temperature, req.top_p, (), req.seed, on_token=push,
                  cancel=cancel)
        future = submit(job)
        future.add_done_callback(lambda _: push(None))
        ident, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        tokenizer = engine.tokenizer

        def chunk(text: str, finish: str | None, *, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            body = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "created": created, "model": req.model, "choices": [choice]}
            if first:
                body["moin"] = moin
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> Any:
            new_ids: list[int] = []
            sent, finish = "", None
            try:
                yield chunk("", None, first=True)
                while (token := await tokens.get()) is not None:
                    if token == tokenizer.eos_token_id:
                        continue
                    new_ids.append(token)
                    text, stopped = truncate_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), stops)
                    safe = text if stopped else text[: len(text) - held_back(text, stops)]
                    if len(safe) > len(sent):
                        yield chunk(safe[len(sent):], None)
                        sent = safe
                    if stopped:
                        cancel.set()
                        finish = "stop"
                        break
                if finish is None:
                    try:
                        result = await asyncio.wrap_future(future)
                    except Exception as err:  # noqa: BLE001 - the stream has begun: the error is its last event
                        yield f"data: {json.dumps(api_error(err).body())}\n\n"
                        return
                    final, stopped = truncate_at_stop(result.text, stops)
                    if len(final) > len(sent):
                        yield chunk(final[len(sent):], None)
                    finish = "stop" if stopped else result.finish_reason
                yield chunk("", finish)
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        max_tokens, stop = check_sampling(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) > config.max_batch_size * 4:
            raise ApiError(400, f"Send 1 to {config.max_batch_size * 4} prompts.", param="prompt")
        for prompt in prompts:
            check_length(prompt, "prompt")
        if req.stream:
            if len(prompts) != 1:
                raise ApiError(400, "stream=true takes one prompt.", param="prompt", code="unsupported")
            mixture, moin = await run_in_threadpool(choose, req.model, prompts[0])
            ids = await run_in_threadpool(engine.encode, prompts[0], reserve=max_tokens)
            return stream("completion", req, mixture, moin, ids, max_tokens, stop)
        tasks = []
        routes = []
        for prompt in prompts:
            mixture, moin = await run_in_threadpool(choose, req.model, prompt)
            ids = await run_in_threadpool(engine.encode, prompt, reserve=max_tokens)
            routes.append(moin)
            tasks.append(run(mixture, ids, max_tokens, stop, req))
        outputs = await asyncio.gather(*tasks)
        choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None,
                    "moin": routes[i]} for i, o in enumerate(outputs)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(outputs), "moin": routes[0]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        max_tokens, stop = check_sampling(req)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        check_length("".join(m["content"] for m in messages) or " ", "messages")
        user_turns = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        if not user_turns:
            raise ApiError(400, "The chat has no user message with text.", param="messages")
        # MoIN routes the whole query: the last user turn is what the user asks now
        mixture, moin = await run_in_threadpool(choose, req.model, user_turns[-1])
        ids = await run_in_threadpool(engine.encode_chat, messages, reserve=max_tokens)
        if req.stream:
            return stream("chat", req, mixture, moin, ids, max_tokens, stop)
        output = await run(mixture, ids, max_tokens, stop, req)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                             "finish_reason": output.finish_reason, "logprobs": None}],
                "usage": usage([output]), "moin": moin}

    @app.post("/v1/route")
    async def route(req: RouteRequest) -> Any:
        queries = [req.input] if isinstance(req.input, str) else list(req.input)
        if not queries or len(queries) > 256:
            raise ApiError(400, "Send 1 to 256 inputs.", param="input")
        mode = req.mode or config.mode
        if mode not in MODES:
            raise ApiError(400, f"mode must be one of {', '.join(MODES)}; got {mode!r}.", param="mode")
        threshold = req.threshold if req.threshold is not None else config.threshold

        def plan_all() -> list[dict[str, Any]]:
            out = []
            for query in queries:
                start = time.perf_counter()
                plan = engine.plan(check_length(query, "input"), mode=mode, k=req.k or config.k,
                                   temperature=config.temperature, mass=config.mass, threshold=threshold)
                metrics.route_seconds.observe(time.perf_counter() - start)
                out.append(plan.to_dict())
            return out

        data = await run_in_threadpool(plan_all)
        return {"object": "list", "registry": engine.registry.registry_id,
                "registry_revision": engine.registry.revision, "data": data}

    @app.get("/v1/experts")
    async def experts() -> Any:
        cache = engine.cache_info()
        loaded = {(s["repo_id"], s["revision"]): s for s in cache["loaded"]}
        data = []
        for record in engine.registry.experts:
            slot = loaded.get((record.repo_id, record.revision))
            data.append({"id": record.expert_id, "object": "expert", "repo_id": record.repo_id,
                         "revision": record.revision, "keywords": list(record.keywords), "n_docs": record.n_docs,
                         "loaded": slot is not None, "pinned": bool(slot and slot["pinned"]),
                         "in_use": slot["in_use"] if slot else 0})
        return {"object": "list", "registry": engine.registry.registry_id,
                "registry_revision": engine.registry.revision, "base_model": engine.base_model.to_dict(),
                "data": data, "cache": {k: v for k, v in cache.items() if k != "loaded"}}

    @app.get("/v1/models")
    async def models() -> Any:
        created = int(time.time())
        names = [AUTO_MODEL, *MODE_MODELS, BASE_MODEL, *(r.expert_id for r in engine.registry.experts)]
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "moin-hub"} for n in names]}

    @app.get("/metrics")
    async def prometheus() -> Any:
        batcher = state.get("batcher")
        text = render_metrics(engine, metrics, batcher.pending() if batcher else 0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health() -> Any:
        registry = engine.registry
        return {"status": "ok", "registry": registry.registry_id, "registry_revision": registry.revision,
                "experts": len(registry.experts), "loaded": len(engine.cached_experts()),
                "base_model_loaded": engine._base is not None, "version": __version__}

    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    return app


@dataclass
class RunningServer:
    """A server started by :func:`start_server` in a background thread."""

    url: str
    app: Any
    _server: Any = dataclasses.field(repr=False)
    _thread: threading.Thread = dataclasses.field(repr=False)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(engine: ExpertEngine, config: ServeConfig | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, log_level: str = "warning") -> RunningServer:
    """Serve ``engine`` with uvicorn in a background thread; returns once it accepts connections.

    ``port=0`` picks a free port (see ``RunningServer.url``). For tests, benchmarks and notebooks; the CLI
    runs uvicorn in the foreground.
    """
    import socket

    import uvicorn

    app = create_app(engine, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="moin-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see the log)")
        time.sleep(0.02)
    bound_port = sock.getsockname()[1]
    return RunningServer(f"http://{host}:{bound_port}", app, server, thread)
