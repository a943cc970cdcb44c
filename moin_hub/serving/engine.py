"""One base model, many experts: the adapter cache and batched generation behind `serve`, the Space and Ray.

An :class:`ExpertEngine` holds ONE base model in memory and an LRU of PEFT adapters on it, keyed by
``(repo_id, commit sha)``. Experts come through the verified pull path (:func:`~moin_hub.hub.pull.download_expert`:
the registry's pinned commit, every file's sha256 checked, safetensors only); the disk tier is the HF cache.
A switch between loaded experts is ``set_adapter``, not a reload.

The cache:

- has a budget in adapters (``cache_size``) and optionally in bytes (``cache_bytes``);
- never evicts an adapter a running request holds, nor a pinned one (:meth:`ExpertEngine.pin`);
- decides evictions with the pure function :func:`~moin_hub.serving.cache.plan_evictions` (least recently
  used first);
- can prefetch the runner-up experts of a route in the background: downloaded to disk always, loaded into
  memory only while the cache has room (a prefetch never evicts).

Several experts can be mixed (routing modes ``topk``/``adaptive``, :mod:`moin_hub.hub.mixing`): the engine
loads each and activates a weighted ``cat`` combination of them.

The cache policy is in :mod:`moin_hub.serving.cache`, batched generation (:meth:`ExpertEngine.generate_batch`,
inherited) in :mod:`moin_hub.serving.generation`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IncompatibleExpertError, MoinHubError
from ..hub.client import get_api, resolve_endpoint
from ..hub.config import ADAPTER_WEIGHTS_FILENAME, ExpertRecord, PinnedModel
from ..hub.mixing import MIXTURE_SLOT, Mixture, plan_mixture
from ..hub.registry import Registry, resolve_pinned
from ..hub.router import Router, RouteResult
from .cache import DEFAULT_CACHE_SIZE, AdapterCache, AdapterKey, AdapterSlot
from .generation import BatchedGeneration

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counters of an engine, for ``/metrics`` and benchmarks (monotonic, except the gauges read live)."""

    cache_hits: int = 0
    cache_misses: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    prefetched: int = 0
    prefetch_errors: int = 0
    mixtures: int = 0
    batches: int = 0
    batched_requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    generation_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "lock"}


@dataclass(frozen=True)
class Plan:
    """A routed query: the route, the mixture of experts it gets (empty: the base model), the time taken."""

    route: RouteResult
    mixture: Mixture
    route_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.route.to_dict(), "mixture": self.mixture.to_dict(), "route_ms": round(self.route_ms, 3)}


def parse_base_model(value: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``"org/name"`` -> ``("org/name", None)``."""
    repo_id, _, revision = value.strip().partition("@")
    return repo_id, (revision or None)


class ExpertEngine(BatchedGeneration):
    """Registry + router + one base model + an LRU of PEFT adapters (thread-safe).

    Every forward pass and adapter switch happens under one lock (the active adapter is state of the model).

    Args:
        registry: the registry id (``"org/name"``) or a loaded :class:`~moin_hub.Registry`.
        revision: registry revision (default: head of main; :meth:`refresh` follows the head).
        endpoint / token: Hub settings (``token=None`` lets the Hub client find one; it is never shown).
        base_model: override the registry's base model: a Hub id (``"org/name"`` or ``"org/name@rev"``,
            resolved to a commit) or a local folder. Its architecture must match the experts'.
        cache_size: adapters kept loaded.
        cache_bytes: the most bytes of adapter weights kept loaded (None: only ``cache_size`` counts).
        prefetch: how many runner-up experts of each route to prefetch in the background (0: none).
        device: torch device (default: CUDA if available, else CPU).

    Example:
        >>> engine = ExpertEngine("acme/moin-registry", cache_size=8)  # doctest: +SKIP
        >>> plan = engine.plan("How long should bread dough rise?")  # doctest: +SKIP
        >>> engine.generate_batch([engine.encode("Bread dough")], plan.mixture, max_new_tokens=[16])  # doctest: +SKIP
    """

    def __init__(self, registry: str | Registry, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, base_model: str | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE, cache_bytes: int | None = None, prefetch: int = 0,
                 device: str | None = None):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a whole number >= 0, got {prefetch!r}.")
        if isinstance(registry, Registry):
            self._registry = registry
        else:
            self._registry = Registry.load(registry, revision=revision, endpoint=endpoint, token=token)
        self._follow_head = revision is None
        self.endpoint = self._registry.endpoint if endpoint is None else resolve_endpoint(endpoint)
        self._token = token
        self.base_model_override = base_model.strip() if base_model else None
        self._device = device
        self.prefetch_count = prefetch
        self._router = Router(self._registry)
        self._lock = threading.RLock()
        self._base: Any = None
        self._peft: Any = None
        self._tokenizer: Any = None
        self._mixture_key: tuple[tuple[str, float], ...] | None = None
        self.base_model_label = ""
        self.stats = EngineStats()
        self._cache = AdapterCache(cache_size, self._evict, max_bytes=cache_bytes)
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetching: dict[AdapterKey, Future] = {}

    # ----------------------------------------------------------------------------------------- registry

    @property
    def registry(self) -> Registry:
        """The registry at the commit the engine currently serves."""
        return self._registry

    @property
    def router(self) -> Router:
        return self._router

    def refresh(self) -> bool:
        """Follow the registry's head (unless a revision was pinned); True if it moved.

        The embedder and loaded adapters are kept: adapters are keyed by (repo, commit), so an expert
        pushed again is loaded fresh and the old one ages out of the LRU.
        """
        if not self._follow_head:
            return False
        registry = Registry.load(self._registry.registry_id, endpoint=self.endpoint, token=self._token)
        if registry.revision == self._registry.revision:
            return False
        router = Router(registry, embedder=self._router.embedder)
        with self._lock:
            self._registry, self._router = registry, router
        return True

    def plan(self, query: str, *, mode: str = "top1", k: int = 3, temperature: float = 0.05, mass: float = 0.8,
             threshold: float | None = None) -> Plan:
        """Route ``query`` and choose its mixture (see :func:`~moin_hub.hub.mixing.mix_weights`); prefetch the
        runner-ups when ``prefetch`` is set.

        Raises:
            EmptyQueryError / ValueError: empty query or bad mixing numbers.
            ExpertNotFoundError: the registry has no experts.
        """
        start = time.perf_counter()
        route = self._router.route(query, k=max(k, 1 + self.prefetch_count))
        fallback = self._registry.fallback
        mixture = plan_mixture(route, mode=mode, k=k, temperature=temperature, mass=mass, threshold=threshold,
                               fallback=None if fallback is None else fallback.expert_id)
        if self.prefetch_count:
            chosen = set(mixture.experts)
            runners = [r.expert for r in route.routes if r.expert.expert_id not in chosen]
            self.prefetch(runners[: self.prefetch_count])
        return Plan(route, mixture, (time.perf_counter() - start) * 1000)

    # ----------------------------------------------------------------------------------------- models

    def warm_up(self) -> None:
        """Load the embedder and the base model now, so that the first request is fast."""
        _ = self._router.embedder
        self._load_base()

    def _load_base(self) -> tuple[Any, Any]:
        """The base model and its tokenizer, loaded on first use.

        Once loaded they are read without the engine's lock: the lock is held for the whole of a running batch,
        and a request that only needs the tokenizer (``encode``) must not wait for that batch to end, or it
        misses the batcher's window and the next batch runs without it.
        """
        if self._base is not None:  # published last, after the tokenizer (below)
            return self._base, self._tokenizer
        with self._lock:
            if self._base is not None:
                return self._base, self._tokenizer
            import torch

            from ..hub.loading import load_base, load_base_model

            device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
            override = self.base_model_override
            manifest_base = self._registry.manifest.base_model
            if override and Path(override).is_dir():
                model, tokenizer = load_base(override)
                model.to(device)
                self.base_model_label = f"{override} (local folder)"
            else:
                pinned = manifest_base
                if override:
                    repo_id, revision = parse_base_model(override)
                    pinned = resolve_pinned(get_api(self.endpoint, self._token), repo_id, revision,
                                            what="base model")
                model, tokenizer = load_base_model(pinned, endpoint=self.endpoint, token=self._token,
                                                   device=device)
                self.base_model_label = f"{pinned.repo_id}@{pinned.revision[:12]}"
            if override:
                self.base_model_label += f" (override of {manifest_base.repo_id})"
                logger.warning("Serving experts of %s on the base model %s", manifest_base.repo_id, override)
            self._tokenizer = tokenizer
            self._base = model  # last: a reader without the lock that sees the model sees the tokenizer
            return model, tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._load_base()[1]

    @property
    def has_chat_template(self) -> bool:
        """True if the base model's tokenizer has a chat template (an instruct model)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def base_model(self) -> PinnedModel:
        """The registry's pinned base model (see ``base_model_label`` for what is actually loaded)."""
        return self._registry.manifest.base_model

    def max_context(self) -> int:
        """The base model's context length (2048 when its config does not say)."""
        return getattr(self._load_base()[0].config, "max_position_embeddings", None) or 2048

    def cached_experts(self) -> list[str]:
        """Expert ids whose adapters are loaded, least recently used first."""
        with self._lock:
            return [slot.expert_id for slot in self._cache.slots()]

    def is_loaded(self, record: ExpertRecord) -> bool:
        with self._lock:
            return (record.repo_id, record.revision) in self._cache

    def _evict(self, slot: AdapterSlot) -> None:
        """Delete an evicted adapter's weights from the base model (called by the cache, under the lock)."""
        logger.info("evicting adapter %s (%s@%s)", slot.name, slot.key[0], slot.key[1][:12])
        self._drop_mixture()
        self._delete_adapter(slot.name)
        self.stats.add(evictions=1)

    def _drop_mixture(self) -> None:
        """Delete the mixture slot (it holds copies of experts' weights), if any (under the lock)."""
        if self._peft is not None and MIXTURE_SLOT in self._peft.peft_config:
            self._delete_adapter(MIXTURE_SLOT)
        self._mixture_key = None

    def _delete_adapter(self, name: str) -> None:
        """Delete PEFT adapter ``name``; if it is the active one, hand "active" to the newest cached expert first
        (under the lock)."""
        if self._peft.active_adapter == name:
            others = [s.name for s in self._cache.slots() if s.name != name]
            if others:
                self._peft.set_adapter(others[-1], inference_mode=True)
        self._peft.delete_adapter(name)

    def _load_adapter(self, record: ExpertRecord, name: str, folder: Path) -> None:
        """Load a verified adapter folder onto the base model as ``name`` (under the lock)."""
        from peft import PeftModel

        from ..hub.loading import check_adapter_effective, quiet_peft

        base, _ = self._load_base()
        try:
            with quiet_peft():
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(base, str(folder), adapter_name=name,
                                                           is_trainable=False, use_safetensors=True)
                else:
                    self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False,
                                            use_safetensors=True)
        except (RuntimeError, ValueError, KeyError) as err:
            raise IncompatibleExpertError(
                f"Expert {record.repo_id!r} does not fit the base model {self.base_model_label}: "
                f"{str(err).splitlines()[0][:200]}", repo_id=record.repo_id,
            ) from None
        self._peft.eval()
        try:
            with quiet_peft():
                check_adapter_effective(self._peft, name, weights_path=folder / ADAPTER_WEIGHTS_FILENAME,
                                        repo_id=record.repo_id)
        except MoinHubError:
            if len(self._peft.peft_config) > 1:
                self._peft.delete_adapter(name)
            else:  # the only adapter: take the LoRA layers out of the base model again
                self._peft.unload()
                self._peft = None
            raise

    def download(self, record: ExpertRecord) -> Path:
        """The folder of ``record``'s adapter, through pull's verified download: the registry's pinned commit,
        the sha256 of every file, no pickle in the repo, an adapter that names the registry's base model.
        Files come from the HF cache when they are there (and are checked again).

        Raises:
            IntegrityError / UnsafeFileError / BaseModelMismatchError / ExpertNotFoundError /
            HubUnavailableError: see :func:`~moin_hub.hub.pull.download_expert`.
        """
        from ..hub.pull import download_expert

        return download_expert(record, endpoint=self.endpoint, token=self._token,
                               base_model=self._registry.manifest.base_model)

    def _acquire(self, record: ExpertRecord, *, pin: bool = False, count: bool = True) -> tuple[AdapterSlot, bool]:
        """The loaded adapter of ``record`` (pulled, verified and loaded if needed), held until released.

        ``count=False`` keeps the cache hit/miss counters for requests (a prefetch is not one).

        Returns:
            ``(slot, loaded_now)``.
        """
        from ..hub.loading import adapter_name

        key = (record.repo_id, record.revision)
        with self._lock:
            slot = self._cache.get(key)
            if slot is not None:
                return self._hold_loaded(slot, pin, count), False
        start = time.perf_counter()
        folder = self.download(record)
        with self._lock:
            slot = self._cache.get(key)  # another request may have loaded it meanwhile
            if slot is None:
                name = adapter_name(f"{record.expert_id}__{record.revision[:12]}")
                self._load_adapter(record, name, folder)
                seconds = time.perf_counter() - start
                slot = AdapterSlot(key, name, record.expert_id, load_seconds=seconds, pinned=pin,
                                   nbytes=(folder / ADAPTER_WEIGHTS_FILENAME).stat().st_size)
                slot.in_use += 1
                self._cache.add(slot)
                self.stats.add(cache_misses=int(count), loads=1, load_seconds=seconds)
                return slot, True
            return self._hold_loaded(slot, pin, count), False

    def _hold_loaded(self, slot: AdapterSlot, pin: bool, count: bool) -> AdapterSlot:
        """Hold an adapter found in the cache (a hit), pinning it if asked (under the lock)."""
        slot.in_use += 1
        slot.pinned = slot.pinned or pin
        self.stats.add(cache_hits=int(count))
        return slot

    def _release(self, slot: AdapterSlot) -> None:
        """Let go of a held adapter; the cache shrinks back to its budget if holds had kept it over."""
        with self._lock:
            slot.in_use = max(0, slot.in_use - 1)
            if slot.in_use == 0 and slot.key in self._cache:
                self._cache.shrink()

    @contextlib.contextmanager
    def hold(self, experts: Sequence[str | ExpertRecord]) -> Iterator[list[AdapterSlot]]:
        """Load (if needed) and hold the adapters of ``experts`` (ids, repo ids or records) for the block."""
        slots: list[AdapterSlot] = []
        try:
            for expert in experts:
                record = expert if isinstance(expert, ExpertRecord) else self._registry.get(expert)
                slots.append(self._acquire(record)[0])
            yield slots
        finally:
            for slot in slots:
                self._release(slot)

    def activate(self, expert: str) -> tuple[str, bool, float]:
        """Make ``expert`` (id or repo id) the active adapter, loading it first if it is not cached.

        Returns:
            ``(adapter_name, loaded_now, seconds)``: ``loaded_now`` is False for a warm switch.
        """
        start = time.perf_counter()
        record = self._registry.get(expert)
        slot, loaded = self._acquire(record)
        try:
            with self._lock:
                self._peft.set_adapter(slot.name, inference_mode=True)
        finally:
            self._release(slot)
        return slot.name, loaded, time.perf_counter() - start

    def pin(self, expert: str) -> AdapterSlot:
        """Load ``expert`` (id or repo id) and keep it loaded: it is never evicted until :meth:`unpin`.

        Pinned adapters still count towards the budget; with every slot pinned the cache grows past it
        rather than evict one.
        """
        slot, _ = self._acquire(self._registry.get(expert), pin=True)
        self._release(slot)
        return slot

    def unpin(self, expert: str) -> bool:
        """Let ``expert`` be evicted again; True if it was pinned. Evicts down to the budget at once."""
        record = self._registry.get(expert)
        with self._lock:
            slot = self._cache.peek((record.repo_id, record.revision))
            if slot is None or not slot.pinned:
                return False
            slot.pinned = False
            self._cache.shrink()
            return True

    def prefetch(self, records: Sequence[ExpertRecord]) -> list[Future]:
        """Fetch ``records`` in the background: download (verified) into the HF cache, and load onto the base
        model while the cache has room. Never evicts; errors are logged and counted, never raised.

        Returns:
            The futures of the prefetches started now (those already loaded or under way are skipped).
        """
        started = []
        with self._lock:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moin-prefetch")
            for record in records:
                key = (record.repo_id, record.revision)
                if key in self._cache or (key in self._prefetching and not self._prefetching[key].done()):
                    continue
                future = self._prefetcher.submit(self._prefetch_one, record)
                self._prefetching[key] = future
                started.append(future)
        return started

    def _prefetch_one(self, record: ExpertRecord) -> bool:
        key = (record.repo_id, record.revision)
        try:
            folder = self.download(record)
            nbytes = (folder / ADAPTER_WEIGHTS_FILENAME).stat().st_size
            with self._lock:
                if key in self._cache or not self._cache.has_room(nbytes):
                    self.stats.add(prefetched=1)
                    return False
            slot, _ = self._acquire(record, count=False)
            self._release(slot)
            self.stats.add(prefetched=1)
            return True
        except Exception as err:  # a prefetch must never break serving
            logger.warning("prefetch of %s failed: %s", record.repo_id, str(err).splitlines()[0][:200])
            self.stats.add(prefetch_errors=1)
            return False

    def close(self) -> None:
        """Stop the prefetch thread (waiting for a running prefetch)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None

    @contextlib.contextmanager
    def _using(self, adapter: str | None) -> Iterator[Any]:
        """The model with ``adapter`` active, or with every adapter off for ``None`` (under the lock)."""
        with self._lock:
            if adapter is not None:
                self._peft.set_adapter(adapter, inference_mode=True)
                yield self._peft
            elif self._peft is not None:
                with self._peft.disable_adapter():
                    yield self._peft
            else:
                yield self._base

    @contextlib.contextmanager
    def using_mixture(self, mixture: Mixture) -> Iterator[Any]:
        """The model with ``mixture`` active (under the lock for the whole block): its experts are loaded and
        held, one expert is set active, several are combined with weights into the mixture slot (rebuilt only
        when the mixture changes); no expert means the base model."""
        records = [self._registry.get(e) for e in mixture.experts]
        with self.hold(records) as slots, self._lock:
            if not slots:
                with self._using(None) as model:
                    yield model
                return
            if len(slots) == 1:
                with self._using(slots[0].name) as model:
                    yield model
                return
            key = tuple((s.name, round(w, 6)) for s, w in zip(slots, mixture.weights, strict=True))
            if key != self._mixture_key:
                self._drop_mixture()
                self._peft.add_weighted_adapter([s.name for s in slots], list(mixture.weights),
                                                adapter_name=MIXTURE_SLOT, combination_type="cat")
                self._mixture_key = key
                self.stats.add(mixtures=1)
            with self._using(MIXTURE_SLOT) as model:
                yield model

    # ----------------------------------------------------------------------------------------- info

    def cache_info(self) -> dict[str, Any]:
        """Loaded adapters (least recently used first), the budget, and the bytes held."""
        with self._lock:
            return {"capacity": self._cache.capacity, "max_bytes": self._cache.max_bytes,
                    "bytes": self._cache.nbytes, "loaded": [slot.to_dict() for slot in self._cache.slots()]}

    def expert_url(self, record: ExpertRecord) -> str:
        """The model page (card) of an expert."""
        return f"{self.endpoint}/{record.repo_id}"
