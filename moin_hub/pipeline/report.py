"""The evaluation step and its report: ``moin-hub evaluate`` writes ``report.json``; here it is made,
checked against the targets, and printed as a table for people."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import MoinHubError
from ..hub.arrow import ArrowSpec
from ..hub.config import utc_now
from .io import write_json
from .modes import DENSE_ROW, EVAL_MODES, check_mixing
from .steps import base_model_dir, expert_dirs, topic_model
from .train import TRAINING_FILENAME, is_finished
from .workspace import (
    DENSE_DIR,
    DENSE_ID,
    EMBEDDINGS_FILENAME,
    EXPERTS_DIR,
    REPORT_FILENAME,
    SEED_ID,
    Workspace,
    _read_jsonl,
    query_of,
    read_embeddings,
    topic_expert_id,
)


def evaluate(workdir: str | os.PathLike, *, endpoint: str | None = None, token: str | bool | None = None,
             seq_len: int = 256, batch_size: int = 8, max_docs_per_topic: int | None = None,
             modes: Sequence[str] = EVAL_MODES, k: int = 3, temperature: float | None = None, mass: float = 0.8,
             threshold: float | None = None, arrow: ArrowSpec | None = None, plots: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Held-out perplexity per topic of base, routed expert, oracle expert and dense baseline, and of each
    routing mode, plus routing accuracy; writes ``report.json`` and the plots.

    Routing is scored as a user meets it: each held-out document is routed by its first
    ``query_words`` words; its own topic is the nearest centroid to the whole document. With labels
    (Brown genre groups), routing is also scored at the label level: a routed document counts as right
    when its label is the majority label of the topic it was routed to.

    The routing modes (``report["perplexity"][...]["modes"]``) mix the trained experts nearest each
    query, with the query embeddings the cluster step stored (nothing is embedded again): ``top1`` is
    the nearest trained expert alone (the same as ``routed`` unless a topic has no expert: ``routed``
    then gives the text to the base model, ``top1`` to the nearest expert that exists, as a registry's
    router would), ``topk`` a softmax over the ``k`` nearest, ``adaptive`` as few as carry ``mass``,
    ``arrow`` every expert mixed per token (:mod:`moin_hub.hub.arrow`). Beside them, on the same tokens:
    ``base``, ``oracle``, the dense baseline and branch-train's seed when the workspace has them.

    The softmax temperature of ``topk`` / ``adaptive`` is calibrated when not given
    (:func:`calibrate_routing`): on the TRAINING documents' queries, never on the held-out ones scored here.

    Args:
        workdir: the workspace folder.
        endpoint / token: the Hub the base model is downloaded from.
        seq_len / batch_size: tokens per scored block, blocks per forward pass.
        max_docs_per_topic: score at most this many held-out documents per topic.
        modes: the routing modes to score (:data:`~moin_hub.pipeline.modes.EVAL_MODES`); ``()`` for none.
        k / temperature / mass / threshold: the mixing parameters (see :func:`~moin_hub.hub.mixing.mix_weights`);
            below ``threshold`` a query gets the base model. ``temperature=None``: calibrated.
        arrow: Arrow's top-k, temperature and adaptive gap (default :class:`~moin_hub.hub.arrow.ArrowSpec`).
        plots: write the PNG plots.
        progress: show progress bars while scoring.

    Returns:
        The report, as written to ``<workdir>/report.json``.

    Raises:
        MoinHubError: no trained experts in the workspace, or its stored query embeddings do not match
            its held-out documents.
        ValueError: an unknown mode or bad mixing parameters.

    Example:
        >>> report = evaluate("work", modes=("top1", "topk"), k=2)  # doctest: +SKIP
        >>> report["perplexity"]["overall"]["modes"]["topk"]["ppl"]  # doctest: +SKIP
    """
    from ..hub.loading import load_base
    from .evaluate import evaluate_experts

    check_mixing(modes, {"k": k, "temperature": temperature or 1.0, "mass": mass, "threshold": threshold})
    workdir = Path(workdir)
    workspace = Workspace.load(workdir)
    experts = expert_dirs(workdir)
    if not experts:
        raise MoinHubError(f"No trained experts in {workdir / EXPERTS_DIR}.", hint="Run `moin-hub train` first.")
    calibration = None
    if temperature is None:
        calibration = calibrate_routing(workdir, experts, endpoint=endpoint, token=token)
        temperature = calibration["temperature"]
    heldout = _read_jsonl(workdir / "documents" / "heldout.jsonl")
    train_rows = _read_jsonl(workdir / "documents" / "train.jsonl")
    candidates = ranked_experts(workdir, experts, len(heldout), k=k) if modes else None
    eval_sets: dict[str, list[str]] = {}
    routed: dict[str, list[str | None]] = {}
    ranked: dict[str, list[list[tuple[str, float]]]] = {}
    for i, row in enumerate(heldout):
        topic = topic_expert_id(row["topic"])
        if max_docs_per_topic is not None and len(eval_sets.get(topic, ())) >= max_docs_per_topic:
            continue
        choice = topic_expert_id(row["routed"])
        eval_sets.setdefault(topic, []).append(row["text"])
        routed.setdefault(topic, []).append(choice if choice in experts else None)
        if candidates is not None:
            ranked.setdefault(topic, []).append(candidates[i])
    dense_dir, seed_dir = workdir / DENSE_DIR / DENSE_ID, workdir / SEED_ID
    start = time.perf_counter()
    model, tokenizer = load_base(base_model_dir(workspace, endpoint=endpoint, token=token))
    scores = evaluate_experts(model, tokenizer, experts, eval_sets, routed=routed, ranked=ranked or None,
                              modes=modes, k=k, temperature=temperature, mass=mass, threshold=threshold,
                              seq_len=seq_len, batch_size=batch_size, arrow=arrow,
                              dense_dir=dense_dir if is_finished(dense_dir) else None,
                              seed_dir=seed_dir if is_finished(seed_dir) else None, progress=progress)
    seconds = time.perf_counter() - start
    report = {
        "workspace": str(workdir), "base_model": workspace.base_model.to_dict(),
        "embedder": workspace.embedder.to_dict(), "corpus": workspace.corpus,
        "clustering": workspace.clustering, "query_words": workspace.query_words,
        "routing": routing_scores(train_rows, heldout),
        "perplexity": scores, "calibration": calibration,
        "training": _training_summary(experts, {DENSE_ID: dense_dir, SEED_ID: seed_dir}),
        "eval_seconds": round(seconds, 2), "created_at": utc_now(), "created_by": f"moin-hub {__version__}",
    }
    report["targets"] = check_targets(report)
    if plots:
        from .plots import write_plots

        report["plots"] = [str(p) for p in write_plots(workdir, report, topic_model(workdir))]
    write_json(workdir / REPORT_FILENAME, report)
    return report


def calibrate_routing(workdir: str | os.PathLike, experts: Mapping[str, Any], *, endpoint: str | None = None,
                      token: str | bool | None = None) -> dict[str, Any]:
    """Calibrate the mixing temperature on the workspace's TRAINING documents: each one's first
    ``query_words`` words against the trained experts' centroids, its own topic as the label
    (:func:`~moin_hub.hub.mixing.calibrate_temperature`). The held-out documents the report scores are not
    used. Queries of workspaces made before ``cluster`` stored them are embedded now.

    Returns:
        ``{"temperature", "nll", "queries", "source"}``.
    """
    from ..hub.mixing import calibrate_temperature
    from .cluster import _unit_rows

    workdir = Path(workdir)
    rows = _read_jsonl(workdir / "documents" / "train.jsonl")
    queries = read_embeddings(workdir).get("train_queries")
    if queries is None or queries.shape[0] != len(rows):
        from ..hub.embed import load_embedder
        from .cluster import embed_texts

        workspace = Workspace.load(workdir)
        model = load_embedder(workspace.embedder, endpoint=endpoint, token=token).model
        queries = embed_texts(model, [query_of(r["text"], workspace.query_words) for r in rows], show_progress=False)
    ids = sorted(experts)
    centroids = topic_model(workdir).centroids
    column = {topic_expert_id(t): t for t in range(centroids.shape[0])}
    keep = [i for i, r in enumerate(rows) if topic_expert_id(r["topic"]) in experts]
    sims = _unit_rows(queries[keep], field="queries") @ _unit_rows(centroids[[column[e] for e in ids]], field="centroids").T
    labels = [ids.index(topic_expert_id(rows[i]["topic"])) for i in keep]
    temperature, nll = calibrate_temperature(sims, labels)
    return {"temperature": round(temperature, 5), "nll": round(nll, 5), "queries": len(keep),
            "source": "training documents' queries (first query_words words) vs the trained experts' centroids"}


def ranked_experts(workdir: str | os.PathLike, experts: Mapping[str, Any], n_heldout: int, *,
                   k: int) -> list[list[tuple[str, float]]]:
    """For each held-out document, the ``k`` trained experts nearest its query, best first, with their
    cosine similarities: the query embeddings the cluster step stored against the topic centroids, searched
    as :func:`~moin_hub.pipeline.cluster.nearest_centroid` searches them (so the first is the ``routed`` topic).

    Raises:
        MoinHubError: the stored query embeddings do not match the held-out documents or the centroids.
    """
    import faiss

    from .cluster import _unit_rows

    workdir = Path(workdir)
    queries = read_embeddings(workdir).get("queries")
    centroids = topic_model(workdir).centroids
    if queries is None or queries.shape[0] != n_heldout or queries.shape[1] != centroids.shape[1]:
        shape = None if queries is None else tuple(queries.shape)
        raise MoinHubError(f"{workdir / 'documents' / EMBEDDINGS_FILENAME} holds query embeddings of shape {shape} "
                           f"for {n_heldout} held-out documents and {tuple(centroids.shape)} centroids.",
                           hint="Run `moin-hub cluster` again into this folder.")
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(_unit_rows(centroids, field="centroids"))
    sims, ids = index.search(_unit_rows(queries, field="queries"), centroids.shape[0])  # every topic, best first
    ranked = []
    for row_ids, row_sims in zip(ids, sims, strict=True):
        pairs = [(topic_expert_id(int(t)), float(s)) for t, s in zip(row_ids, row_sims, strict=True)]
        ranked.append([(e, s) for e, s in pairs if e in experts][:k])
    return ranked


def routing_scores(train_rows: Sequence[dict[str, Any]], heldout_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Routing accuracy of held-out queries: topic level, and label level when documents have labels."""
    if not heldout_rows:
        return {"documents": 0, "topic_accuracy": None, "label_accuracy": None}
    topic_acc = float(np.mean([row["routed"] == row["topic"] for row in heldout_rows]))
    scores: dict[str, Any] = {"documents": len(heldout_rows), "topic_accuracy": topic_acc, "label_accuracy": None}
    if all(row.get("label") is not None for row in [*train_rows, *heldout_rows]):
        majority = {}
        for topic in {row["topic"] for row in train_rows}:
            counts = Counter(row["label"] for row in train_rows if row["topic"] == topic)
            majority[topic] = counts.most_common(1)[0][0]
        scores["topic_labels"] = {topic_expert_id(t): label for t, label in sorted(majority.items())}
        scores["label_accuracy"] = float(np.mean([majority.get(row["routed"]) == row["label"]
                                                  for row in heldout_rows]))
    return scores


def _training_summary(experts: dict[str, Path], others: dict[str, Path]) -> dict[str, Any]:
    summary = {}
    for expert_id, folder in {**experts, **{i: d for i, d in others.items() if is_finished(d)}}.items():
        path = folder / TRAINING_FILENAME
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            summary[expert_id] = {k: data.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_second",
                                                            "initial_loss", "final_loss", "topic_tokens")}
    return summary


#: Targets: routed >= 10% below base, within 2% of oracle, no worse than the dense LoRA (in blocks, and on
#: exactly the same tokens as ``top1_vs_dense``); genre-level routing > 80%.
TARGETS = {"routed_vs_base": 0.90, "routed_vs_oracle": 1.02, "routed_vs_dense": 1.0, "top1_vs_dense": 1.0,
           "label_accuracy": 0.80}


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Compare the measured overall numbers with :data:`TARGETS`; ``met`` is ``None`` when not measured."""
    overall = report["perplexity"]["overall"]
    routed, base = overall.get("routed_ppl"), overall.get("base_ppl")
    oracle, dense = overall.get("oracle_ppl"), overall.get("dense_ppl")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a and b else None

    modes = overall.get("modes", {})
    top1, dense_row = ((modes.get(row) or {}).get("ppl") for row in ("top1", DENSE_ROW))
    out = {"routed_vs_base": ratio(routed, base), "routed_vs_oracle": ratio(routed, oracle),
           "routed_vs_dense": ratio(routed, dense), "top1_vs_dense": ratio(top1, dense_row),
           "label_accuracy": report["routing"].get("label_accuracy")}
    met = {}
    for name, value in out.items():
        goal = TARGETS[name]
        met[name] = None if value is None else (value > goal if name == "label_accuracy" else value <= goal)
    worse = sorted(t for t, s in report["perplexity"].get("topics", {}).items() if s.get("worse_than_base"))
    return {"measured": out, "goals": TARGETS, "met": met, "topics_worse_than_base": worse}


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_modes(report: dict[str, Any]) -> list[str]:
    """One line per routing mode and reference row of the report's overall scores (none if none was scored)."""
    overall = report["perplexity"]["overall"]
    modes = overall.get("modes", {})
    base = (modes.get("base") or {}).get("ppl")  # the base model on the same tokens as the modes
    dense = (modes.get(DENSE_ROW) or {}).get("ppl")
    lines = []
    for mode, m in modes.items():
        vs = [f"x{m['ppl'] / ref:.3f} of {name}" for name, ref in (("base", base), ("dense", dense))
              if m["ppl"] and ref and mode not in (name, "base")]
        vs_text = f" ({', '.join(vs)})" if vs else ""
        extra = f", {m['base_only']:.0%} to the base" if m.get("base_only") else ""
        if m.get("experts_per_token") is not None:
            extra += f", {m['experts_per_token']:.2f} experts per token and layer"
        lines.append(f"Mode {mode:<9} ppl {_fmt(m['ppl'])}{vs_text}  {_fmt(m['mean_experts'])} experts/document, "
                     f"{m['mixtures']} distinct mixture(s){extra}, {m['tokens']} tokens")
    mixing = report["perplexity"].get("mixing") or {}
    calibration = report.get("calibration")
    if mixing:
        how = (f"calibrated on {calibration['queries']} training queries" if calibration else "given")
        lines.append(f"Mixing: k={mixing['k']}, temperature {mixing['temperature']:.4g} ({how}), mass {mixing['mass']}"
                     + (f", Arrow {mixing['arrow']}" if mixing.get("arrow") else ""))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The evaluation report as a table for people."""
    lines = [f"{'topic':<12}{'base':>9}{'routed':>9}{'oracle':>9}{'dense':>9}{'routed->own':>13}"]
    rows = {**report["perplexity"]["topics"], "overall": report["perplexity"]["overall"]}
    for topic, s in rows.items():
        own = s.get("routed_to_own")
        flag = "  worse than base" if s.get("worse_than_base") else ""
        lines.append(f"{topic:<12}{_fmt(s['base_ppl']):>9}{_fmt(s['routed_ppl']):>9}{_fmt(s['oracle_ppl']):>9}"
                     f"{_fmt(s['dense_ppl']):>9}{_fmt(own):>13}{flag}")
    lines.extend(format_modes(report))
    routing = report["routing"]
    lines.append(f"Routing accuracy: topic {_fmt(routing['topic_accuracy'], 3)}, "
                 f"label {_fmt(routing['label_accuracy'], 3)} over {routing['documents']} held-out queries")
    targets = report["targets"]
    goals = ", ".join(f"{name} {_fmt(value, 3)} ({'met' if met else 'not met' if met is not None else 'n/a'})"
                      for (name, value), met in zip(targets["measured"].items(), targets["met"].values(), strict=True))
    lines.append(f"Targets: {goals}")
    worse = targets.get("topics_worse_than_base")
    if worse:
        lines.append(f"Routed documents did worse than the base model on: {', '.join(worse)}")
    for path in report.get("plots", []):
        lines.append(f"Plot: {path}")
    return "\n".join(lines)
