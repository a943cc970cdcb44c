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

Generation is a :class:`Backend`'s: :class:`~moin_hub.serving.engine_backend.EngineBackend` (the default, above) or
:class:`~moin_hub.serving.vllm_backend.VllmBackend` (``--backend vllm``: the routed experts are loaded into vLLM
servers and the requests forwarded there). The API, routing, ``moin`` object and errors are this app's, the
same for both.

This module is the app (:func:`create_app`, :func:`start_server`); the request models and errors are in
:mod:`moin_hub.serving.openai_api`, the batcher in :mod:`moin_hub.serving.batching` and ``/metrics`` in
:mod:`moin_hub.serving.metrics`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._version import __version__
from ..errors import EmptyQueryError, MoinHubError
from ..hub.config import ExpertRecord
from ..hub.mixing import MODES, Mixture
from .engine import ExpertEngine
from .engine_backend import EngineBackend
from .metrics import ServerMetrics
from .openai_api import (
    AUTO_MODEL,
    BASE_MODEL,
    MODE_MODELS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Route,
    RouteRequest,
    Sampling,
    _text_of,
    api_error,
    expert_entry,
)

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How `moin-hub serve` routes, batches and limits requests.

    Args:
        mode: routing mode of ``moin:auto`` (``top1``, ``topk`` or ``adaptive``).
        k / temperature / mass: mixing settings (see :func:`moin_hub.hub.mixing.mix_weights`).
        threshold: below this best score a routed request gets the base model: the calibrated z-score where
            the expert's row has similarity statistics, else the cosine (None: the registry's calibrated
            ``default_threshold``; without one, never).
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
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}.")
        for name in ("max_batch_size", "max_tokens_limit", "max_prompt_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not (0 <= self.batch_window_ms <= 1000 and math.isfinite(self.batch_window_ms)):
            raise ValueError(f"batch_window_ms must be between 0 and 1000, got {self.batch_window_ms!r}.")
        if not (0 <= self.refresh_seconds and math.isfinite(self.refresh_seconds)):
            raise ValueError(f"refresh_seconds must be a number >= 0, got {self.refresh_seconds!r}.")


# ------------------------------------------------------------------------------------------ backends


class Backend(Protocol):
    """What generates the answers of `moin-hub serve`; the app around it (API, routing, errors) is shared.

    :class:`EngineBackend` generates on moin-hub's own engine;
    :class:`~moin_hub.serving.vllm_backend.VllmBackend` forwards to vLLM servers. Both route with
    ``engine`` (its registry, router and verified pulls): a backend never routes by itself.
    """

    name: str
    engine: ExpertEngine

    async def start(self, config: ServeConfig, metrics: ServerMetrics) -> None:
        """Called when the app starts (before the first request)."""

    async def stop(self) -> None:
        """Called when the app stops."""

    async def completions(self, req: CompletionRequest, prompts: list[str], routes: list[Route], max_tokens: int,
                          stop: tuple[str, ...]) -> Any:
        """The answer to ``/v1/completions`` (a JSON dict, or a streaming response): prompt ``i`` gets the
        mixture and ``moin`` object ``routes[i]``."""

    async def chat(self, req: ChatRequest, messages: list[dict[str, str]], route: Route, max_tokens: int,
                   stop: tuple[str, ...]) -> Any:
        """The answer to ``/v1/chat/completions``."""

    def experts_view(self, records: Sequence[ExpertRecord]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """For ``/v1/experts``: where each of ``records`` is loaded (one dict each), and the cache summary."""

    def health(self) -> dict[str, Any]:
        """Fields added to ``/health``."""

    def metrics_text(self, metrics: ServerMetrics) -> str:
        """The Prometheus text of ``/metrics``."""


# ------------------------------------------------------------------------------------------ the app


def create_app(engine: ExpertEngine, config: ServeConfig | None = None, *, backend: Backend | None = None) -> Any:
    """The FastAPI app of `moin-hub serve` over ``engine``: its registry and router choose each request's
    experts, and ``backend`` generates (default: :class:`EngineBackend`, moin-hub's own engine, whose batcher
    thread starts with the app's lifespan).

    Example:
        >>> import uvicorn  # doctest: +SKIP
        >>> uvicorn.run(create_app(ExpertEngine("acme/moin-registry")), port=8000)  # doctest: +SKIP
    """
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    backend = backend or EngineBackend(engine)
    if backend.engine is not engine:
        raise ValueError("the backend must route with the engine the app serves")
    metrics = ServerMetrics()

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
        await backend.start(config, metrics)
        refresher = asyncio.create_task(follow_registry()) if config.refresh_seconds else None
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
            await backend.stop()

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

    def threshold_of(given: float | None) -> float | None:
        """The threshold a route applies: the one given, else the registry's calibrated default (or None)."""
        return given if given is not None else engine.registry.manifest.default_threshold

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

    def choose(model: str, query: str) -> Route:
        """The mixture a request gets and the ``moin`` object describing it (runs in a worker thread); each
        expert is counted in ``/metrics`` (``base`` for none)."""
        mixture, moin = _choose(model, query)
        for expert in mixture.experts or ("base",):
            metrics.count_expert(expert)
        return mixture, moin

    def _choose(model: str, query: str) -> Route:
        registry = engine.registry
        info: dict[str, Any] = {"registry": registry.registry_id, "registry_revision": registry.revision}
        if model == BASE_MODEL:
            return Mixture((), (), "base"), {**info, "mode": "base", "experts": []}
        if model == AUTO_MODEL or model in MODE_MODELS:
            mode = config.mode if model == AUTO_MODEL else MODE_MODELS[model]
            start = time.perf_counter()
            plan = engine.plan(query, mode=mode, k=config.k, temperature=config.temperature, mass=config.mass,
                               threshold=threshold_of(config.threshold))
            metrics.route_seconds.observe(time.perf_counter() - start)
            sims = {r.expert.expert_id: r for r in plan.route.routes}
            experts = [{**expert_entry(sims[e].expert, w), "similarity": round(sims[e].similarity, 6)}
                       if e in sims else expert_entry(registry.get(e), w)  # the fallback expert: no similarity
                       for e, w in zip(plan.mixture.experts, plan.mixture.weights, strict=True)]
            best = plan.route.best
            shown = "fallback" if plan.mixture.mode == "fallback" else mode
            return plan.mixture, {**info, "mode": shown, "experts": experts, "route_ms": round(plan.route_ms, 3),
                                  "best": {"expert_id": best.expert.expert_id,
                                           "similarity": round(best.similarity, 6)}}
        record = registry.get(model)  # ExpertNotFoundError -> 404 model_not_found
        return Mixture((record.expert_id,), (1.0,), "forced"), {
            **info, "mode": "forced", "experts": [expert_entry(record, 1.0)]}

    def check_length(text: str, what: str) -> str:
        if not text.strip():
            raise EmptyQueryError()
        if len(text) > config.max_prompt_chars:
            raise ApiError(400, f"The {what} is {len(text):,} characters; the limit is {config.max_prompt_chars:,}.",
                           param=what)
        return text

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        max_tokens, stop = check_sampling(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) > config.max_batch_size * 4:
            raise ApiError(400, f"Send 1 to {config.max_batch_size * 4} prompts.", param="prompt")
        for prompt in prompts:
            check_length(prompt, "prompt")
        if req.stream and len(prompts) != 1:
            raise ApiError(400, "stream=true takes one prompt.", param="prompt", code="unsupported")
        routes = [await run_in_threadpool(choose, req.model, prompt) for prompt in prompts]
        return await backend.completions(req, prompts, routes, max_tokens, stop)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        max_tokens, stop = check_sampling(req)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        check_length("".join(m["content"] for m in messages) or " ", "messages")
        user_turns = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        if not user_turns:
            raise ApiError(400, "The chat has no user message with text.", param="messages")
        # MoIN routes the whole query: the last user turn is what the user asks now
        route = await run_in_threadpool(choose, req.model, user_turns[-1])
        return await backend.chat(req, messages, route, max_tokens, stop)

    @app.post("/v1/route")
    async def route(req: RouteRequest) -> Any:
        queries = [req.input] if isinstance(req.input, str) else list(req.input)
        if not queries or len(queries) > 256:
            raise ApiError(400, "Send 1 to 256 inputs.", param="input")
        mode = req.mode or config.mode
        if mode not in MODES:
            raise ApiError(400, f"mode must be one of {', '.join(MODES)}; got {mode!r}.", param="mode")
        threshold = threshold_of(req.threshold if req.threshold is not None else config.threshold)

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
        registry = engine.registry
        fallback = registry.fallback
        records = [*registry.experts, *([fallback] if fallback else [])]
        states, cache = backend.experts_view(records)
        data = [{"id": record.expert_id, "object": "expert", "repo_id": record.repo_id,
                 "revision": record.revision, "keywords": list(record.keywords), "n_docs": record.n_docs,
                 "role": "fallback" if record is fallback else "expert", **state}
                for record, state in zip(records, states, strict=True)]
        return {"object": "list", "registry": registry.registry_id, "registry_revision": registry.revision,
                "base_model": engine.base_model.to_dict(), "backend": backend.name, "data": data, "cache": cache}

    @app.get("/v1/models")
    async def models() -> Any:
        created = int(time.time())
        names = [AUTO_MODEL, *MODE_MODELS, BASE_MODEL, *(r.expert_id for r in engine.registry.experts)]
        return {"object": "list",
                "data": [{"id": n, "object": "model", "created": created, "owned_by": "moin-hub"} for n in names]}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(backend.metrics_text(metrics), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health() -> Any:
        registry = engine.registry
        return {"status": "ok", "registry": registry.registry_id, "registry_revision": registry.revision,
                "experts": len(registry.experts), "backend": backend.name, **backend.health(),
                "version": __version__}

    app.state.engine, app.state.backend, app.state.config, app.state.metrics = engine, backend, config, metrics
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


def start_server(engine: ExpertEngine, config: ServeConfig | None = None, *, backend: Backend | None = None,
                 host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> RunningServer:
    """Serve ``engine`` with uvicorn in a background thread; returns once it accepts connections.

    ``port=0`` picks a free port (see ``RunningServer.url``). For tests, benchmarks and notebooks; the CLI
    runs uvicorn in the foreground.
    """
    import socket

    import uvicorn

    app = create_app(engine, config, backend=backend)
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
