"""Scoring the routing modes on exactly the same tokens: every held-out text alone, under the mixture it gets.

Rows of the table (``report["perplexity"][...]["modes"]``):

- routing modes: ``top1`` (MoIN), ``topk`` and ``adaptive`` (query-level mixtures of
  :mod:`moin_hub.hub.mixing`), ``arrow`` (token-level mixing of all experts, :mod:`moin_hub.hub.arrow`);
- references on the same tokens: ``base`` (no adapter), ``oracle`` (each text's own topic expert),
  ``dense`` (one LoRA on all topics, same total tokens) and ``seed`` (branch-train's shared seed), when given.

Each text is scored on its own first ``seq_len`` tokens (:func:`~moin_hub.pipeline.scoring.texts_nlls`), so
every row scores the same tokens. Each distinct mixture is made active once for all topics, and each
(mixture, text) pair is scored once however many rows share it (``top1`` and ``oracle`` agree on most texts;
``adaptive`` often picks one expert, as ``top1`` does). A mixture of several experts runs them all active at
once with each LoRA update scaled by its weight (:func:`weighted_experts`): the same ``sum_i w_i * delta_i`` as
the ``cat`` adapter :func:`~moin_hub.hub.mixing.apply_mixture` builds, without building one per text (topk
mixtures are nearly all distinct, and building each one cost more than scoring its text).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..hub.arrow import ArrowSpec, ArrowStats, arrow_lora
from ..hub.loading import adapter_name
from ..hub.mixing import MODES, Mixture, mix_weights
from .scoring import texts_nlls

#: The routing modes ``evaluate`` scores: the query-level ones of :mod:`moin_hub.hub.mixing`, and ``arrow``.
ARROW_MODE = "arrow"
EVAL_MODES = (*MODES, ARROW_MODE)
#: The reference rows scored beside the modes, on the same tokens.
BASE_MODE, ORACLE_ROW, DENSE_ROW, SEED_ROW = "base", "oracle", "dense", "seed"
#: Decimals a mixture's weights are rounded to before texts are grouped by mixture: texts whose weights agree
#: to 0.01 share one adapter, so a mixture is built once, not once per text.
MIX_DECIMALS = 2
Candidates = Sequence[tuple[str, float]]  # one text's (expert_id, similarity) pairs, best first
MixKey = tuple[tuple[str, float], ...]  # a mixture's (expert_id, rounded weight) pairs, best first; () = the base
#: What a text is scored with: a mixture, or the name of a whole adapter slot ("arrow", "dense", "seed").
Key = MixKey | str


@contextlib.contextmanager
def _using(model: Any, expert_id: str | None) -> Iterator[None]:
    """Run ``model`` with expert ``expert_id``'s adapter, or with no adapter for ``None``."""
    if expert_id is not None:
        model.set_adapter(adapter_name(expert_id))
        yield
    elif hasattr(model, "disable_adapter"):  # a PeftModel
        with model.disable_adapter():
            yield
    else:  # the plain base model
        yield


def text_mixture(candidates: Candidates, mode: str, *, k: int = 3, temperature: float = 0.05, mass: float = 0.8,
                 threshold: float | None = None) -> MixKey:
    """The mixture one text gets in ``mode``, with its weights rounded to :data:`MIX_DECIMALS` decimals.

    Args:
        candidates: the text's experts and their similarities to its query, best first.
        mode / k / temperature / mass / threshold: as in :func:`~moin_hub.hub.mixing.mix_weights`.

    Returns:
        ``((expert_id, weight), ...)`` best first, experts whose weight rounds to 0 left out (the weights
        are renormalised when the mixture is built); ``()`` below the threshold: the base model.

    Example:
        >>> text_mixture([("a", 0.62), ("b", 0.60), ("c", 0.2)], "topk")
        (('a', 0.6), ('b', 0.4))
    """
    weights = mix_weights([s for _, s in candidates], mode=mode, k=k, temperature=temperature, mass=mass,
                          threshold=threshold)
    pairs = [(e, w) for (e, _), w in zip(candidates, weights, strict=False) if w > 0]
    rounded = tuple((e, round(w, MIX_DECIMALS)) for e, w in pairs if round(w, MIX_DECIMALS) > 0)
    return rounded or tuple(pairs)  # over 200 near-equal experts every weight rounds to 0: keep them exact


def _mixture_of(key: MixKey) -> Mixture:
    total = sum(w for _, w in key)
    return Mixture(tuple(e for e, _ in key), tuple(w / total for _, w in key), "eval")


@contextlib.contextmanager
def _mixed(model: Any, key: Key, slots: Mapping[str, str], arrow: tuple[list[str], ArrowSpec],
           stats: ArrowStats) -> Iterator[None]:
    """Run ``model`` with ``key``: a mixture (one expert: its slot; several: ``moin__mixture``; none: the base),
    the Arrow mixture of every expert, or a named whole adapter (``slots``: row -> slot)."""
    if key == ARROW_MODE:
        with arrow_lora(model, arrow[0], arrow[1], stats):
            yield
    elif isinstance(key, str):
        model.set_adapter(slots[key])
        yield
    elif not key:
        with _using(model, None):
            yield
    elif len(key) == 1:
        model.set_adapter(adapter_name(key[0][0]))
        yield
    else:
        with weighted_experts(model, _mixture_of(key)):
            yield


@contextlib.contextmanager
def weighted_experts(model: Any, mixture: Mixture) -> Iterator[Any]:
    """Run ``model`` (a PeftModel holding each expert as ``moin__<id>``) with ``mixture``'s experts all active,
    each one's LoRA scaling multiplied by its weight: every LoRA layer adds ``sum_i w_i * scaling_i * B_i A_i x``,
    exactly the update of the ``cat`` adapter :func:`~moin_hub.hub.mixing.apply_mixture` builds, with no new
    adapter. The scalings and the active adapter are given back on exit.

    Raises:
        KeyError: an expert of the mixture is not loaded in ``model``.
    """
    from peft.tuners.lora import LoraLayer

    slots = [adapter_name(e) for e in mixture.experts]
    missing = [s for s in slots if s not in model.peft_config]
    if missing:
        raise KeyError(f"experts not loaded in the model: {missing}")
    previous = model.active_adapter
    saved = []
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for slot, weight in zip(slots, mixture.weights, strict=True):
                    if slot in module.scaling:
                        saved.append((module, slot, module.scaling[slot]))
                        module.scaling[slot] = module.scaling[slot] * weight
        model.base_model.set_adapter(slots, inference_mode=True)
        yield model
    finally:
        for module, slot, scaling in saved:
            module.scaling[slot] = scaling
        model.base_model.set_adapter(previous, inference_mode=True)


def _empty() -> dict[str, Any]:
    return {"nll": 0.0, "tokens": 0, "experts": 0, "texts": 0, "base_only": 0, "mixtures": set(),
            "decisions": 0, "token_experts": 0}


def _text_key(row: str, topic: str, candidates: Candidates | None, mixing: dict[str, Any]) -> Key | None:
    """What one text of ``topic`` is scored with in ``row`` (None: that row has nothing for this text)."""
    if row == BASE_MODE:
        return ()
    if row == ORACLE_ROW:
        return ((topic, 1.0),)
    if row in (DENSE_ROW, SEED_ROW):
        return row
    below = mixing["threshold"] is not None and (not candidates or candidates[0][1] < mixing["threshold"])
    if row == ARROW_MODE:
        return () if below else ARROW_MODE
    return text_mixture(candidates, row, **mixing)


def score_modes(model: Any, tokenizer: Any, eval_sets: Mapping[str, Sequence[str]],
                ranked: Mapping[str, Sequence[Candidates]], rows: Sequence[str], mixing: dict[str, Any],
                kw: dict[str, Any], *, experts: Sequence[str], slots: Mapping[str, str] | None = None,
                arrow: ArrowSpec | None = None, progress: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """``{topic: {row: stats}}`` for the routing modes and reference rows in ``rows``.

    Args:
        model: a PeftModel holding every expert as ``moin__<id>`` (and the ``slots`` named there).
        eval_sets / ranked: each topic's texts and, per text, its experts nearest its query with their
            similarities, best first.
        rows: routing modes of :data:`EVAL_MODES` and reference rows (``base``, ``oracle``, ``dense``, ``seed``).
        mixing: ``k``, ``temperature``, ``mass`` and ``threshold`` (below it, a text gets the base model).
        kw: ``seq_len``, ``batch_size``, ``bf16``.
        experts: the expert ids Arrow mixes (and ``oracle`` may use).
        slots: adapter slot of ``dense`` / ``seed``.
        arrow: Arrow's top-k, temperature and adaptive gap.
        progress: show a bar counting the (mixture, text) pairs scored.

    Returns:
        Per topic and row: summed NLL and tokens, experts summed over texts, texts, texts left to the base,
        the distinct mixtures, and for ``arrow`` the token-layer decisions and experts they took.
    """
    slots = dict(slots or {})
    arrow_setup = ([adapter_name(e) for e in experts], arrow or ArrowSpec())
    plans: dict[Key, dict[str, dict[int, list[str]]]] = {}  # key -> topic -> text index -> rows using it
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        for topic, texts in eval_sets.items():
            per_text = ranked.get(topic) or [None] * len(texts)
            for i, candidates in enumerate(per_text):
                key = _text_key(row, topic, candidates, mixing)
                if key is None or (row == ORACLE_ROW and topic not in experts):
                    continue
                st = stats.setdefault(topic, {}).setdefault(row, _empty())
                plans.setdefault(key, {}).setdefault(topic, {}).setdefault(i, []).append(row)
                st["experts"] += len(experts) if key == ARROW_MODE else (1 if isinstance(key, str) else len(key))
                st["texts"] += 1
                st["base_only"] += key == ()
                st["mixtures"].add(key)
    total = sum(len(by_text) for topics in plans.values() for by_text in topics.values())
    with tqdm(total=total, desc="Scoring modes", unit="text", disable=not progress) as bar:
        for key, topics in plans.items():
            arrow_stats = ArrowStats()
            with _mixed(model, key, slots, arrow_setup, arrow_stats):  # once for every topic: Arrow's SVDs too
                for topic, by_text in topics.items():
                    decisions, token_experts = arrow_stats.decisions, arrow_stats.experts
                    nlls = texts_nlls(model, tokenizer, [eval_sets[topic][i] for i in by_text], **kw)
                    for (nll, n_tokens), text_rows in zip(nlls, by_text.values(), strict=True):
                        for row in text_rows:
                            stats[topic][row]["nll"] += nll
                            stats[topic][row]["tokens"] += n_tokens
                    if key == ARROW_MODE:
                        stats[topic][ARROW_MODE]["decisions"] += arrow_stats.decisions - decisions
                        stats[topic][ARROW_MODE]["token_experts"] += arrow_stats.experts - token_experts
                    bar.update(len(by_text))
    return stats


def pool(per_topic: Mapping[str, Mapping[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum the stats of every topic, row by row."""
    pooled: dict[str, dict[str, Any]] = {}
    for topic_stats in per_topic.values():
        for row, st in topic_stats.items():
            into = pooled.setdefault(row, _empty())
            for name in ("nll", "tokens", "experts", "texts", "base_only", "decisions", "token_experts"):
                into[name] += st[name]
            into["mixtures"] |= st["mixtures"]
    return pooled


def row_scores(stats: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{row: {ppl, tokens, mean_experts, base_only, mixtures}}``; for ``arrow`` also ``experts_per_token``
    (mean experts a token took per layer; ``mean_experts`` counts the experts loaded for it)."""
    scores = {}
    for row, st in stats.items():
        scores[row] = {"ppl": math.exp(st["nll"] / st["tokens"]) if st["tokens"] else None, "tokens": st["tokens"],
                       "mean_experts": st["experts"] / st["texts"] if st["texts"] else None,
                       "base_only": st["base_only"] / st["texts"] if st["texts"] else None,
                       "mixtures": len(st["mixtures"])}
        if row == ARROW_MODE:
            scores[row]["experts_per_token"] = st["token_experts"] / st["decisions"] if st["decisions"] else None
    return scores


def _check_ranked(ranked: Mapping[str, Sequence[Candidates]] | None, eval_sets: Mapping[str, Sequence[str]],
                  expert_dirs: Mapping[str, Any]) -> None:
    for topic, per_text in (ranked or {}).items():
        if topic not in eval_sets:
            raise ValueError(f"ranked[{topic!r}]: no eval set of that topic.")
        if len(per_text) != len(eval_sets[topic]):
            raise ValueError(f"ranked[{topic!r}] has {len(per_text)} candidate lists for "
                             f"{len(eval_sets[topic])} texts.")
        for i, candidates in enumerate(per_text):
            ids, sims = [e for e, _ in candidates], [float(s) for _, s in candidates]
            unknown = sorted({e for e in ids if e not in expert_dirs})
            if unknown:
                raise ValueError(f"ranked[{topic!r}][{i}] names experts {unknown} that are not in expert_dirs.")
            if len(set(ids)) != len(ids):
                raise ValueError(f"ranked[{topic!r}][{i}] names an expert twice: {ids}.")
            if any(not math.isfinite(s) for s in sims) or any(a < b for a, b in zip(sims, sims[1:], strict=False)):
                raise ValueError(f"ranked[{topic!r}][{i}]: similarities must be finite and sorted best first, "
                                 f"got {sims}.")


def check_mixing(modes: Sequence[str], mixing: dict[str, Any]) -> None:
    if isinstance(modes, str):
        raise ValueError(f"modes must be a sequence of modes, got the string {modes!r}.")
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; modes are {EVAL_MODES}.")
    for mode in (m for m in modes if m != ARROW_MODE):
        mix_weights([1.0], mode=mode, **{**mixing, "threshold": None})  # names a bad mode, k, temperature or mass
    threshold = mixing["threshold"]
    if threshold is not None and not (isinstance(threshold, int | float) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}.")


