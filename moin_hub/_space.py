"""The engine behind the MoIN router Space: one registry, one router, ONE base model, an LRU of adapters.

A query is embedded and routed to the nearest topic centroid (:class:`~moin_hub.Router`). When the best
similarity is below a threshold, no expert matches and the base model answers. Otherwise the chosen
expert is fetched through the public, verified pull path (:func:`moin_hub.pull`: the registry's pinned
commit, every file's sha256 checked, safetensors only), loaded as a PEFT adapter on the one base model
(``load_adapter``) and made active with ``set_adapter``. Loaded adapters stay in a small LRU cache keyed
by ``(repo_id, commit)``, so switching between experts is a pointer swap, not a reload; an adapter in use
by a running generation is never evicted.

Nothing here imports gradio: the UI lives in :mod:`moin_hub._space_app`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._config import ADAPTER_WEIGHTS_FILENAME, ExpertRecord, PinnedModel
from ._hub import get_api, resolve_endpoint
from ._registry import Registry, resolve_pinned
from ._router import Route, Router, RouteResult
from .errors import EmptyQueryError, IncompatibleExpertError, MoinHubError

logger = logging.getLogger(__name__)

#: Below this cosine similarity a query matches no expert and the base model answers. MiniLM
#: similarities of on-topic queries to topic centroids are ~0.13-0.6; greetings, arithmetic or code
#: questions against the Brown demo experts score ~0.04-0.07.
DEFAULT_THRESHOLD = 0.1
#: Longest text (characters) the Space accepts in any box.
MAX_INPUT_CHARS = 4000
DEFAULT_MAX_NEW_TOKENS = 48
#: The largest ``max_new_tokens`` a request may ask for.
MAX_NEW_TOKENS_LIMIT = 256
#: Adapters kept loaded on the base model.
DEFAULT_CACHE_SIZE = 4
#: Greedy decoding divides (or multiplies) the logits of already generated tokens by this.
REPETITION_PENALTY = 1.3
#: Most tokens of the user's text scored per request.
MAX_SCORED_TOKENS = 1024

AdapterKey = tuple[str, str]  # (repo_id, commit sha)


def check_text(text: Any, *, limit: int = MAX_INPUT_CHARS, what: str = "query") -> str:
    """Check user input and return it stripped.

    Raises:
        EmptyQueryError: the text is empty or whitespace.
        ValueError: the text is not a string or longer than ``limit`` characters (message says both).
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ValueError(f"The {what} must be text, got {type(text).__name__}.")
    stripped = text.strip()
    if not stripped:
        raise EmptyQueryError()
    if len(stripped) > limit:
        raise ValueError(f"The {what} is {len(stripped):,} characters long; the limit is {limit:,}. "
                         "Shorten it and try again.")
    return stripped


def plan_evictions(order: Sequence[Hashable], capacity: int, in_use: Collection[Hashable] = ()) -> list[Hashable]:
    """Which cached adapters to drop so that at most ``capacity`` stay: least recently used first.

    Args:
        order: cached keys, least recently used first.
        capacity: how many may stay (>= 0).
        in_use: keys a running request holds; they are never evicted, even if the cache stays over capacity.

    Returns:
        The keys to evict, in eviction order.

    Example:
        >>> plan_evictions(["a", "b", "c"], 2, in_use={"a"})
        ['b']
    """
    excess = len(order) - max(0, capacity)
    victims = []
    for key in order:
        if excess <= 0:
            break
        if key in in_use:
            continue
        victims.append(key)
        excess -= 1
    return victims


@dataclass
class AdapterSlot:
    """A loaded adapter: its PEFT name, its expert, and how many running requests hold it."""

    key: AdapterKey
    name: str
    expert_id: str
    in_use: int = 0
    load_seconds: float = 0.0


class AdapterCache:
    """An LRU of loaded adapters with pinning; eviction is decided by :func:`plan_evictions`.

    Not thread-safe on its own: the engine calls it under its lock.

    Args:
        capacity: adapters kept loaded.
        on_evict: called with each evicted :class:`AdapterSlot` (the engine deletes the PEFT adapter).
    """

    def __init__(self, capacity: int, on_evict: Callable[[AdapterSlot], None]):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"cache_size must be a positive integer, got {capacity!r}.")
        self.capacity = capacity
        self._on_evict = on_evict
        self._slots: OrderedDict[AdapterKey, AdapterSlot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def keys(self) -> list[AdapterKey]:
        """Cached keys, least recently used first."""
        return list(self._slots)

    def slots(self) -> list[AdapterSlot]:
        """Cached slots, least recently used first."""
        return list(self._slots.values())

    def get(self, key: AdapterKey) -> AdapterSlot | None:
        """The slot of ``key`` (marked most recently used), or None."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
        return slot

    def add(self, slot: AdapterSlot) -> list[AdapterSlot]:
        """Insert ``slot`` as most recently used and evict over capacity; return the evicted slots."""
        self._slots[slot.key] = slot
        self._slots.move_to_end(slot.key)
        in_use = {key for key, s in self._slots.items() if s.in_use > 0 or key == slot.key}
        evicted = []
        for key in plan_evictions(list(self._slots), self.capacity, in_use):
            victim = self._slots.pop(key)
            self._on_evict(victim)
            evicted.append(victim)
        return evicted


@dataclass(frozen=True)
class SpaceRoute:
    """A routed query as the Space shows it: the candidates, whether the best one matches, the latency."""

    result: RouteResult
    threshold: float
    latency_ms: float

    @property
    def routes(self) -> tuple[Route, ...]:
        return self.result.routes

    @property
    def best(self) -> Route:
        return self.result.best

    @property
    def matched(self) -> bool:
        """True if the best expert's similarity reaches the threshold."""
        return self.result.best.similarity >= self.threshold

    @property
    def expert(self) -> ExpertRecord | None:
        """The chosen expert, or None when the base model answers."""
        return self.best.expert if self.matched else None


@dataclass(frozen=True)
class Generation:
    """Text generated so far by the base model and by the routed expert (the base model again on fallback)."""

    base: str
    expert: str
    new_tokens: int
    done: bool


@dataclass(frozen=True)
class TokenScores:
    """Per-token negative log-likelihood (nats) of a text under the base model and under an expert.

    ``tokens[i]`` is predicted from the tokens before it; the first token of the text is not scored.
    """

    tokens: tuple[str, ...]
    base_nll: tuple[float, ...]
    expert_nll: tuple[float, ...]
    expert_id: str
    route: SpaceRoute
    truncated: bool = False

    @property
    def base_ppl(self) -> float:
        return math.exp(sum(self.base_nll) / len(self.base_nll))

    @property
    def expert_ppl(self) -> float:
        return math.exp(sum(self.expert_nll) / len(self.expert_nll))


def centroid_map(centroids: np.ndarray) -> np.ndarray:
    """2-D coordinates of L2-normalised centroids by PCA (SVD); ``float32[n, 2]``.

    One centroid sits at the origin; with two, the second axis is zero.

    Example:
        >>> centroid_map(np.eye(3, dtype=np.float32)).shape
        (3, 2)
    """
    points = np.asarray(centroids, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"centroids must be a 2-d array, got shape {points.shape}.")
    if points.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.float32)
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    points = points / np.where(norms == 0, 1.0, norms)
    centered = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    coords = centered @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    for axis in range(2):  # deterministic orientation: the largest |value| of each axis is positive
        column = coords[:, axis]
        if column.size and column[np.argmax(np.abs(column))] < 0:
            coords[:, axis] = -column
    return coords.astype(np.float32)


def next_token(logits: Any, history: Sequence[int], penalty: float = REPETITION_PENALTY) -> int:
    """Greedy choice with a repetition penalty on the tokens already in ``history`` (logits: 1-d tensor)."""
    logits = logits.float().clone()
    if history and penalty != 1.0:
        import torch

        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    return int(logits.argmax())


def parse_base_model(value: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``"org/name"`` -> ``("org/name", None)``."""
    repo_id, _, revision = value.strip().partition("@")
    return repo_id, (revision or None)


@dataclass
class _Stream:
    """One decoding stream (base or expert): its adapter, ids so far, cache, and whether it ended."""

    adapter: str | None
    ids: list[int] = field(default_factory=list)
    cache: Any = None
    next_input: Any = None
    done: bool = False


class SpaceEngine:
    """Registry + router + one base model + an LRU of PEFT adapters, for the Space (and benchmarks).

    Thread-safe: every forward pass and every adapter switch happens under one lock; a generation takes
    the lock per token, so several users interleave.

    Args:
        registry: the registry id (``"org/name"``) or a loaded :class:`~moin_hub.Registry`.
        revision: registry revision (default: head of main; :meth:`refresh` follows the head).
        endpoint / token: Hub settings (``token=None`` lets the Hub client find one; it is never shown).
        base_model: override the registry's base model: a Hub id (``"org/name"`` or ``"org/name@rev"``,
            resolved to a commit) or a local folder. Its architecture must match the experts'.
        threshold: the similarity below which the base model answers.
        cache_size: adapters kept loaded.
        max_new_tokens_limit: the most tokens one request may generate.
        max_input_chars: the longest text accepted.
        device: torch device (default: CUDA if available, else CPU).

    Example:
        >>> engine = SpaceEngine("acme/moin-registry")  # doctest: +SKIP
        >>> engine.route("How long should bread dough rise?").expert.expert_id  # doctest: +SKIP
        'topic-03'
    """

    def __init__(self, registry: str | Registry, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, base_model: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD, cache_size: int = DEFAULT_CACHE_SIZE,
                 max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT, max_input_chars: int = MAX_INPUT_CHARS,
                 device: str | None = None):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number between -1 and 1, got {threshold!r}.")
        if isinstance(registry, Registry):
            self._registry = registry
        else:
            self._registry = Registry.load(registry, revision=revision, endpoint=endpoint, token=token)
        self._follow_head = revision is None
        self.endpoint = self._registry.endpoint if endpoint is None else resolve_endpoint(endpoint)
        self._token = token
        self.threshold = float(threshold)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.max_input_chars = int(max_input_chars)
        self.base_model_override = base_model.strip() if base_model else None
        self._device = device
        self._router = Router(self._registry)
        self._lock = threading.RLock()
        self._base: Any = None
        self._peft: Any = None
        self._tokenizer: Any = None
        self.base_model_label = ""
        self._cache = AdapterCache(cache_size, self._evict)

    # ----------------------------------------------------------------------------------------- registry

    @property
    def registry(self) -> Registry:
        """The registry at the commit the Space currently serves."""
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

    # ----------------------------------------------------------------------------------------- routing

    def route(self, query: str, *, k: int = 3) -> SpaceRoute:
        """Route ``query`` to its ``k`` nearest experts.

        Raises:
            EmptyQueryError / ValueError: empty or oversized input.
            ExpertNotFoundError: the registry has no experts.
        """
        text = check_text(query, limit=self.max_input_chars)
        start = time.perf_counter()
        result = self._router.route(text, k=k)
        return SpaceRoute(result, self.threshold, (time.perf_counter() - start) * 1000)

    # ----------------------------------------------------------------------------------------- models

    def warm_up(self) -> None:
        """Load the embedder and the base model now, so that the first request is fast."""
        _ = self._router.embedder
        self._load_base()

    def _load_base(self) -> tuple[Any, Any]:
        with self._lock:
            if self._base is not None:
                return self._base, self._tokenizer
            import torch

            from ._evaluate import load_base
            from ._loading import load_base_model

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
            self._base, self._tokenizer = model, tokenizer
            return model, tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._load_base()[1]

    def cached_experts(self) -> list[str]:
        """Expert ids whose adapters are loaded, least recently used first."""
        with self._lock:
            return [slot.expert_id for slot in self._cache.slots()]

    def _evict(self, slot: AdapterSlot) -> None:
        """Delete an evicted adapter's weights from the base model (called by the cache, under the lock)."""
        logger.info("evicting adapter %s (%s@%s)", slot.name, slot.key[0], slot.key[1][:12])
        if self._peft.active_adapter == slot.name:  # hand "active" to the newest adapter first
            self._peft.set_adapter(self._cache.slots()[-1].name, inference_mode=True)
        self._peft.delete_adapter(slot.name)

    def _load_adapter(self, record: ExpertRecord, name: str, folder: Path) -> None:
        """Load a verified adapter folder onto the base model as ``name`` (under the lock)."""
        from peft import PeftModel

        from ._loading import check_adapter_effective, quiet_peft

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
            check_adapter_effective(self._peft, name, weights_path=folder / ADAPTER_WEIGHTS_FILENAME,
                                    repo_id=record.repo_id)
        except MoinHubError:
            if len(self._peft.peft_config) > 1:
                self._peft.delete_adapter(name)
            else:  # the only adapter: take the LoRA layers out of the base model again
                self._peft.unload()
                self._peft = None
            raise

    def _acquire(self, record: ExpertRecord) -> tuple[AdapterSlot, bool]:
        """The loaded adapter of ``record`` (pulled, verified and loaded if needed), held until released.

        Returns:
            ``(slot, loaded_now)``.
        """
        from ._loading import adapter_name
        from ._pull import download_expert

        key = (record.repo_id, record.revision)
        with self._lock:
            slot = self._cache.get(key)
            if slot is not None:
                slot.in_use += 1
                return slot, False
        start = time.perf_counter()
        # pull's verified download: the pinned commit, the sha256 of every file, no pickle in the repo,
        # the adapter names the registry's base model
        folder = download_expert(record, endpoint=self.endpoint, token=self._token,
                                 base_model=self._registry.manifest.base_model)
        with self._lock:
            slot = self._cache.get(key)  # another request may have loaded it meanwhile
            if slot is None:
                name = adapter_name(f"{record.expert_id}__{record.revision[:12]}")
                self._load_adapter(record, name, folder)
                slot = AdapterSlot(key, name, record.expert_id, load_seconds=time.perf_counter() - start)
                slot.in_use += 1
                self._cache.add(slot)
                return slot, True
            slot.in_use += 1
            return slot, False

    def _release(self, slot: AdapterSlot) -> None:
        with self._lock:
            slot.in_use = max(0, slot.in_use - 1)

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

    # ----------------------------------------------------------------------------------------- generation

    def clamp_new_tokens(self, max_new_tokens: Any) -> int:
        """``max_new_tokens`` as an int in ``[1, max_new_tokens_limit]``."""
        try:
            value = int(max_new_tokens)
        except (TypeError, ValueError):
            raise ValueError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}.") from None
        return max(1, min(value, self.max_new_tokens_limit))

    @property
    def has_chat_template(self) -> bool:
        """True if the base model's tokenizer has a chat template (an instruct model)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _prompt_ids(self, text: str, reserve: int, chat: bool) -> list[int]:
        tokenizer = self.tokenizer
        if chat and self.has_chat_template:
            formatted = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = tokenizer(formatted, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        limit = getattr(self._base.config, "max_position_embeddings", None) or 2048
        keep = max(1, limit - reserve)
        return ids[-keep:]

    def _step(self, stream: _Stream) -> int:
        import torch

        with self._using(stream.adapter) as model, torch.inference_mode():
            out = model(input_ids=stream.next_input, past_key_values=stream.cache, use_cache=True)
        stream.cache = out.past_key_values
        token = next_token(out.logits[0, -1], stream.ids)
        stream.ids.append(token)
        stream.next_input = torch.tensor([[token]], device=stream.next_input.device)
        return token

    def generate(self, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 route: SpaceRoute | None = None, chat: bool = True) -> Iterator[Generation]:
        """Answer (or continue) ``prompt`` with the base model and with its routed expert, one token of each
        per step.

        Decoding is greedy with a repetition penalty (deterministic). When no expert matches, the
        "expert" text is the base model's. Routing always uses the raw prompt.

        Args:
            prompt: the user's text.
            max_new_tokens: clamped to ``[1, max_new_tokens_limit]``.
            route: the prompt's route, if already computed.
            chat: wrap the prompt in the tokenizer's chat template (instruct models; without a template the
                prompt is continued as plain text). An instruct model given a bare question often ends at once.

        Yields:
            :class:`Generation` snapshots; the last has ``done=True``.

        Raises:
            EmptyQueryError / ValueError: empty or oversized prompt.
        """
        import torch

        text = check_text(prompt, limit=self.max_input_chars, what="prompt")
        n_new = self.clamp_new_tokens(max_new_tokens)
        route = route or self.route(text)
        base_model, tokenizer = self._load_base()
        slot = None
        if route.matched:
            slot, _ = self._acquire(route.best.expert)
        try:
            device = next(base_model.parameters()).device
            prompt_ids = torch.tensor([self._prompt_ids(text, n_new, chat)], device=device)
            streams = [_Stream(None, next_input=prompt_ids)]
            if slot is not None:
                streams.append(_Stream(slot.name, next_input=prompt_ids))
            eos = tokenizer.eos_token_id
            for step in range(n_new):
                for stream in streams:
                    if not stream.done and self._step(stream) == eos:
                        stream.done = True
                texts = [tokenizer.decode(s.ids, skip_special_tokens=True) for s in streams]
                finished = step == n_new - 1 or all(s.done for s in streams)
                yield Generation(texts[0], texts[-1], step + 1, finished)
                if finished:
                    return
        finally:
            if slot is not None:
                self._release(slot)

    # ----------------------------------------------------------------------------------------- scoring

    def score(self, text: str) -> TokenScores:
        """Per-token NLL of ``text`` under the base model and under the expert its content routes to.

        The nearest expert scores the text even when its similarity is below the threshold (the route
        says so), so that there is always a comparison.

        Raises:
            EmptyQueryError / ValueError: empty or oversized text, or a text of a single token.
        """
        import torch
        import torch.nn.functional as F

        text = check_text(text, limit=self.max_input_chars, what="text")
        route = self.route(text)
        base_model, tokenizer = self._load_base()
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        limit = min(MAX_SCORED_TOKENS, getattr(base_model.config, "max_position_embeddings", None) or 2048)
        truncated = len(ids) > limit
        ids = ids[:limit]
        if len(ids) < 2:
            raise ValueError("The text is a single token; give at least two tokens to score.")
        device = next(base_model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        targets = inputs[0, 1:]
        slot, _ = self._acquire(route.best.expert)
        try:
            nll = {}
            for kind, adapter in (("base", None), ("expert", slot.name)):
                with self._using(adapter) as model, torch.inference_mode():
                    logits = model(input_ids=inputs).logits[0, :-1].float()
                nll[kind] = F.cross_entropy(logits, targets, reduction="none").tolist()
        finally:
            self._release(slot)
        tokens = tuple(tokenizer.decode([token]) for token in ids[1:])
        return TokenScores(tokens, tuple(nll["base"]), tuple(nll["expert"]), route.best.expert.expert_id, route,
                           truncated)

    # ----------------------------------------------------------------------------------------- info

    def cache_info(self) -> dict[str, Any]:
        """Loaded adapters (least recently used first) and the cache's capacity."""
        with self._lock:
            slots = self._cache.slots()
            return {"capacity": self._cache.capacity,
                    "loaded": [{"expert_id": s.expert_id, "repo_id": s.key[0], "revision": s.key[1],
                                "adapter": s.name, "in_use": s.in_use, "load_seconds": round(s.load_seconds, 3)}
                               for s in slots]}

    def expert_url(self, record: ExpertRecord) -> str:
        """The model page (card) of an expert."""
        return f"{self.endpoint}/{record.repo_id}"

    @property
    def base_model(self) -> PinnedModel:
        """The registry's pinned base model (see ``base_model_label`` for what is actually loaded)."""
        return self._registry.manifest.base_model
