"""Per-topic scores of base, oracle, routed and dense on held-out text, and of every routing mode.

:func:`evaluate_experts` keeps ONE base model in memory and switches LoRA adapters on it
(``load_adapter`` once per expert, then ``set_adapter``), as a MoIN server does. Two protocols:

- the ``*_ppl`` columns cut each topic's texts into ``seq_len`` blocks (:mod:`moin_hub.pipeline.scoring`);
  ``routed`` regroups the texts by the expert their query picked;
- ``modes`` (:mod:`moin_hub.pipeline.modes`) scores each text on its own, so every routing mode (``top1``,
  ``topk``, ``adaptive``, ``arrow``) and every reference (``base``, ``oracle``, ``dense``, ``seed``) is
  measured on exactly the same tokens. Prefer it to compare modes with each other and with the dense LoRA.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import InvalidExpertError
from ..hub.arrow import ArrowSpec
from ..hub.config import ADAPTER_WEIGHTS_FILENAME
from ..hub.expert import refuse_pickles
from ..hub.loading import adapter_name, quiet_peft
from ..hub.mixing import MODES
from .modes import (
    BASE_MODE,
    DENSE_ROW,
    MIX_DECIMALS,
    ORACLE_ROW,
    SEED_ROW,
    Candidates,
    _check_ranked,
    _using,
    check_mixing,
    pool,
    row_scores,
    score_modes,
)
from .scoring import BF16, blocks_nll, build_blocks

logger = logging.getLogger(__name__)

def _check_adapter_dir(adapter_dir: Path) -> None:
    if not (adapter_dir / ADAPTER_WEIGHTS_FILENAME).is_file():
        raise InvalidExpertError(str(adapter_dir), f"missing {ADAPTER_WEIGHTS_FILENAME}")
    refuse_pickles([p.name for p in adapter_dir.iterdir()], where=str(adapter_dir))


def load_with_adapter(base_model: torch.nn.Module, adapter_dir: str | Path, *,
                      adapter: str | None = None) -> Any:
    """Wrap ``base_model`` with the LoRA adapter saved in the local folder ``adapter_dir`` (inference mode).

    Note that PEFT injects the LoRA layers into ``base_model`` in place; ``model.unload()`` takes them out.

    Args:
        base_model: a loaded base model.
        adapter_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter: the PEFT adapter name (default ``"default"``).

    Returns:
        The ``peft.PeftModel``, in eval mode.

    Raises:
        InvalidExpertError: the folder has no safetensors adapter.
        UnsafeFileError: the folder ships a pickle.
    """
    from peft import PeftModel

    folder = Path(adapter_dir)
    _check_adapter_dir(folder)
    with quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter or "default",
                                          is_trainable=False, use_safetensors=True)
    return model.eval()


def _attach_experts(base_model: torch.nn.Module, expert_dirs: Mapping[str, str | Path]) -> Any:
    """Load every expert as an adapter named ``moin__<id>`` on one PeftModel around ``base_model``."""
    items = list(expert_dirs.items())
    first_id, first_dir = items[0]
    model = load_with_adapter(base_model, first_dir, adapter=adapter_name(first_id))
    for expert_id, folder in items[1:]:
        _check_adapter_dir(Path(folder))
        with quiet_peft():
            model.load_adapter(str(folder), adapter_name=adapter_name(expert_id), is_trainable=False,
                               use_safetensors=True)
    return model.eval()


NLL = tuple[float, int]  # (summed NLL, predicted tokens)
_KINDS = ("base", "oracle", "routed", "dense")
DENSE_ID = "dense-baseline"  # the adapter slot of the dense baseline in evaluate_experts
SEED_ID = "shared-seed"  # the adapter slot of branch-train's seed in evaluate_experts


def _routed_nll(model: Any, tokenizer: Any, texts: Sequence[str], choices: Sequence[str | None],
                kw: dict[str, Any]) -> NLL:
    """NLL of ``texts`` when text ``i`` is scored by expert ``choices[i]``: texts are grouped by expert,
    in their original order, and each group is cut into blocks on its own."""
    groups: dict[str | None, list[str]] = {}
    for text, choice in zip(texts, choices, strict=True):
        groups.setdefault(choice, []).append(text)
    nll, n_tokens = 0.0, 0
    for expert_id, group in groups.items():
        with _using(model, expert_id):
            g_nll, g_n = blocks_nll(model, build_blocks(tokenizer, group, kw["seq_len"]),
                                    batch_size=kw["batch_size"], bf16=kw["bf16"])
        nll, n_tokens = nll + g_nll, n_tokens + g_n
    return nll, n_tokens


def _topic_nll(model: Any, tokenizer: Any, topic: str, texts: Sequence[str], has_expert: bool,
               choices: Sequence[str | None] | None, kw: dict[str, Any], *,
               has_dense: bool = False) -> dict[str, NLL | None]:
    """Summed NLL of one topic's texts under the base, its own expert, the routed experts and the dense
    baseline."""
    blocks = build_blocks(tokenizer, texts, kw["seq_len"])
    nll_kw = {"batch_size": kw["batch_size"], "bf16": kw["bf16"]}
    with _using(model, None):
        base = blocks_nll(model, blocks, **nll_kw)
    oracle = None
    if has_expert:
        with _using(model, topic):
            oracle = blocks_nll(model, blocks, **nll_kw)
    routed = _routed_nll(model, tokenizer, texts, choices, kw) if choices is not None else None
    dense = None
    if has_dense:
        with _using(model, DENSE_ID):
            dense = blocks_nll(model, blocks, **nll_kw)
    return {"base": base, "oracle": oracle, "routed": routed, "dense": dense}


def _scores(nlls: Mapping[str, NLL | None]) -> dict[str, Any]:
    """``{kind}_ppl`` and ``{kind}_tokens`` for base / oracle / routed (``None`` / 0 when not measured)."""
    scores: dict[str, Any] = {}
    for kind in _KINDS:
        nll, n_tokens = nlls.get(kind) or (0.0, 0)
        scores[f"{kind}_ppl"] = _ppl(nll, n_tokens)
        scores[f"{kind}_tokens"] = n_tokens
    return scores


def _ppl(nll: float, n_tokens: int) -> float | None:
    return math.exp(nll / n_tokens) if n_tokens else None


def _pool(per_topic: Mapping[str, Mapping[str, NLL | None]]) -> dict[str, NLL]:
    pooled = {kind: (0.0, 0) for kind in _KINDS}
    for nlls in per_topic.values():
        for kind, value in nlls.items():
            if value is not None:
                pooled[kind] = (pooled[kind][0] + value[0], pooled[kind][1] + value[1])
    return pooled


def _check_routed(routed: Mapping[str, Sequence[str | None]] | None, eval_sets: Mapping[str, Sequence[str]],
                  expert_dirs: Mapping[str, Any]) -> None:
    for topic, choices in (routed or {}).items():
        if topic not in eval_sets:
            raise ValueError(f"routed[{topic!r}]: no eval set of that topic.")
        if len(choices) != len(eval_sets[topic]):
            raise ValueError(f"routed[{topic!r}] has {len(choices)} choices for {len(eval_sets[topic])} texts.")
        unknown = sorted({c for c in choices if c is not None and c not in expert_dirs})
        if unknown:
            raise ValueError(f"routed[{topic!r}] names experts {unknown} that are not in expert_dirs.")


def evaluate_experts(base_model: torch.nn.Module, tokenizer: Any, expert_dirs: Mapping[str, str | Path],
                     eval_sets: Mapping[str, Sequence[str]], *,
                     routed: Mapping[str, Sequence[str | None]] | None = None,
                     ranked: Mapping[str, Sequence[Candidates]] | None = None, modes: Sequence[str] = MODES,
                     k: int = 3, temperature: float = 0.05, mass: float = 0.8, threshold: float | None = None,
                     dense_dir: str | Path | None = None, seed_dir: str | Path | None = None,
                     arrow: ArrowSpec | None = None, seq_len: int = 256, batch_size: int = 8,
                     bf16: BF16 = "auto", progress: bool = False) -> dict[str, Any]:
    """Per-topic perplexity of the base model, of the topic's own expert (oracle), and of routed experts.

    All experts are loaded as adapters on ONE copy of ``base_model`` (names ``moin__<expert_id>``) and
    switched with ``set_adapter``; the LoRA layers are taken out again before returning.

    Args:
        base_model: the frozen base model (not a PeftModel).
        tokenizer: its tokenizer.
        expert_dirs: ``{expert_id: folder}`` of trained experts.
        eval_sets: ``{topic_id: held-out texts}``; a topic's oracle expert is the expert of the same id.
        routed: optional ``{topic_id: [expert_id or None, one per text of eval_sets[topic_id]]}``, the
            router's choice for each held-out text (``None`` = no expert, the base model).
        ranked: optional ``{topic_id: [[(expert_id, similarity), ...] best first, one list per text]}``: the
            experts nearest each text's query. With it, every routing mode of ``modes`` is scored.
        modes: the routing modes scored from ``ranked`` (:data:`~moin_hub.pipeline.modes.EVAL_MODES`): ``top1``,
            ``topk`` (softmax over the ``k`` nearest), ``adaptive`` (as few as carry ``mass`` of the softmax),
            ``arrow`` (per-token mixing of every expert, :mod:`moin_hub.hub.arrow`, with ``arrow``'s settings).
        k / temperature / mass / threshold: the mixing parameters of :func:`~moin_hub.hub.mixing.mix_weights`;
            below ``threshold`` a text is scored by the base model.
        dense_dir: optional folder of the dense baseline (one LoRA trained on all topics), scored on
            every topic as ``dense_ppl`` and as the ``dense`` row of ``modes``.
        seed_dir: optional folder of branch-train's shared seed, scored as the ``seed`` row of ``modes``.
        arrow: Arrow's top-k, temperature and adaptive gap (default :class:`~moin_hub.hub.arrow.ArrowSpec`).
        seq_len / batch_size / bf16: as in :func:`perplexity`.
        progress: show progress bars (topics scored in blocks, then (mixture, text) pairs of the modes).

    Returns:
        ``{"topics": {topic_id: scores}, "overall": scores}``. ``scores`` holds ``base_ppl``, ``oracle_ppl``,
        ``routed_ppl`` and ``dense_ppl`` (``None`` when not measured: no expert of that id, no ``routed`` entry) with the
        predicted tokens behind each (``base_tokens``, ``oracle_tokens``, ``routed_tokens``; routed texts
        are regrouped per expert before cutting blocks, so their count may differ by a few tail tokens).
        Per topic, ``routed_to_own`` is the fraction of texts routed to the topic's own expert.
        ``scores["modes"]`` is ``{mode: {"ppl", "tokens", "mean_experts", "base_only", "mixtures"}}`` (empty
        without ``ranked``): the perplexity when each text gets its mode's mixture (weights rounded to
        :data:`MIX_DECIMALS` decimals; each text scored on its own first ``seq_len`` tokens, so every mode,
        and the reference rows ``base``, ``oracle``, ``dense`` and ``seed`` when there is one, scores the same
        tokens), the mean number of experts per text, the fraction of texts left to the base (``threshold``),
        and the distinct mixtures. Per topic, ``worse_than_base`` tells whether its routed texts scored worse
        than the base model (``routed_ppl`` and ``top1``, where measured).
        ``overall`` pools the NLL of all topics (token-weighted), each kind over the topics it was measured on;
        ``mixing`` records the modes and parameters (``None`` without ``ranked``).

    Raises:
        ValueError: ``routed`` or ``ranked`` names an unknown topic or expert, or a list has the wrong length;
            similarities not sorted best first; an unknown mode or bad mixing parameters.
        InvalidExpertError / UnsafeFileError: an expert folder has no safetensors adapter or ships a pickle.

    Example:
        >>> scores = evaluate_experts(base, tok, {"cooking": Path("experts/cooking")},
        ...                           {"cooking": held_out_cooking})  # doctest: +SKIP
        >>> scores["topics"]["cooking"]["oracle_ppl"] < scores["topics"]["cooking"]["base_ppl"]  # doctest: +SKIP
        True
    """
    _check_routed(routed, eval_sets, expert_dirs)
    _check_ranked(ranked, eval_sets, expert_dirs)
    mixing = {"k": k, "temperature": temperature, "mass": mass, "threshold": threshold}
    check_mixing(modes, mixing)
    for reserved, given in ((DENSE_ID, dense_dir), (SEED_ID, seed_dir)):
        if given is not None and reserved in expert_dirs:
            raise ValueError(f"expert id {reserved!r} is reserved for the {'dense baseline' if reserved == DENSE_ID else 'seed'}.")
    kw = {"seq_len": seq_len, "batch_size": batch_size, "bf16": bf16}
    routed = routed or {}
    modes = list(dict.fromkeys(modes)) if ranked else []
    extra = {DENSE_ID: dense_dir, SEED_ID: seed_dir}
    adapters = {**expert_dirs, **{i: d for i, d in extra.items() if d is not None}}
    slots = {row: adapter_name(i) for row, i in ((DENSE_ROW, DENSE_ID), (SEED_ROW, SEED_ID)) if extra[i] is not None}
    rows = [*modes, BASE_MODE, ORACLE_ROW, *slots] if modes else []
    model = _attach_experts(base_model, adapters) if adapters else base_model
    try:
        nlls = {topic: _topic_nll(model, tokenizer, topic, texts, topic in expert_dirs, routed.get(topic), kw,
                                  has_dense=dense_dir is not None)
                for topic, texts in tqdm(eval_sets.items(), desc="Scoring topics", unit="topic",
                                         disable=not progress)}
        mode_stats = score_modes(model, tokenizer, eval_sets, ranked or {}, rows, mixing, kw,
                                 experts=list(expert_dirs), slots=slots, arrow=arrow, progress=progress) if rows else {}
    finally:
        if model is not base_model:
            model.unload()
    topics = {}
    for topic, topic_nlls in nlls.items():
        choices = routed.get(topic)
        own = sum(c == topic for c in choices) / len(choices) if choices else None
        scores = {**_scores(topic_nlls), "routed_to_own": own, "modes": row_scores(mode_stats.get(topic, {}))}
        scores["worse_than_base"] = _worse_than_base(scores)
        topics[topic] = scores
    overall = {**_scores(_pool(nlls)), "modes": row_scores(pool(mode_stats))}
    return {"topics": topics, "overall": overall,
            "mixing": {"modes": modes, **mixing, "decimals": MIX_DECIMALS,
                       **({"arrow": (arrow or ArrowSpec()).to_dict()} if "arrow" in modes else {})}
            if modes else None}


def _worse_than_base(scores: Mapping[str, Any]) -> bool | None:
    """True when a topic's routed texts scored worse than the base model (routed, or top1 on the same tokens)."""
    checks = []
    if scores.get("routed_ppl") is not None and scores.get("base_ppl") is not None:
        checks.append(scores["routed_ppl"] > scores["base_ppl"])
    modes = scores.get("modes", {})
    if (modes.get("top1") or {}).get("ppl") is not None and (modes.get(BASE_MODE) or {}).get("ppl") is not None:
        checks.append(modes["top1"]["ppl"] > modes[BASE_MODE]["ppl"])
    return any(checks) if checks else None
