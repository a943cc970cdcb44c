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
   base model); streams pass through as server-sent events.

Several upstreams: a request goes to an upstream that holds its adapter, else to the least loaded one with
room (:func:`pick_upstream`). Each upstream holds at most ``max_loras`` adapters: the least recently used idle
ones are unloaded first (``POST /v1/unload_lora_adapter``; the choice is
:func:`~moin_hub.serving.cache.plan_evictions`), an adapter that a running request uses never is. Concurrent
requests for an adapter that is being loaded wait for that one load (each upstream's adapter entry holds
its load task).

The upstream reads the adapter from the folder moin-hub pulled it to (its HF cache): it must see the same
file system (the same machine, or a shared volume).

Failures of an upstream become OpenAI errors: unreachable 503, timed out 504, an error answer 502; an answer
that blames the request (4xx) is the client's 400.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import UpstreamError
from ..hub.config import ADAPTER_WEIGHTS_FILENAME, ExpertRecord
from ..hub.mixing import Mixture
from ..hub.registry import Registry
from .cache import plan_evictions
from .engine import EngineStats, ExpertEngine
from .metrics import ServerMetrics, _label, render_metrics
from .openai_api import ApiError, ChatRequest, CompletionRequest, Sampling, api_error
from .server import Route, ServeConfig

logger = logging.getLogger(__name__)

#: vLLM's own default of ``--max-loras`` (adapters in one batch), the default of ``VllmConfig.max_loras``.
VLLM_DEFAULT_MAX_LORAS = 1
#: Adapters moin-hub loads into an upstream are named with this prefix; others found there are left alone.
LORA_PREFIX = "moin:"
#: How long an upstream that failed is left alone before it is asked again (seconds).
RETRY_SECONDS = 2.0

MIXTURES_UNSUPPORTED = ("Mixtures of several experts (modes topk and adaptive) are not yet served on vLLM: "
                        "use moin:top1 (or moin:auto with --mode top1), moin:base or an expert id.")

#: Merges verified expert adapter folders with weights into one adapter folder (cached by the caller's
#: implementation) and returns it: the hook through which mixtures would be served on vLLM.
MergeMixture = Callable[[Sequence[Path], Sequence[float]], Path]


def lora_name(record: ExpertRecord) -> str:
    """The name of an expert's adapter on an upstream: ``moin:<expert_id>@<first 12 of its commit>``.

    One name per pinned commit: an expert pushed again is loaded as a new adapter.

    Example:
        >>> from types import SimpleNamespace
        >>> lora_name(SimpleNamespace(expert_id="cooking", revision="0123456789abcdef0123"))
        'moin:cooking@0123456789ab'
    """
    return f"{LORA_PREFIX}{record.expert_id}@{record.revision[:12]}"


def mixture_name(records: Sequence[ExpertRecord], weights: Sequence[float]) -> str:
    """The name of a merged mixture's adapter: its experts and a digest of their commits and weights."""
    digest = hashlib.sha256(json.dumps([[r.repo_id, r.revision, round(w, 6)] for r, w in
                                        zip(records, weights, strict=True)]).encode()).hexdigest()[:12]
    return f"{LORA_PREFIX}mix:{'+'.join(r.expert_id for r in records)}@{digest}"


def normalize_upstream_url(url: str) -> str:
    """An upstream's base URL: ``http(s)://host[:port][/path]`` without a trailing ``/`` or ``/v1``.

    Raises:
        ValueError: not an http(s) URL with a host, or one with a query or fragment (the message names it).

    Example:
        >>> normalize_upstream_url(" http://127.0.0.1:8001/v1/ ")
        'http://127.0.0.1:8001'
    """
    text = str(url).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"upstream must be an http(s) URL such as http://127.0.0.1:8001, got {url!r}.")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError:
        raise ValueError(f"upstream has an invalid port: {url!r}.") from None
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass
class VllmConfig:
    """How `moin-hub serve --backend vllm` reaches its vLLM servers (validated on creation).

    Example:
        >>> VllmConfig(upstreams=("http://127.0.0.1:8001/v1",), max_loras=4).upstreams
        ('http://127.0.0.1:8001',)
    """

    upstreams: tuple[str, ...] = field(metadata={"help": "Base URLs of the vLLM OpenAI servers."})
    max_loras: int = field(default=VLLM_DEFAULT_MAX_LORAS, metadata={
        "help": "Adapters one upstream holds at once; give the upstreams' --max-loras."})
    timeout: float = field(default=300.0, metadata={
        "help": "Seconds to wait for an upstream's answer, and for room for an adapter."})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": "Sent as `Authorization: Bearer` to the upstreams (their --api-key); never logged."})

    def __post_init__(self) -> None:
        if isinstance(self.upstreams, str):
            self.upstreams = tuple(self.upstreams.split(","))
        urls = tuple(normalize_upstream_url(u) for u in self.upstreams if str(u).strip())
        if not urls:
            raise ValueError("upstreams: give at least one vLLM server URL, e.g. http://127.0.0.1:8001.")
        if len(set(urls)) != len(urls):
            raise ValueError(f"upstreams: each URL once, got {', '.join(urls)}.")
        self.upstreams = urls
        if isinstance(self.max_loras, bool) or not isinstance(self.max_loras, int) or self.max_loras < 1:
            raise ValueError(f"max_loras must be a positive integer, got {self.max_loras!r}.")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not (
                math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The settings, without the API key."""
        return {"upstreams": list(self.upstreams), "max_loras": self.max_loras, "timeout": self.timeout}


def pick_upstream(in_flight: Sequence[int], loaded: Sequence[int], holders: Collection[int],
                  with_room: Collection[int], idle_since: Sequence[float] | None = None) -> int | None:
    """The upstream a request goes to (an index): of those holding its adapter, the least loaded; else, of
    those with room for it, the least loaded. Ties go to the one with fewer adapters, then to the one whose
    least recently used idle adapter (the one it would unload) was used longest ago, then the first.

    Args:
        in_flight: requests each upstream is running now.
        loaded: adapters each upstream holds.
        holders: upstreams holding (or loading) the request's adapter.
        with_room: upstreams that can take one more adapter (after unloading idle ones).
        idle_since: when each upstream's least recently used idle adapter was last used (any clock).

    Returns:
        The index, or None when no upstream holds the adapter and none has room (wait for one).

    Example:
        >>> pick_upstream([5, 0], [1, 1], holders={0}, with_room={0, 1})  # affinity beats load
        0
        >>> pick_upstream([1, 1], [3, 1], holders=(), with_room={0, 1})
        1
        >>> pick_upstream([0, 0], [4, 4], holders=(), with_room=()) is None
        True
    """
    pool = holders or with_room
    if not pool:
        return None
    return min(pool, key=lambda i: (in_flight[i], loaded[i], idle_since[i] if idle_since else 0.0, i))


@dataclass
class UpstreamAdapter:
    """An adapter an upstream holds (or is loading)."""

    name: str
    expert_id: str | None = None
    foreign: bool = False  # found on the upstream, not loaded by moin-hub: never unloaded
    in_use: int = 0
    nbytes: int = 0
    load_seconds: float = 0.0
    last_used: float = 0.0  # time.monotonic() of the last request for it
    ready: asyncio.Task | None = field(default=None, repr=False)  # the load; awaited by every request for it

    @property
    def loading(self) -> bool:
        return self.ready is not None and not self.ready.done()

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.name, "expert_id": self.expert_id, "foreign": self.foreign, "in_use": self.in_use,
                "loading": self.loading, "bytes": self.nbytes, "load_seconds": round(self.load_seconds, 4)}


@dataclass
class Upstream:
    """One vLLM server: its base model, its adapters (least recently used first) and its load."""

    url: str
    capacity: int
    model: str | None = None  # the base model's name there; None until it answered /v1/models
    max_model_len: int | None = None
    adapters: OrderedDict[str, UpstreamAdapter] = field(default_factory=OrderedDict)
    in_flight: int = 0
    reachable: bool | None = None
    retry_at: float = 0.0
    requests: int = 0
    errors: int = 0
    loads: int = 0
    unloads: int = 0
    unloading: dict[str, asyncio.Task] = field(default_factory=dict, repr=False)

    def evictable(self) -> list[str]:
        return [n for n, a in self.adapters.items() if not (a.in_use or a.loading or a.foreign)]

    def idle_since(self) -> float:
        """When the adapter an unload would take was last used (0 when none is idle)."""
        return min((self.adapters[n].last_used for n in self.evictable()), default=0.0)

    def has_room(self) -> bool:
        """True if one more adapter fits once the idle ones that must go are unloaded."""
        return len(self.adapters) - len(self.evictable()) < self.capacity

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "reachable": self.reachable, "capacity": self.capacity,
                "in_flight": self.in_flight, "loaded": [a.to_dict() for a in self.adapters.values()],
                "requests": self.requests, "errors": self.errors, "loads": self.loads, "unloads": self.unloads}


@dataclass
class Lease:
    """A request's hold on an upstream (and its adapter) until :meth:`VllmBackend.release`."""

    upstream: Upstream
    adapter: UpstreamAdapter | None
    model: str
    released: bool = False


class _StaleAdapter(Exception):
    """The upstream no longer knows an adapter moin-hub loaded there (it restarted): load it again."""


def _message(text: str) -> str:
    """The message of an upstream's error answer (OpenAI's ``{"error": {"message"}}`` or vLLM's older
    ``{"message"}``), one line."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else (error or body.get("message"))
    message = str(message if message else text).strip()
    return (message.splitlines()[0] if message else "no message")[:300]


class VllmBackend:
    """Generation on vLLM servers, with moin-hub's routing and verified pulls in front (see the module doc).

    Args:
        engine: routes (its registry, router, ``download``); its base model is never loaded.
        config: the upstreams and their adapter capacity.
        merge_mixture: merges a ``topk``/``adaptive`` mixture's verified adapter folders into one adapter
            folder (see :data:`MergeMixture`); without it such mixtures are answered with a 400.

    Example:
        >>> engine = ExpertEngine("acme/moin-registry")  # doctest: +SKIP
        >>> backend = VllmBackend(engine, VllmConfig(upstreams=("http://127.0.0.1:8001",), max_loras=4))  # doctest: +SKIP
        >>> uvicorn.run(create_app(engine, backend=backend), port=8000)  # doctest: +SKIP
    """

    name = "vllm"

    def __init__(self, engine: ExpertEngine, config: VllmConfig, *, merge_mixture: MergeMixture | None = None):
        self.engine = engine
        self.config = config
        self.merge_mixture = merge_mixture
        self.upstreams = [Upstream(url, config.max_loras) for url in config.upstreams]
        self.stats = EngineStats()
        self._client: Any = None
        self._changed: asyncio.Event | None = None
        self._waiting = 0

    @property
    def registry(self) -> Registry:
        return self.engine.registry

    # ----------------------------------------------------------------------------------------- lifespan

    async def start(self, config: ServeConfig, metrics: ServerMetrics) -> None:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.config.timeout, connect=10.0),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._changed = asyncio.Event()
        for upstream in self.upstreams:
            try:
                await self._discover(upstream)
            except UpstreamError as err:  # serving starts anyway; requests ask it again
                logger.warning("%s; requests will try it again", err)

    async def stop(self) -> None:
        """Close the connections. Loaded adapters stay on the upstreams: a restarted server adopts them."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self.engine.close()

    # ----------------------------------------------------------------------------------------- upstream calls

    async def _call(self, upstream: Upstream, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request to an upstream; connection failures and error answers raise :class:`UpstreamError`."""
        if self._client is None:
            raise RuntimeError("the server is not started")
        try:
            response = await self._client.request(method, upstream.url + path, json=body)
        except httpx.HTTPError as err:
            raise self._failed(upstream, path, err) from None
        upstream.reachable = True
        if response.status_code >= 400:
            upstream.errors += 1
            raise UpstreamError(upstream.url, f"answered HTTP {response.status_code} to {path}: "
                                f"{_message(response.text)}", upstream_status=response.status_code)
        return response

    def _failed(self, upstream: Upstream, path: str, err: Exception) -> UpstreamError:
        """The error of a request that got no answer. An upstream that could not be reached is asked
        /v1/models again before it gets more requests (it may have restarted without its adapters)."""
        upstream.errors += 1
        if isinstance(err, httpx.TimeoutException):
            return UpstreamError(upstream.url, f"did not answer {path} within {self.config.timeout:g} s", status=504)
        upstream.reachable = False
        upstream.model = None
        upstream.retry_at = time.monotonic() + RETRY_SECONDS
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        return UpstreamError(upstream.url, f"cannot be reached ({type(err).__name__}{': ' + detail if detail else ''})",
                             status=503)

    async def _discover(self, upstream: Upstream) -> None:
        """Ask an upstream its base model and the adapters it holds (adopted: ours evictable, others not)."""
        response = await self._call(upstream, "GET", "/v1/models")
        try:
            data = response.json()["data"]
            bases = [m for m in data if not m.get("parent")]
            listed = [m["id"] for m in data if m.get("parent")]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UpstreamError(upstream.url, "answered /v1/models with something that is not a model list") from None
        if not bases:
            raise UpstreamError(upstream.url, "lists no base model at /v1/models")
        for name in [n for n, a in upstream.adapters.items() if n not in listed and not (a.in_use or a.loading)]:
            del upstream.adapters[name]  # gone there (a restart): loaded again when asked
        for name in listed:
            if name not in upstream.adapters:
                upstream.adapters[name] = UpstreamAdapter(name, foreign=not name.startswith(LORA_PREFIX))
                upstream.adapters.move_to_end(name, last=False)  # adopted as least recently used
        upstream.model, upstream.max_model_len = bases[0]["id"], bases[0].get("max_model_len")
        if len(bases) > 1:
            logger.warning("%s serves several base models; moin:base goes to %s", upstream.url, upstream.model)

    async def _usable(self) -> list[Upstream]:
        """The upstreams that answered /v1/models (asking again those whose retry time has come)."""
        last: UpstreamError | None = None
        for upstream in self.upstreams:
            if upstream.model is None and time.monotonic() >= upstream.retry_at:
                try:
                    await self._discover(upstream)
                except UpstreamError as err:
                    upstream.retry_at = time.monotonic() + RETRY_SECONDS
                    last = err
        usable = [u for u in self.upstreams if u.model is not None]
        if not usable:
            raise last or UpstreamError(", ".join(self.config.upstreams), "failed moments ago; retrying shortly",
                                        status=503)
        return usable

    # ----------------------------------------------------------------------------------------- adapters

    def _notify(self) -> None:
        """Wake the requests waiting for room for an adapter."""
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def lease(self, name: str | None, fetch: Callable[[], Path] | None = None,
                    expert_id: str | None = None) -> Lease:
        """An upstream for a request, holding adapter ``name`` (loaded there first if needed; None: the base
        model). ``fetch`` gives the adapter's verified folder; it runs only when a load is needed."""
        deadline = time.monotonic() + self.config.timeout
        while True:
            upstreams = await self._usable()
            in_flight = [u.in_flight for u in upstreams]
            loaded = [len(u.adapters) for u in upstreams]
            if name is None:
                index = pick_upstream(in_flight, loaded, holders=range(len(upstreams)), with_room=())
            else:
                holders = {i for i, u in enumerate(upstreams) if name in u.adapters}
                index = pick_upstream(in_flight, loaded, holders,
                                      with_room={i for i, u in enumerate(upstreams) if u.has_room()},
                                      idle_since=[u.idle_since() for u in upstreams])
            if index is not None:
                break
            await self._wait_for_room(name, deadline)
        upstream = upstreams[index]
        adapter = None
        if name is not None:
            adapter = upstream.adapters.get(name)
            if adapter is None:
                if fetch is None:
                    raise ValueError(f"adapter {name!r} is not loaded and nothing says where to fetch it")
                adapter = self._reserve(upstream, name, fetch, expert_id)
                self.stats.add(cache_misses=1)
            else:
                upstream.adapters.move_to_end(name)
                self.stats.add(cache_hits=1)
            adapter.in_use += 1
            adapter.last_used = time.monotonic()
        upstream.in_flight += 1
        lease = Lease(upstream, adapter, name or upstream.model or "")
        if adapter is not None and adapter.ready is not None:
            try:
                await asyncio.shield(adapter.ready)  # the one load of this adapter on this upstream
            except BaseException:
                self.release(lease)
                raise
        return lease

    async def _wait_for_room(self, name: str | None, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ApiError(503, f"No upstream had room for adapter {name!r} within {self.config.timeout:g} s: each "
                           f"holds {self.config.max_loras} adapter(s) that running requests use.",
                           type="server_error", code="no_adapter_room")
        changed = self._changed
        assert changed is not None
        self._waiting += 1
        try:
            await asyncio.wait_for(changed.wait(), timeout=min(remaining, RETRY_SECONDS))
        except asyncio.TimeoutError:
            pass
        finally:
            self._waiting -= 1

    def _reserve(self, upstream: Upstream, name: str, fetch: Callable[[], Path],
                 expert_id: str | None) -> UpstreamAdapter:
        """Make room on ``upstream`` (least recently used idle adapters go) and start loading ``name`` there.

        Runs without awaiting, so no other request sees the table half changed."""
        busy = {n for n, a in upstream.adapters.items() if a.in_use or a.loading}
        foreign = {n for n, a in upstream.adapters.items() if a.foreign}
        victims = [upstream.adapters.pop(n) for n in
                   plan_evictions(list(upstream.adapters), upstream.capacity - 1, busy, pinned=foreign)]
        adapter = UpstreamAdapter(name, expert_id)
        upstream.adapters[name] = adapter
        adapter.ready = asyncio.get_running_loop().create_task(self._load(upstream, adapter, victims, fetch))
        adapter.ready.add_done_callback(lambda task: task.cancelled() or task.exception())  # seen by its waiters
        return adapter

    async def _load(self, upstream: Upstream, adapter: UpstreamAdapter, victims: list[UpstreamAdapter],
                    fetch: Callable[[], Path]) -> None:
        """Unload ``victims``, pull the adapter (verified) and load it into the upstream; on failure the
        adapter leaves the table, and every request waiting for it gets the error."""
        start = time.perf_counter()
        try:
            for victim in victims:
                await self._unload(upstream, victim)
            folder = await asyncio.to_thread(fetch)
            weights = folder / ADAPTER_WEIGHTS_FILENAME
            adapter.nbytes = weights.stat().st_size if weights.is_file() else 0
            pending = upstream.unloading.get(adapter.name)
            if pending is not None:  # an unload of the same name is under way: load after it
                await asyncio.gather(pending, return_exceptions=True)
            try:
                await self._call(upstream, "POST", "/v1/load_lora_adapter",
                                 {"lora_name": adapter.name, "lora_path": str(folder)})
            except UpstreamError as err:
                if err.upstream_status == 400 and "already been loaded" in err.reason:
                    logger.info("%s already holds %s", upstream.url, adapter.name)
                elif err.upstream_status is not None:
                    raise UpstreamError(upstream.url, f"refused to load adapter {adapter.name} from {folder}: "
                                        f"{err.reason}", upstream_status=err.upstream_status) from None
                else:
                    raise
        except BaseException:
            if upstream.adapters.get(adapter.name) is adapter:
                del upstream.adapters[adapter.name]
            self._notify()
            raise
        adapter.load_seconds = time.perf_counter() - start
        upstream.loads += 1
        self.stats.add(loads=1, load_seconds=adapter.load_seconds)
        logger.info("loaded %s into %s in %.2f s", adapter.name, upstream.url, adapter.load_seconds)

    async def _unload(self, upstream: Upstream, victim: UpstreamAdapter) -> None:
        task = asyncio.get_running_loop().create_task(
            self._call(upstream, "POST", "/v1/unload_lora_adapter", {"lora_name": victim.name}))
        upstream.unloading[victim.name] = task
        try:
            await task
        except UpstreamError as err:
            if err.upstream_status != 404:  # 404: already gone there
                raise
        finally:
            if upstream.unloading.get(victim.name) is task:
                del upstream.unloading[victim.name]
        upstream.unloads += 1
        self.stats.add(evictions=1)
        logger.info("unloaded %s from %s", victim.name, upstream.url)

    def release(self, lease: Lease) -> None:
        """Let go of a lease (once; later calls do nothing)."""
        if lease.released:
            return
        lease.released = True
        lease.upstream.in_flight -= 1
        if lease.adapter is not None:
            lease.adapter.in_use -= 1
        self._notify()

    def _forget(self, lease: Lease) -> None:
        """The upstream said it does not know the lease's adapter: drop it from the table (loaded again)."""
        adapter = lease.adapter
        if adapter is not None and lease.upstream.adapters.get(adapter.name) is adapter:
            del lease.upstream.adapters[adapter.name]
            logger.warning("%s no longer holds %s (restarted?); loading it again", lease.upstream.url, adapter.name)

    def adapter_of(self, mixture: Mixture) -> tuple[str | None, Callable[[], Path] | None, str | None]:
        """``(lora name, fetch, label)`` of a mixture: None for the base model; one expert's adapter; or, with
        ``merge_mixture``, the merged adapter of several.

        Raises:
            ApiError: 400 for a mixture of several experts while no ``merge_mixture`` is given.
        """
        if not mixture.experts:
            return None, None, None
        records = [self.engine.registry.get(e) for e in mixture.experts]
        if len(records) == 1:
            return lora_name(records[0]), functools.partial(self.engine.download, records[0]), records[0].expert_id
        if self.merge_mixture is None:
            raise ApiError(400, MIXTURES_UNSUPPORTED, param="model", code="unsupported")
        merge, weights = self.merge_mixture, list(mixture.weights)

        def fetch() -> Path:  # the one place where a merged mixture folder is plugged in
            return merge([self.engine.download(r) for r in records], weights)

        return mixture_name(records, weights), fetch, "+".join(r.expert_id for r in records)

    # ----------------------------------------------------------------------------------------- forwarding

    def _request_error(self, upstream: Upstream, path: str, status: int, text: str, adapter: bool) -> Exception:
        """The error of an upstream's error answer to a forwarded request."""
        message = _message(text)
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
            lease = await self.lease(name, fetch, label)
            start = time.perf_counter()
            try:
                lease.upstream.requests += 1
                try:
                    response = await self._client.post(lease.upstream.url + path, json={**body, "model": lease.model})
                except httpx.HTTPError as err:
                    raise self._failed(lease.upstream, path, err) from None
                if response.status_code >= 400:
                    raise self._request_error(lease.upstream, path, response.status_code, response.text,
                                              lease.adapter is not None)
                try:
                    answer = response.json()
                except ValueError:
                    raise UpstreamError(lease.upstream.url, f"answered {path} with something that is not JSON") from None
            except _StaleAdapter:
                self._forget(lease)
                if attempt == 2:
                    raise UpstreamError(lease.upstream.url, f"does not find adapter {name} right after loading it") from None
                continue
            finally:
                self.release(lease)
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
        request = self._client.build_request("POST", lease.upstream.url + path, json={**body, "model": lease.model})
        lease.upstream.requests += 1
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as err:
            raise self._failed(lease.upstream, path, err) from None
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
            lease = await self.lease(name, fetch, label)
            try:
                response = await self._open_stream(lease, path, body)
                break
            except _StaleAdapter:
                self.release(lease)
                self._forget(lease)
                if attempt == 2:
                    raise UpstreamError(lease.upstream.url, f"does not find adapter {name} right after loading it") from None
            except BaseException:
                self.release(lease)
                raise
        moin = {**moin, "upstream": lease.upstream.url}
        start = time.perf_counter()

        async def finish() -> None:
            self.release(lease)
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
                        yield error_event(UpstreamError(lease.upstream.url, f"failed mid-stream: {_message(data)}"))
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
                yield error_event(self._failed(lease.upstream, path, err))
            finally:
                self.release(lease)

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
        return render_metrics(self, metrics, self._waiting, extra=lines)
