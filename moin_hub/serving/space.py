"""The engine behind the MoIN router Space: the serving engine (:mod:`moin_hub.serving.engine`) plus side-by-side
generation and per-token scores.

A query is embedded and routed to the nearest topic centroid (:class:`~moin_hub.Router`). When the best
similarity is below a threshold, no expert matches and the base model answers. Otherwise the chosen
expert is fetched through the public, verified pull path (:func:`moin_hub.pull`: the registry's pinned
commit, every file's sha256 checked, safetensors only), loaded as a PEFT adapter on the one base model
(``load_adapter``) and made active with ``set_adapter``. Loaded adapters stay in a small LRU cache keyed
by ``(repo_id, commit)``, so switching between experts is a pointer swap, not a reload; an adapter in use
by a running generation is never evicted.

Nothing here imports gradio: the UI lives in :mod:`moin_hub.serving.space_app`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EmptyQueryError
from ..hub.config import ExpertRecord
from ..hub.registry import Registry
from ..hub.router import Route, RouteResult
from .cache import DEFAULT_CACHE_SIZE
from .engine import ExpertEngine

logger = logging.getLogger(__name__)

#: Below this cosine similarity a query matches no expert and the base model answers, for a registry
#: without a calibrated ``default_threshold`` (``moin-hub registry calibrate --write`` sets one, on
#: calibrated scores). MiniLM similarities of on-topic queries to topic centroids are ~0.13-0.6;
#: greetings, arithmetic or code questions against the Brown demo experts score ~0.04-0.07.
DEFAULT_THRESHOLD = 0.1
#: Example queries the Space offers, drawn from the registry's experts.
MAX_EXAMPLES = 4
#: Longest text (characters) the Space accepts in any box.
MAX_INPUT_CHARS = 4000
DEFAULT_MAX_NEW_TOKENS = 48
#: The largest ``max_new_tokens`` a request may ask for.
MAX_NEW_TOKENS_LIMIT = 256
#: Greedy decoding divides (or multiplies) the logits of already generated tokens by this.
REPETITION_PENALTY = 1.3
#: Most tokens of the user's text scored per request.
MAX_SCORED_TOKENS = 1024


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


@dataclass(frozen=True)
class SpaceRoute:
    """A routed query as the Space shows it: the candidates, whether the best one matches, the latency."""

    result: RouteResult
    threshold: float
    latency_ms: float
    calibrated: bool = True  # the threshold applies to calibrated scores where rows have them (else cosine)
    fallback: ExpertRecord | None = None  # the registry's fallback expert, for queries below the threshold

    @property
    def routes(self) -> tuple[Route, ...]:
        return self.result.routes

    @property
    def best(self) -> Route:
        return self.result.best

    @property
    def matched(self) -> bool:
        """True if the best expert reaches the threshold: its calibrated score where its row has similarity
        statistics and the threshold is calibrated, else its cosine similarity."""
        best = self.result.best
        return best.clears(self.threshold) if self.calibrated else best.similarity >= self.threshold

    @property
    def on_score(self) -> bool:
        """True when the threshold was compared with the best route's calibrated score (not its cosine)."""
        return self.calibrated and self.result.best.score is not None

    @property
    def expert(self) -> ExpertRecord | None:
        """The chosen expert: the best route's, below the threshold the registry's fallback expert, or None
        when the base model answers."""
        return self.best.expert if self.matched else self.fallback


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


@dataclass
class _Stream:
    """One decoding stream (base or expert): its adapter, ids so far, cache, and whether it ended."""

    adapter: str | None
    ids: list[int] = field(default_factory=list)
    cache: Any = None
    next_input: Any = None
    done: bool = False


class SpaceEngine(ExpertEngine):
    """Registry + router + one base model + an LRU of PEFT adapters, for the Space (and benchmarks).

    Thread-safe: every forward pass and every adapter switch happens under one lock; a generation takes
    the lock per token, so several users interleave.

    Args:
        registry / revision / endpoint / token / base_model / cache_size / device: as in
            :class:`~moin_hub.serving.engine.ExpertEngine`.
        threshold: below it the base model answers; compared with a route's calibrated score where the
            expert's row has similarity statistics, else with its cosine (as ``route`` and ``serve`` do).
            Default: the registry's calibrated ``default_threshold``, else :data:`DEFAULT_THRESHOLD` on
            the cosine.
        max_new_tokens_limit: the most tokens one request may generate.
        max_input_chars: the longest text accepted.

    Example:
        >>> engine = SpaceEngine("acme/moin-registry")  # doctest: +SKIP
        >>> engine.route("How long should bread dough rise?").expert.expert_id  # doctest: +SKIP
        'topic-03'
    """

    def __init__(self, registry: str | Registry, *, revision: str | None = None, endpoint: str | None = None,
                 token: str | bool | None = None, base_model: str | None = None,
                 threshold: float | None = None, cache_size: int = DEFAULT_CACHE_SIZE,
                 max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT, max_input_chars: int = MAX_INPUT_CHARS,
                 device: str | None = None):
        if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                      or not math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}.")
        super().__init__(registry, revision=revision, endpoint=endpoint, token=token, base_model=base_model,
                         cache_size=cache_size, device=device)
        self._threshold = None if threshold is None else float(threshold)
        self._examples: list[str] | None = None
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        self.max_input_chars = int(max_input_chars)

    # ----------------------------------------------------------------------------------------- routing

    @property
    def threshold(self) -> float:
        """The threshold in force: the one given, else the registry's calibrated default, else the cosine
        :data:`DEFAULT_THRESHOLD` (followed as the registry moves)."""
        if self._threshold is not None:
            return self._threshold
        default = self.registry.manifest.default_threshold
        return DEFAULT_THRESHOLD if default is None else default

    @property
    def threshold_calibrated(self) -> bool:
        """False only when the default cosine threshold is in force (no threshold given, none calibrated)."""
        return self._threshold is not None or self.registry.manifest.default_threshold is not None

    def example_queries(self, limit: int = MAX_EXAMPLES) -> list[str]:
        """Example queries from the registry: the start of a sample document of each of its largest experts
        (their ``moin_expert.json`` at the pinned commit), else their keywords. Computed once.

        Never raises for a missing or unreadable file: an expert without samples offers its keywords.
        """
        if self._examples is None:
            from ..hub.cards import example_prompt

            experts = sorted(self.registry, key=lambda r: (-r.n_docs, r.expert_id))[:limit]
            examples = []
            for record in experts:
                prompt = example_prompt(self._samples(record), list(record.keywords))
                if prompt not in examples:
                    examples.append(prompt)
            self._examples = examples
        return list(self._examples)

    def _samples(self, record: ExpertRecord) -> list[str]:
        from huggingface_hub import hf_hub_download

        from ..hub.config import EXPERT_METADATA_FILENAME, ExpertMetadata

        try:
            path = hf_hub_download(record.repo_id, EXPERT_METADATA_FILENAME, revision=record.revision,
                                   endpoint=self.endpoint, token=self._token)
            with open(path, encoding="utf-8") as handle:
                return ExpertMetadata.from_dict(json.load(handle)).samples
        except Exception as err:  # noqa: BLE001 - an example is optional: fall back to the keywords
            logger.info("no samples for %s: %s", record.expert_id, err)
            return []

    def route(self, query: str, *, k: int = 3) -> SpaceRoute:
        """Route ``query`` to its ``k`` nearest experts.

        Raises:
            EmptyQueryError / ValueError: empty or oversized input.
            ExpertNotFoundError: the registry has no experts.
        """
        text = check_text(query, limit=self.max_input_chars)
        start = time.perf_counter()
        result = self._router.route(text, k=k)
        return SpaceRoute(result, self.threshold, (time.perf_counter() - start) * 1000,
                          calibrated=self.threshold_calibrated, fallback=self.registry.fallback)

    # ----------------------------------------------------------------------------------------- generation

    def clamp_new_tokens(self, max_new_tokens: Any) -> int:
        """``max_new_tokens`` as an int in ``[1, max_new_tokens_limit]``."""
        try:
            value = int(max_new_tokens)
        except (TypeError, ValueError):
            raise ValueError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}.") from None
        return max(1, min(value, self.max_new_tokens_limit))

    def _prompt_ids(self, text: str, reserve: int, chat: bool) -> list[int]:
        if chat:
            return self.encode_chat([{"role": "user", "content": text}], reserve=reserve)
        return self.encode(text, reserve=reserve)

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
        if route.expert is not None:
            slot, _ = self._acquire(route.expert)
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
