"""`moin-hub serve --backend vllm`: route by content here, generate on vLLM servers.

The app is `moin-hub serve`'s (:func:`~moin_hub.serving.server.create_app`: the same OpenAI API, ``moin``
object, routing modes, ``/v1/route``, ``/v1/experts``, ``/metrics``, ``/health`` and errors); only the
generation is elsewhere. :class:`VllmBackend`:

1. routes with the engine (:meth:`~moin_hub.serving.engine.ExpertEngine.plan`; the engine never loads its base
   model here: only the embedder);
2. pulls the chosen expert through the verified path (:meth:`~moin_hub.serving.engine.ExpertEngine.download`:
   the registry's pinned commit, sha256 of every file, safetensors only, the registry's base model);
3. loads it ONCE into an upstream with vLLM's runtime LoRA API (``POST /v1/load_lora_adapter``; the upstream
   runs with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) under the name
   :func:`lora_name`, and forwards the request with ``"model": <that name>`` (``moin:base``: the upstream's
   base model); streams pass through as server-sent events. A ``topk``/``adaptive`` mixture is merged once into
   one adapter folder (:func:`~moin_hub.serving.mixture_adapter.materialize_mixture`) and served like an expert.

Several upstreams, adapter affinity, capacity and unloads are :mod:`moin_hub.serving.upstreams`'s
(:class:`~moin_hub.serving.upstreams.UpstreamPool`): this module turns OpenAI requests into upstream requests
and back.

The upstream reads the adapter from the folder moin-hub pulled it to (its HF cache): it must see the same
file system (the same machine, or a shared volume).

Failures of an upstream become OpenAI errors: unreachable 503, timed out 504, an error answer 502; an answer
that blames the request (4xx) is the client's 400.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from ..errors import UpstreamError
from ..hub.config import ExpertRecord
from ..hub.mixing import Mixture
from ..hub.registry import Registry
from .engine import EngineStats, ExpertEngine
from .metrics import ServerMetrics, _label, render_metrics
from .mixture_adapter import WEIGHT_DECIMALS, materialize_mixture, mixture_name
from .openai_api import ApiError, ChatRequest, CompletionRequest, Route, Sampling, api_error
from .server import ServeConfig
from .upstreams import (
    LORA_PREFIX,
    VLLM_DEFAULT_MAX_LORAS,
    Lease,
    Upstream,
    UpstreamPool,
    VllmConfig,
    normalize_upstream_url,
    pick_upstream,
    upstream_message,
)

__all__ = ["VLLM_DEFAULT_MAX_LORAS", "VllmBackend", "VllmConfig", "lora_name", "normalize_upstream_url",
           "pick_upstream"]

logger = logging.getLogger(__name__)

def lora_name(record: ExpertRecord) -> str:
    """The name of an expert's adapter on an upstream: ``moin:<expert_id>@<first 12 of its commit>``.

    One name per pinned commit: an expert pushed again is loaded as a new adapter.

    Example:
        >>> from types import SimpleNamespace
        >>> lora_name(SimpleNamespace(expert_id="cooking", revision="0123456789abcdef0123"))
        'moin:cooking@0123456789ab'
    """
    return f"{LORA_PREFIX}{record.expert_id}@{record.revision[:12]}"


class _StaleAdapter(Exception):
    """The upstream no longer knows an adapter moin-hub loaded there (it restarted): load it again."""


class VllmBackend:
    """Generation on vLLM servers, with moin-hub's routing and verified pulls in front (see the module doc).

    Args:
        engine: routes (its registry, router, ``download``); its base model is never loaded.
        config: the upstreams, their adapter capacity and rank, where merged mixtures are kept.

    Example:
        >>> engine = ExpertEngine("acme/moin-registry")  # doctest: +SKIP
        >>> backend = VllmBackend(engine, VllmConfig(upstreams=("http://127.0.0.1:8001",), max_loras=4))  # doctest: +SKIP
        >>> uvicorn.run(create_app(engine, backend=backend), port=8000)  # doctest: +SKIP
    """

    name = "vllm"

    def __init__(self, engine: ExpertEngine, config: VllmConfig):
        self.engine = engine
        self.config = config
        self.stats = EngineStats()
        self.pool = UpstreamPool(config, self.stats)

    @property
    def registry(self) -> Registry:
        return self.engine.registry

    @property
    def upstreams(self) -> list[Upstream]:
        return self.pool.upstreams

    async def start(self, config: ServeConfig, metrics: ServerMetrics) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        """Close the connections (loaded adapters stay on the upstreams: a restarted server adopts them)."""
        await self.pool.stop()
        self.engine.close()

    # ----------------------------------------------------------------------------------------- forwarding

    def adapter_of(self, mixture: Mixture) -> tuple[str | None, Callable[[], Path] | None, str | None]:
        """``(lora name, fetch, label)`` of a mixture: None for the base model; one expert's adapter; several
        experts merged once into one adapter folder (:func:`~moin_hub.serving.mixture_adapter.materialize_mixture`,
        PEFT's ``cat``: the update is ``sum_i w_i * delta_i``, as on the own engine), kept in
        ``config.mixture_dir`` and served as its own LoRA.

        Experts whose weight rounds to 0 at the merge's precision (below 5e-5) are left out of a merge.

        Raises:
            ApiError: 400 when a merged mixture's rank (the sum of its experts') is over the upstreams'
                ``max_lora_rank``.
        """
        kept = [(e, w) for e, w in zip(mixture.experts, mixture.weights, strict=True) if round(w, WEIGHT_DECIMALS)]
        if not kept:
            return None, None, None
        records = [self.engine.registry.get(e) for e, _ in kept]
        if len(records) == 1:
            return lora_name(records[0]), functools.partial(self.engine.download, records[0]), records[0].expert_id
        weights = [w for _, w in kept]
        ranks = [r.lora_rank for r in records]
        label = "+".join(r.expert_id for r in records)
        if all(ranks) and sum(ranks) > self.config.max_lora_rank:
            raise ApiError(400, f"The mixture {label} merges into a LoRA of rank {sum(ranks)} (its experts' ranks "
                           f"summed), over the upstreams' --max-lora-rank {self.config.max_lora_rank}: ask for fewer "
                           "experts (k), or start vLLM with a larger --max-lora-rank and pass it as "
                           "--upstream-max-lora-rank.", param="model", code="mixture_rank_too_large")
        folder, download, max_rank = self.config.mixture_folder(), self.engine.download, self.config.max_lora_rank

        def fetch() -> Path:  # merged once per distinct mixture, from the experts' verified folders
            return materialize_mixture(download, records, weights, folder, max_rank=max_rank).path

        return mixture_name(records, weights), fetch, label

    def _request_error(self, upstream: Upstream, path: str, status: int, text: str, adapter: bool) -> Exception:
        """The error of an upstream's error answer to a forwarded request."""
        message = upstream_message(text)
        upstream.errors += 1
        if status == 404 and adapter:
            return _StaleAdapter(message)
        if status in (400, 413, 422):
            return ApiError(400, f"The upstream refused the request: {message}", code="upstream_rejected")
        return UpstreamError(upstream.url, f"answered HTTP {status} to {path}: {message}", upstream_status=status,
                             status=503 if status in (429, 503) else 502)

    def _body(self, req: Sampling, max_tokens: int, stop: tuple[str, ...], **fields: Any) -> dict[str, Any]:
        """The upstream request: the client's other fields as sent, the sampling settings as checked here."""
        body = dict(req.model_extra or {})
        body.update(temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens, n=1, **fields)
        body.pop("max_completion_tokens", None)
        if stop:
            body["stop"] = list(stop)
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    def _count(self, usage: Any, seconds: float) -> None:
        if isinstance(usage, dict):
            self.stats.add(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                           generated_tokens=int(usage.get("completion_tokens") or 0), generation_seconds=seconds)

    async def _forward(self, path: str, req: Sampling, body: dict[str, Any], route: Route) -> tuple[dict, dict]:
        """Forward one request to an upstream: ``(its answer, the moin object)``."""
        mixture, moin = route
        name, fetch, label = self.adapter_of(mixture)
        for attempt in (1, 2):
            lease = await self.pool.lease(name, fetch, label)
            start = time.perf_counter()
            try:
                lease.upstream.requests += 1
                try:
                    response = await self.pool.client.post(lease.upstream.url + path, json={**body, "model": lease.model})
                except httpx.HTTPError as err:
                    raise self.pool.failed(lease.upstream, path, err) from None
                if response.status_code >= 400:
                    raise self._request_error(lease.upstream, path, response.status_code, response.text,
                                              lease.adapter is not None)
                try:
                    answer = response.json()
                except ValueError:
                    raise UpstreamError(lease.upstream.url, f"answered {path} with something that is not JSON") from None
            except _StaleAdapter:
                self.pool.forget(lease)
                if attempt == 2:
                    raise UpstreamError(lease.upstream.url, f"does not find adapter {name} right after loading it") from None
                continue
            finally:
                self.pool.release(lease)
            self._count(answer.get("usage"), time.perf_counter() - start)
            return answer, {**moin, "upstream": lease.upstream.url}
        raise AssertionError("unreachable")

    async def completions(self, req: CompletionRequest, prompts: list[str], routes: list[Route], max_tokens: int,
                          stop: tuple[str, ...]) -> Any:
        if req.stream:
            return await self._stream("/v1/completions", req, self._body(req, max_tokens, stop, prompt=prompts[0]),
                                      routes[0])
        answers = await asyncio.gather(*(
            self._forward("/v1/completions", req, self._body(req, max_tokens, stop, prompt=prompt), route)
            for prompt, route in zip(prompts, routes, strict=True)))
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, (answer, moin) in enumerate(answers):
            for choice in answer.get("choices") or []:
                choices.append({**choice, "index": index, "moin": moin})
            for key in usage:
                usage[key] += int((answer.get("usage") or {}).get(key) or 0)
        first, moin = answers[0]
        return {**first, "model": req.model, "choices": choices, "usage": usage, "moin": moin}

    async def chat(self, req: ChatRequest, messages: list[dict[str, str]], route: Route, max_tokens: int,
                   stop: tuple[str, ...]) -> Any:
        body = self._body(req, max_tokens, stop, messages=messages)
        if req.stream:
            return await self._stream("/v1/chat/completions", req, body, route)
        answer, moin = await self._forward("/v1/chat/completions", req, body, route)
        return {**answer, "model": req.model, "moin": moin}

    async def _open_stream(self, lease: Lease, path: str, body: dict[str, Any]) -> Any:
        """Send a streamed request; return the open response once it answered 200."""
        request = self.pool.client.build_request("POST", lease.upstream.url + path, json={**body, "model": lease.model})
        lease.upstream.requests += 1
        try:
            response = await self.pool.client.send(request, stream=True)
        except httpx.HTTPError as err:
            raise self.pool.failed(lease.upstream, path, err) from None
        if response.status_code >= 400:
            text = (await response.aread()).decode("utf-8", "replace")
            await response.aclose()
            raise self._request_error(lease.upstream, path, response.status_code, text, lease.adapter is not None)
        return response

    async def _stream(self, path: str, req: Sampling, body: dict[str, Any], route: Route) -> Any:
        """Server-sent events from the upstream, passed through: ``model`` says what the client asked for, the
        first chunk carries the ``moin`` object; a client that leaves closes the upstream request."""
        from fastapi.responses import StreamingResponse
        from starlette.background import BackgroundTask

        mixture, moin = route
        name, fetch, label = self.adapter_of(mixture)
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        asked_usage = bool(options.get("include_usage"))
        body = {**body, "stream": True, "stream_options": {**options, "include_usage": True}}  # counted here
        for attempt in (1, 2):
            lease = await self.pool.lease(name, fetch, label)
            try:
                response = await self._open_stream(lease, path, body)
                break
            except _StaleAdapter:
                self.pool.release(lease)
                self.pool.forget(lease)
                if attempt == 2:
                    raise UpstreamError(lease.upstream.url, f"does not find adapter {name} right after loading it") from None
            except BaseException:
                self.pool.release(lease)
                raise
        moin = {**moin, "upstream": lease.upstream.url}
        start = time.perf_counter()

        async def finish() -> None:
            self.pool.release(lease)
            await response.aclose()

        def error_event(err: Exception) -> str:
            return f"data: {json.dumps(api_error(err).body())}\n\n"

        async def events() -> Any:
            first = True
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        yield "data: [DONE]\n\n"
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        chunk = None
                    if not isinstance(chunk, dict):
                        yield error_event(UpstreamError(lease.upstream.url, "sent an event that is not a JSON object"))
                        return
                    if "error" in chunk:  # the upstream's error ends its stream
                        lease.upstream.errors += 1
                        yield error_event(UpstreamError(lease.upstream.url, f"failed mid-stream: {upstream_message(data)}"))
                        return
                    if chunk.get("usage"):
                        self._count(chunk["usage"], time.perf_counter() - start)
                    if not asked_usage:
                        chunk.pop("usage", None)
                        if not chunk.get("choices"):
                            continue  # the usage chunk this server asked for
                    chunk["model"] = req.model
                    if first:
                        chunk["moin"], first = moin, False
                    yield f"data: {json.dumps(chunk)}\n\n"
            except httpx.HTTPError as err:
                yield error_event(self.pool.failed(lease.upstream, path, err))
            finally:
                self.pool.release(lease)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(finish))

    # ----------------------------------------------------------------------------------------- views

    def cache_info(self) -> dict[str, Any]:
        """The adapters on every upstream (for ``/metrics``): capacity summed, bytes, and each adapter."""
        loaded = [{**a.to_dict(), "upstream": u.url} for u in self.upstreams for a in u.adapters.values()]
        return {"capacity": sum(u.capacity for u in self.upstreams), "max_bytes": None,
                "bytes": sum(a["bytes"] for a in loaded), "loaded": loaded}

    def experts_view(self, records: Sequence[ExpertRecord]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        states = []
        for record in records:
            name = lora_name(record)
            held = [(u, u.adapters[name]) for u in self.upstreams if name in u.adapters]
            ready = [(u, a) for u, a in held if not a.loading]
            states.append({"loaded": bool(ready), "pinned": False, "in_use": sum(a.in_use for _, a in held),
                           "adapter": name, "upstreams": [u.url for u, _ in ready]})
        info = self.cache_info()
        return states, {"capacity": info["capacity"], "max_bytes": None, "bytes": info["bytes"],
                        "upstreams": [u.to_dict() for u in self.upstreams]}

    def health(self) -> dict[str, Any]:
        names = {n for u in self.upstreams for n, a in u.adapters.items() if not a.loading}
        answer: dict[str, Any] = {
            "loaded": len(names), "base_model_loaded": False,
            "upstreams": [{"url": u.url, "model": u.model, "reachable": u.reachable, "in_flight": u.in_flight,
                           "adapters": len(u.adapters)} for u in self.upstreams]}
        if not any(u.reachable for u in self.upstreams):
            answer["status"] = "degraded"
        return answer

    def metrics_text(self, metrics: ServerMetrics) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: Callable[[Upstream], float]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f'{name}{{upstream="{_label(u.url)}"}} {value(u)}' for u in self.upstreams)

        metric("moin_upstream_in_flight", "gauge", "Requests an upstream is running now.", lambda u: u.in_flight)
        metric("moin_upstream_adapters", "gauge", "Adapters an upstream holds (or is loading).",
               lambda u: len(u.adapters))
        metric("moin_upstream_capacity", "gauge", "Adapters an upstream may hold.", lambda u: u.capacity)
        metric("moin_upstream_requests_total", "counter", "Requests forwarded to an upstream.", lambda u: u.requests)
        metric("moin_upstream_adapter_loads_total", "counter", "Adapters loaded into an upstream.", lambda u: u.loads)
        metric("moin_upstream_adapter_unloads_total", "counter", "Adapters unloaded from an upstream.",
               lambda u: u.unloads)
        metric("moin_upstream_errors_total", "counter", "Failed calls to an upstream.", lambda u: u.errors)
        metric("moin_upstream_up", "gauge", "1 if the upstream answered its last call.", lambda u: int(bool(u.reachable)))
        return render_metrics(self, metrics, self.pool.waiting, extra=lines)
