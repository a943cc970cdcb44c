"""The vLLM servers behind `moin-hub serve --backend vllm`, and which adapters each holds.

An :class:`UpstreamPool` places adapters on upstreams and hands out :class:`Lease` objects: a request goes to an
upstream that holds its adapter (or is loading it), else to the least loaded one with room
(:func:`pick_upstream`, a pure function). Each upstream holds at most ``max_loras`` adapters: to make room
the least recently used idle adapter is unloaded (``POST /v1/unload_lora_adapter``; the choice is
:func:`~moin_hub.serving.cache.plan_evictions`), never one a running request uses. A missing adapter is
loaded once (``POST /v1/load_lora_adapter``): its table entry holds the load task, which every request for it
awaits (the lock of that upstream and adapter). All of the table changes run on the event loop without an
await between reading and writing it, so no other request sees it half changed.

:mod:`moin_hub.serving.vllm_backend` forwards the requests; this module knows nothing of OpenAI's API.
"""

from __future__ import annotations

import asyncio
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
from ..hub.config import ADAPTER_WEIGHTS_FILENAME
from .cache import plan_evictions
from .engine import EngineStats
from .mixture_adapter import NAME_PREFIX as MIXTURE_PREFIX
from .openai_api import ApiError

logger = logging.getLogger(__name__)

#: vLLM's own default of ``--max-loras`` (adapters in one batch), the default of ``VllmConfig.max_loras``.
VLLM_DEFAULT_MAX_LORAS = 1
#: vLLM's own default of ``--max-lora-rank``, the default of ``VllmConfig.max_lora_rank``.
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: Experts' adapters moin-hub loads into an upstream are named with this prefix, merged mixtures with
#: ``moin-mix-``; adapters with other names found there are left alone.
LORA_PREFIX = "moin:"
OWN_PREFIXES = (LORA_PREFIX, MIXTURE_PREFIX)
#: How long an upstream that failed is left alone before it is asked again (seconds).
RETRY_SECONDS = 2.0


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
    max_lora_rank: int = field(default=VLLM_DEFAULT_MAX_LORA_RANK, metadata={
        "help": "The upstreams' --max-lora-rank: a mixture that would merge above it is refused (400)."})
    mixture_dir: str | None = field(default=None, metadata={
        "help": "Where merged mixtures are kept (the upstreams read them there); default: the moin-hub cache."})

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
        if isinstance(self.max_lora_rank, bool) or not isinstance(self.max_lora_rank, int) or self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive integer, got {self.max_lora_rank!r}.")
        if self.mixture_dir is not None:
            self.mixture_dir = str(Path(self.mixture_dir).expanduser().absolute())  # the upstreams read it

    def mixture_folder(self) -> Path:
        """Where merged mixtures are kept: ``mixture_dir``, else ``<moin-hub cache>/vllm-mixtures``."""
        from ..hub.assets import cache_root

        return Path(self.mixture_dir) if self.mixture_dir else cache_root() / "vllm-mixtures"

    def to_dict(self) -> dict[str, Any]:
        """The settings, without the API key."""
        return {"upstreams": list(self.upstreams), "max_loras": self.max_loras, "timeout": self.timeout,
                "max_lora_rank": self.max_lora_rank, "mixture_dir": self.mixture_dir}


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
    last_error: UpstreamError | None = field(default=None, repr=False)  # why it is not usable now
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


def upstream_message(text: str) -> str:
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


class UpstreamPool:
    """The upstreams, the adapters each holds, and the requests each runs (used on one event loop).

    Args:
        config: the upstreams and their adapter capacity.
        stats: counters to add cache hits / misses, loads and evictions to (the backend's ``/metrics``).
    """

    def __init__(self, config: VllmConfig, stats: EngineStats | None = None):
        self.config = config
        self.stats = stats or EngineStats()
        self.upstreams = [Upstream(url, config.max_loras) for url in config.upstreams]
        self.client: Any = None
        self._changed: asyncio.Event | None = None
        self.waiting = 0  # requests waiting for room for their adapter

    async def start(self) -> None:
        """Open the connections and ask every upstream what it serves (one that fails is asked again later)."""
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.config.timeout, connect=10.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._changed = asyncio.Event()
        for upstream in self.upstreams:
            try:
                await self._discover(upstream)
            except UpstreamError as err:  # serving starts anyway; requests ask it again
                upstream.last_error = err
                logger.warning("%s; requests will try it again", err)

    async def stop(self) -> None:
        """Close the connections. Loaded adapters stay on the upstreams: a restarted server adopts them."""
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def call(self, upstream: Upstream, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request to an upstream; connection failures and error answers raise :class:`UpstreamError`."""
        if self.client is None:
            raise RuntimeError("the server is not started")
        try:
            response = await self.client.request(method, upstream.url + path, json=body)
        except httpx.HTTPError as err:
            raise self.failed(upstream, path, err) from None
        upstream.reachable = True
        if response.status_code >= 400:
            upstream.errors += 1
            raise UpstreamError(upstream.url, f"answered HTTP {response.status_code} to {path}: "
                                f"{upstream_message(response.text)}", upstream_status=response.status_code)
        return response

    def failed(self, upstream: Upstream, path: str, err: Exception) -> UpstreamError:
        """The error of a request that got no answer. An upstream that could not be reached is asked
        /v1/models again before it gets more requests (it may have restarted without its adapters)."""
        upstream.errors += 1
        if isinstance(err, httpx.TimeoutException):
            return UpstreamError(upstream.url, f"did not answer {path} within {self.config.timeout:g} s", status=504)
        upstream.reachable = False
        upstream.model = None
        upstream.retry_at = time.monotonic() + RETRY_SECONDS
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        upstream.last_error = UpstreamError(
            upstream.url, f"cannot be reached ({type(err).__name__}{': ' + detail if detail else ''})", status=503)
        return upstream.last_error

    async def _discover(self, upstream: Upstream) -> None:
        """Ask an upstream its base model and the adapters it holds (adopted: ours evictable, others not)."""
        response = await self.call(upstream, "GET", "/v1/models")
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
                upstream.adapters[name] = UpstreamAdapter(name, foreign=not name.startswith(OWN_PREFIXES))
                upstream.adapters.move_to_end(name, last=False)  # adopted as least recently used
        upstream.model, upstream.max_model_len = bases[0]["id"], bases[0].get("max_model_len")
        upstream.last_error = None
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
                    upstream.last_error = last = err
        usable = [u for u in self.upstreams if u.model is not None]
        if not usable:  # the newest failure, else the last one known (asked again after RETRY_SECONDS)
            raise last or next((u.last_error for u in self.upstreams if u.last_error is not None),
                               UpstreamError(", ".join(self.config.upstreams), "failed; asked again shortly", status=503))
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
        self.waiting += 1
        try:
            await asyncio.wait_for(changed.wait(), timeout=min(remaining, RETRY_SECONDS))
        except asyncio.TimeoutError:
            pass
        finally:
            self.waiting -= 1

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
                await self.call(upstream, "POST", "/v1/load_lora_adapter",
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
            self.call(upstream, "POST", "/v1/unload_lora_adapter", {"lora_name": victim.name}))
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

    def forget(self, lease: Lease) -> None:
        """The upstream said it does not know the lease's adapter: drop it from the table (loaded again)."""
        adapter = lease.adapter
        if adapter is not None and lease.upstream.adapters.get(adapter.name) is adapter:
            del lease.upstream.adapters[adapter.name]
            logger.warning("%s no longer holds %s (restarted?); loading it again", lease.upstream.url, adapter.name)
