"""Perplexity of a causal LM on texts, and per-topic scores of base, oracle and routed experts.

Texts become token blocks the same way for training and evaluation (:func:`build_blocks`): each text
is tokenized without special tokens, followed by EOS, all are concatenated, and the stream is cut into
full ``seq_len`` blocks (the tail shorter than a block is dropped). Perplexity is ``exp`` of the
token-weighted mean next-token NLL over those blocks, so numbers from different calls and different
adapters on the same texts are directly comparable.

:func:`evaluate_experts` keeps ONE base model in memory and switches LoRA adapters on it
(``load_adapter`` once per expert, then ``set_adapter``), as a MoIN server does. Given each held-out
text's ranked experts, it also scores the routing modes of :mod:`moin_hub.hub.mixing` (``top1``, ``topk``,
``adaptive``): texts are grouped by their mixture (weights rounded to :data:`MIX_DECIMALS` decimals), each
distinct mixture is built once (``add_weighted_adapter`` into ``moin__mixture``, or ``set_adapter`` for a
single expert), and each group of texts is cut into blocks on its own, as routed texts are.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidExpertError
from ..hub.config import ADAPTER_WEIGHTS_FILENAME
from ..hub.expert import refuse_pickles
from ..hub.loading import adapter_name, quiet_peft
from ..hub.mixing import MIXTURE_SLOT, MODES, Mixture, apply_mixture, mix_weights

logger = logging.getLogger(__name__)

BF16 = bool | str  # True, False or "auto"


def cpu_has_fast_bf16() -> bool:
    """True if this CPU has oneDNN bf16 kernels (AVX-512 BW/VL/DQ, AMX, or ARM bf16).

    Without them (e.g. an AVX2-only x86 CPU) bf16 matmuls fall back to a slow path: measured on the
    2-core AVX2 build machine, a bf16 matmul was ~30x slower than fp32, so autocast would slow training down.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API moved, or a build without oneDNN
        return False


def resolve_bf16(bf16: BF16, device: torch.device | str) -> bool:
    """Decide whether to run under ``torch.autocast(dtype=bfloat16)``.

    Args:
        bf16: ``True``, ``False`` or ``"auto"``. ``"auto"`` means yes on a CPU with fast bf16 kernels
            (:func:`cpu_has_fast_bf16`; there autocast made LoRA training ~2.5x faster than fp32) and on
            CUDA devices that support bf16; no elsewhere.
        device: where the model runs.

    Returns:
        Whether to autocast to bf16.

    Raises:
        ValueError: ``bf16`` is not one of the three values.
    """
    if isinstance(bf16, bool):
        return bf16
    if bf16 != "auto":
        raise ValueError(f"bf16 must be True, False or 'auto', got {bf16!r}.")
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_has_fast_bf16()
    return kind == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def build_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenize ``texts``, append EOS to each, concatenate, and cut into full ``seq_len`` blocks.

    Args:
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        texts: the documents, in order.
        seq_len: tokens per block.

    Returns:
        A ``LongTensor[n_blocks, seq_len]``; ``n_blocks`` may be 0 if the texts are shorter than a block.

    Raises:
        ValueError: the tokenizer has no EOS token, or ``seq_len`` < 2.

    Example:
        >>> build_blocks(tok, ["one text", "another text"], seq_len=4).shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token_id; texts cannot be separated in a block stream.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    stream: list[int] = []
    if texts:
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def blocks_nll(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int = 8,
               bf16: BF16 = "auto") -> tuple[float, int]:
    """Summed next-token NLL of ``model`` over ``blocks``, and the number of predicted tokens.

    Each block predicts its tokens 2..seq_len from the ones before, so it counts ``seq_len - 1`` tokens.
    The model is put in eval mode for the call and given back in the mode it had.

    Returns:
        ``(sum_nll, n_tokens)``; ``(0.0, 0)`` for no blocks.
    """
    if blocks.shape[0] == 0:
        return 0.0, 0
    total = 0.0
    with _scoring(model, bf16) as device:
        for batch in blocks.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits
            for row, ids in zip(logits, batch, strict=True):  # one row at a time: the fp32 copy stays small
                total += F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum").item()
    return total, blocks.shape[0] * (blocks.shape[1] - 1)


@contextlib.contextmanager
def _scoring(model: torch.nn.Module, bf16: BF16) -> Iterator[torch.device]:
    """``model`` in eval mode, gradients off, bf16 autocast as asked; yields its device and gives the model
    back in the mode it had."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, resolve_bf16(bf16, device)):
            yield device
    finally:
        model.train(was_training)


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256,
               batch_size: int = 8, bf16: BF16 = "auto", max_tokens: int | None = None) -> tuple[float, int]:
    """Perplexity of ``model`` on ``texts``: ``exp`` of the token-weighted mean NLL over full blocks.

    Deterministic: no sampling, no dropout (eval mode), gradients off.

    Args:
        model: a causal LM (plain or ``PeftModel``), on any device.
        tokenizer: its tokenizer.
        texts: the documents; see :func:`build_blocks`.
        seq_len: tokens per block (use the training ``seq_len`` to compare with training).
        batch_size: blocks per forward pass.
        bf16: autocast to bf16 (``True`` / ``False`` / ``"auto"``, see :func:`resolve_bf16`).
        max_tokens: evaluate only the first ``ceil(max_tokens / seq_len)`` blocks.

    Returns:
        ``(ppl, n_tokens)``: the perplexity and the number of predicted tokens behind it.

    Raises:
        ValueError: the texts hold fewer tokens than one block.

    Example:
        >>> ppl, n = perplexity(model, tokenizer, ["Some held-out text ..."], seq_len=128)  # doctest: +SKIP
    """
    blocks = build_blocks(tokenizer, texts, seq_len)
    if max_tokens is not None:
        blocks = blocks[: max(1, math.ceil(max_tokens / seq_len))]
    if blocks.shape[0] == 0:
        raise ValueError(f"The texts hold fewer tokens than one block of seq_len={seq_len}; "
                         "give more text or a shorter seq_len.")
    nll, n_tokens = blocks_nll(model, blocks, batch_size=batch_size, bf16=bf16)
    return math.exp(nll / n_tokens), n_tokens


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


NLL = tuple[float, int]  # (summed NLL, predicted tokens)
_KINDS = ("base", "oracle", "routed", "dense")
DENSE_ID = "dense-baseline"  # the adapter slot of the dense baseline in evaluate_experts


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


#: Decimals a mixture's weights are rounded to before texts are grouped by mixture: texts whose weights agree
#: to 0.01 share one adapter and one block stream, so a mixture is built once, not once per text.
MIX_DECIMALS = 2
Candidates = Sequence[tuple[str, float]]  # one text's (expert_id, similarity) pairs, best first
MixKey = tuple[tuple[str, float], ...]  # a mixture's (expert_id, rounded weight) pairs, best first; () = the base


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
def _mixed(model: Any, key: MixKey) -> Iterator[None]:
    """Run ``model`` with the mixture ``key`` (one expert: its slot; several: ``moin__mixture``; none: the base)."""
    if not key:
        with _using(model, None):
            yield
    else:
        if len(key) > 1 and model.active_adapter == MIXTURE_SLOT:  # replacing the active slot would warn
            model.set_adapter(adapter_name(key[0][0]))
        apply_mixture(model, _mixture_of(key))
        yield


def _empty_mode() -> dict[str, Any]:
    return {"nll": 0.0, "tokens": 0, "experts": 0, "texts": 0, "base_only": 0, "mixtures": set()}


def texts_nll(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256,
              batch_size: int = 8, bf16: BF16 = "auto") -> tuple[float, int]:
    """Summed next-token NLL of each text on its own (its tokens and EOS, the first ``seq_len`` of them).

    Unlike :func:`build_blocks`, no text is dropped or joined to another: the same texts give the same
    predicted tokens whatever they are grouped with, so scores of different groupings compare exactly.

    Returns:
        ``(sum_nll, n_tokens)``.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    rows = [(ids + [tokenizer.eos_token_id])[:seq_len] for ids in encoded]
    rows = [ids for ids in rows if len(ids) >= 2]
    total, n_tokens = 0.0, 0
    with _scoring(model, bf16) as device:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):  # right padding: positions after a text are masked out
                batch[i, :len(ids)] = torch.tensor(ids)
                mask[i, :len(ids)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            for row, ids in zip(logits, chunk, strict=False):
                target = torch.tensor(ids[1:], device=device)
                total += F.cross_entropy(row[: len(ids) - 1].float(), target, reduction="sum").item()
                n_tokens += len(ids) - 1
    return total, n_tokens


#: The pseudo-mode scored with the modes: every text on the base model, on the same tokens.
BASE_MODE = "base"


def _modes_nll(model: Any, tokenizer: Any, eval_sets: Mapping[str, Sequence[str]],
               ranked: Mapping[str, Sequence[Candidates]], modes: Sequence[str], mixing: dict[str, Any],
               kw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{topic: {mode: stats}}``: summed NLL and tokens, experts summed over texts, texts, texts on the base,
    and the distinct mixtures; plus :data:`BASE_MODE`, every text on the base model. Each text is scored on
    its own first ``seq_len`` tokens (:func:`texts_nll`), so every mode scores exactly the same tokens; each
    distinct mixture is made active once for all the texts that use it."""
    plans: dict[MixKey, dict[tuple[str, str], list[str]]] = {}
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in (*modes, BASE_MODE):
        for topic, per_text in ranked.items():
            st = stats.setdefault(topic, {}).setdefault(mode, _empty_mode())
            for text, candidates in zip(eval_sets[topic], per_text, strict=True):
                key = () if mode == BASE_MODE else text_mixture(candidates, mode, **mixing)
                plans.setdefault(key, {}).setdefault((mode, topic), []).append(text)
                st["experts"] += len(key)
                st["texts"] += 1
                st["base_only"] += not key
                st["mixtures"].add(key)
    for key, groups in plans.items():
        with _mixed(model, key):
            for (mode, topic), texts in groups.items():
                nll, n_tokens = texts_nll(model, tokenizer, texts, seq_len=kw["seq_len"],
                                          batch_size=kw["batch_size"], bf16=kw["bf16"])
                stats[topic][mode]["nll"] += nll
                stats[topic][mode]["tokens"] += n_tokens
    return stats


def _pool_modes(per_topic: Mapping[str, Mapping[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    pooled: dict[str, dict[str, Any]] = {}
    for topic_stats in per_topic.values():
        for mode, st in topic_stats.items():
            into = pooled.setdefault(mode, _empty_mode())
            for name in ("nll", "tokens", "experts", "texts", "base_only"):
                into[name] += st[name]
            into["mixtures"] |= st["mixtures"]
    return pooled


def _mode_scores(stats: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{mode: {ppl, tokens, mean_experts, base_only, mixtures}}`` of some texts' mode stats."""
    return {mode: {"ppl": _ppl(st["nll"], st["tokens"]), "tokens": st["tokens"],
                   "mean_experts": st["experts"] / st["texts"] if st["texts"] else None,
                   "base_only": st["base_only"] / st["texts"] if st["texts"] else None,
                   "mixtures": len(st["mixtures"])}
            for mode, st in stats.items()}


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
    for mode in modes:
        mix_weights([1.0], mode=mode, **{**mixing, "threshold": None})  # names a bad mode, k, temperature or mass
    threshold = mixing["threshold"]
    if threshold is not None and not (isinstance(threshold, int | float) and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}.")


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
                     dense_dir: str | Path | None = None, seq_len: int = 256,
                     batch_size: int = 8, bf16: BF16 = "auto") -> dict[str, Any]:
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
        modes: the routing modes scored from ``ranked`` (:data:`~moin_hub.hub.mixing.MODES`): ``top1``, ``topk``
            (softmax over the ``k`` nearest), ``adaptive`` (as few as carry ``mass`` of the softmax).
        k / temperature / mass / threshold: the mixing parameters of :func:`~moin_hub.hub.mixing.mix_weights`;
            below ``threshold`` a text is scored by the base model.
        dense_dir: optional folder of the dense baseline (one LoRA trained on all topics), scored on
            every topic as ``dense_ppl``.
        seq_len / batch_size / bf16: as in :func:`perplexity`.

    Returns:
        ``{"topics": {topic_id: scores}, "overall": scores}``. ``scores`` holds ``base_ppl``, ``oracle_ppl``,
        ``routed_ppl`` and ``dense_ppl`` (``None`` when not measured: no expert of that id, no ``routed`` entry) with the
        predicted tokens behind each (``base_tokens``, ``oracle_tokens``, ``routed_tokens``; routed texts
        are regrouped per expert before cutting blocks, so their count may differ by a few tail tokens).
        Per topic, ``routed_to_own`` is the fraction of texts routed to the topic's own expert.
        ``scores["modes"]`` is ``{mode: {"ppl", "tokens", "mean_experts", "base_only", "mixtures"}}`` (empty
        without ``ranked``): the perplexity when each text gets its mode's mixture (weights rounded to
        :data:`MIX_DECIMALS` decimals; each text scored on its own first ``seq_len`` tokens, so every mode,
        and the extra entry ``"base"`` (the base model), scores the same tokens), the mean number of
        experts per text, the fraction of texts left to the base (``threshold``), and the distinct mixtures.
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
    if dense_dir is not None and DENSE_ID in expert_dirs:
        raise ValueError(f"expert id {DENSE_ID!r} is reserved for the dense baseline.")
    kw = {"seq_len": seq_len, "batch_size": batch_size, "bf16": bf16}
    routed = routed or {}
    modes = list(dict.fromkeys(modes)) if ranked else []
    adapters = {**expert_dirs, **({DENSE_ID: dense_dir} if dense_dir is not None else {})}
    model = _attach_experts(base_model, adapters) if adapters else base_model
    try:
        nlls = {topic: _topic_nll(model, tokenizer, topic, texts, topic in expert_dirs, routed.get(topic), kw,
                                  has_dense=dense_dir is not None)
                for topic, texts in eval_sets.items()}
        mode_stats = _modes_nll(model, tokenizer, eval_sets, ranked, modes, mixing, kw) if modes else {}
    finally:
        if model is not base_model:
            if MIXTURE_SLOT in model.peft_config:  # the mixture is not one of the loaded experts: drop it first
                model.set_adapter(next(slot for slot in model.peft_config if slot != MIXTURE_SLOT))
                model.delete_adapter(MIXTURE_SLOT)
            model.unload()
    topics = {}
    for topic, topic_nlls in nlls.items():
        choices = routed.get(topic)
        own = sum(c == topic for c in choices) / len(choices) if choices else None
        topics[topic] = {**_scores(topic_nlls), "routed_to_own": own,
                         "modes": _mode_scores(mode_stats.get(topic, {}))}
    overall = {**_scores(_pool(nlls)), "modes": _mode_scores(_pool_modes(mode_stats))}
    return {"topics": topics, "overall": overall,
            "mixing": {"modes": modes, **mixing, "decimals": MIX_DECIMALS} if modes else None}
