"""The MoIN pipeline over one workspace folder: cluster -> train -> evaluate -> push-all.

Every step reads what the previous one wrote, so each can be rerun on its own (a finished expert is
never retrained). The folder and its files are described in :mod:`moin_hub.pipeline.workspace`.

The base model and the embedder are always loaded from a Hub (the real one or the local server) at a
pinned commit, so an expert trained here names exactly the base it adapts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import MoinHubError
from ..hub.client import get_api, resolve_endpoint, sha256_file
from ..hub.config import ADAPTER_WEIGHTS_FILENAME, EmbedderSpec, PinnedModel, utc_now
from ..hub.embed import download_model_dir, load_embedder
from ..hub.mixing import MODES
from ..hub.registry import embedder_dimension, resolve_pinned
from .brown import load_brown
from .corpus import Document, describe, load_documents
from .io import write_json, write_jsonl
from .jobs import TopicJob, TrainConfig, plan_budget
from .train import TRAINING_FILENAME, is_finished, train_dense, train_experts, train_seed
from .workspace import (
    DEFAULT_QUERY_WORDS,
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

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- models


def resolve_models(base_model: str, embedder: str, *, base_revision: str | None = None,
                   embedder_revision: str | None = None, endpoint: str | None = None,
                   token: str | bool | None = None) -> tuple[PinnedModel, EmbedderSpec]:
    """Pin the base model and the embedder on the Hub: repo ids + revisions -> commit shas (+ dimension).

    Raises:
        MoinHubError: a repo or revision is not on the Hub (with a hint for the offline defaults).
    """
    api = get_api(endpoint, token)
    try:
        base = resolve_pinned(api, base_model, base_revision, what="base model")
        emb = resolve_pinned(api, embedder, embedder_revision, what="embedder")
    except MoinHubError as err:
        raise MoinHubError(str(err), hint="Offline, publish the bundled defaults to your Hub first: "
                                          "`moin-hub publish-assets --endpoint URL`.") from None
    dim = embedder_dimension(emb.repo_id, emb.revision, endpoint=api.endpoint, token=token)
    return base, EmbedderSpec(emb.repo_id, emb.revision, dim=dim)


# -------------------------------------------------------------------------------------------- corpus


def load_corpus(corpus: str, *, text_column: str = "text", split: str = "train", max_files: int | None = None,
                heldout_fraction: float = 0.2, seed: int = 0,
                words_per_doc: int = 200) -> tuple[list[Document], list[Document], dict[str, Any]]:
    """Load a corpus and split it into training and held-out documents, by source.

    Args:
        corpus: ``"brown"`` (the bundled Brown Corpus, genre groups as labels), a JSONL / text file or
            folder, a saved ``datasets`` folder, or a Hub dataset id.
        text_column: the column holding the text (JSONL and datasets).
        split: the dataset split to read (datasets only).
        max_files: Brown only: a balanced subset of this many files, for quick runs.
        heldout_fraction: the share held out. Brown is split by file (stratified per genre group); other
            corpora by ``source`` when they have at least 5 sources, else by a hash of the document id.
        seed: fixes the split.
        words_per_doc: Brown only: the target words per document.

    Returns:
        ``(train, heldout, description)``.

    Raises:
        InvalidCorpusError / AssetNotFoundError: the corpus cannot be read.
        ValueError: a split leaves no training or no held-out document.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}.")
    if corpus == "brown":
        kw = {"heldout_fraction": heldout_fraction, "seed": seed, "max_files": max_files,
              "words_per_doc": words_per_doc}
        train, heldout = load_brown("train", **kw), load_brown("heldout", **kw)
        info = {"name": "brown", "max_files": max_files, "words_per_doc": words_per_doc}
    else:
        documents = load_documents(corpus, text_column=text_column, split=split)
        sources = sorted({d.source for d in documents})
        by_source = len(sources) >= 5
        key = (lambda d: d.source) if by_source else (lambda d: d.doc_id)  # noqa: E731
        held = {d for d in documents if _hash_fraction(key(d), seed) < heldout_fraction}
        train = [d for d in documents if d not in held]
        heldout = [d for d in documents if d in held]
        info = {"name": str(corpus), "split_by": "source" if by_source else "document"}
    if not train or not heldout:
        raise ValueError(f"splitting the corpus left {len(train)} training and {len(heldout)} held-out "
                         "documents; give more documents or another heldout_fraction.")
    info.update(heldout_fraction=heldout_fraction, seed=seed, train=describe(train), heldout=describe(heldout))
    return train, heldout, info


def _hash_fraction(key: str, seed: int) -> float:
    """A deterministic number in [0, 1) for ``key`` (stable across runs and machines, unlike ``hash``)."""
    return zlib.crc32(f"{seed}:{key}".encode()) / 2**32


# ------------------------------------------------------------------------------------------- cluster


def cluster(workdir: str | os.PathLike, train: Sequence[Document], heldout: Sequence[Document], *,
            base_model: PinnedModel, embedder: EmbedderSpec, k: int = 8, method: str = "kmeans", seed: int = 0,
            min_cluster_size: int | None = None, corpus_info: dict[str, Any] | None = None,
            query_words: int = DEFAULT_QUERY_WORDS, endpoint: str | None = None, token: str | bool | None = None,
            progress: bool = True) -> Workspace:
    """Embed the documents, find the topics, and write a workspace.

    Held-out documents get two topics: ``topic``, the nearest centroid to the whole text (the
    "oracle" topic), and ``routed``, the nearest centroid to its first ``query_words`` words (what
    the router picks from a query).

    Returns:
        The :class:`Workspace` written to ``<workdir>/moin_workspace.json``.
    """
    from .cluster import cluster_documents, embed_texts, nearest_centroid

    workdir = Path(workdir)
    model = load_embedder(embedder, endpoint=endpoint, token=token).model
    labels = [d.label for d in train]
    has_labels = all(label is not None for label in labels)
    texts = [d.text for d in train]
    train_vectors = embed_texts(model, texts, show_progress=progress)
    topics = cluster_documents(texts, model, k=k, method=method, seed=seed, labels=labels if has_labels else None,
                               min_cluster_size=min_cluster_size, embeddings=train_vectors)
    held_texts = [d.text for d in heldout]
    held_vectors = embed_texts(model, held_texts, show_progress=progress)
    query_vectors = embed_texts(model, [query_of(t, query_words) for t in held_texts], show_progress=progress)
    held_topic, _ = nearest_centroid(held_vectors, topics.centroids)
    routed, _ = nearest_centroid(query_vectors, topics.centroids)

    topics.save(workdir / "topics")
    train_rows = [{**dataclasses.asdict(d), "topic": int(t)} for d, t in zip(train, topics.training_assignments, strict=True)]
    held_rows = [{**dataclasses.asdict(d), "topic": int(t), "routed": int(r)}
                 for d, t, r in zip(heldout, held_topic, routed, strict=True)]
    write_jsonl(workdir / "documents" / "train.jsonl", train_rows)
    write_jsonl(workdir / "documents" / "heldout.jsonl", held_rows)
    save_file({"train": train_vectors, "heldout": held_vectors, "queries": query_vectors},
              str(workdir / "documents" / EMBEDDINGS_FILENAME))
    clustering = {"k": topics.num_topics, "method": method, "seed": seed, "sizes": topics.sizes,
                  "metrics": topics.metrics,
                  "heldout_query_routing_agreement": float(np.mean(held_topic == routed)) if len(routed) else None}
    workspace = Workspace(base_model=base_model, embedder=embedder, corpus=corpus_info or {},
                          clustering=clustering, query_words=query_words)
    workspace.save(workdir)
    return workspace


def _topics(workdir: Path) -> Any:
    from .topics import TopicModel

    return TopicModel.load(workdir / "topics")


# --------------------------------------------------------------------------------------------- train


def make_jobs(workdir: str | os.PathLike, *, max_eval_docs: int | None = 40, n_samples: int = 3,
              sample_chars: int = 400) -> list[TopicJob]:
    """One :class:`TopicJob` per topic of the workspace: its documents, centroid, keywords, samples, and
    held-out documents of the same topic (for the perplexities on the expert's card)."""
    workdir = Path(workdir)
    topics = _topics(workdir)
    train = _read_jsonl(workdir / "documents" / "train.jsonl")
    heldout = _read_jsonl(workdir / "documents" / "heldout.jsonl")
    jobs = []
    for topic in range(topics.num_topics):
        texts = [row["text"] for row in train if row["topic"] == topic]
        if not texts:
            continue
        evals = [row["text"] for row in heldout if row["topic"] == topic][:max_eval_docs]
        keywords = topics.keywords[topic] if topics.keywords else []
        samples = [t if len(t) <= sample_chars else t[:sample_chars].rsplit(" ", 1)[0] + " ..."
                   for t in texts[:n_samples]]
        jobs.append(TopicJob(topic_expert_id(topic), texts=texts, centroid=topics.centroids[topic],
                             keywords=keywords, samples=samples, title=", ".join(keywords[:3]),
                             eval_texts=evals or None))
    return jobs


def base_model_dir(workspace: Workspace, *, endpoint: str | None = None, token: str | bool | None = None) -> Path:
    """Download (once, into the HF cache) the workspace's base model at its pinned commit."""
    return download_model_dir(workspace.base_model.repo_id, workspace.base_model.revision, endpoint=endpoint,
                              token=token)


def train(workdir: str | os.PathLike, config: TrainConfig | None = None, *, workers: int = 1,
          executor: str = "local", dense: bool = False, endpoint: str | None = None,
          token: str | bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one expert per topic into ``<workdir>/experts`` (and the dense baseline with ``dense=True``).

    With ``config.seed_fraction > 0`` (branch-train), one shared seed LoRA is first trained on all topics
    into ``<workdir>/seed`` with that share of the total budget, and every expert continues from it on its
    topic alone; :func:`~moin_hub.pipeline.jobs.plan_budget` keeps seed + experts = dense, in tokens.

    Finished experts are skipped; a failure loses only that expert (see :func:`train_experts`). Finished
    experts (and the seed) must have been trained with the same settings, and from the same seed: a rerun
    with other settings is refused rather than mixing two kinds of experts in one workspace.

    Returns:
        ``{"experts": {id: folder}, "seed": folder | None, "dense": folder | None, "budget": the token
        accounting, "seconds": wall time, "workers": n, "trained": ids trained by this call}``.

    Raises:
        MoinHubError: finished experts or seed in ``workdir`` were trained with other settings.
        ExpertTrainingError: some experts failed (the others are on disk).
    """
    workdir = Path(workdir)
    workspace = Workspace.load(workdir)
    config = config or TrainConfig()
    jobs = make_jobs(workdir)
    budget = plan_budget(config, len(jobs))
    base_dir = str(base_model_dir(workspace, endpoint=endpoint, token=token))
    kw = {"base_model_id": workspace.base_model.repo_id, "base_revision": workspace.base_model.revision,
          "progress": progress}
    todo = [job.expert_id for job in jobs if not is_finished(workdir / EXPERTS_DIR / job.expert_id)]
    start = time.perf_counter()
    seed_dir = None
    if budget.seed_steps:
        check_finished(workdir / SEED_ID, config)
        seed_dir = train_seed(base_dir, jobs, workdir, config, expert_id=SEED_ID, **kw)
    seed_sha = sha256_file(seed_dir / ADAPTER_WEIGHTS_FILENAME) if seed_dir else None
    for job in jobs:
        check_finished(workdir / EXPERTS_DIR / job.expert_id, config, seed_sha=seed_sha)
    folders = train_experts(jobs, workdir / EXPERTS_DIR, config, base_model_dir_or_loader=base_dir, workers=workers,
                            executor=executor, phase=budget.expert_phase(config), init_from=seed_dir, **kw)
    seconds = time.perf_counter() - start
    dense_dir = None
    if dense:
        check_finished(workdir / DENSE_DIR / DENSE_ID, config, ignore=("seed_fraction",))  # same steps either way
        dense_dir = train_dense(base_dir, jobs, workdir / DENSE_DIR, config, expert_id=DENSE_ID, **kw)
    return {"experts": {job.expert_id: str(f) for job, f in zip(jobs, folders, strict=True)},
            "seed": str(seed_dir) if seed_dir else None, "dense": str(dense_dir) if dense_dir else None,
            "budget": budget.to_dict(), "seconds": round(seconds, 2), "workers": workers, "trained": todo}


#: TrainConfig fields that may differ between the experts of one workspace (where and how fast they ran).
_RUNTIME_FIELDS = frozenset({"torch_threads", "device", "bf16", "eval_max_tokens", "eval_batch_size"})


def check_finished(folder: Path, config: TrainConfig, *, seed_sha: str | None = None,
                   ignore: Sequence[str] = ()) -> None:
    """Refuse a finished expert (or seed, or baseline) in ``folder`` trained with other settings than
    ``config`` (runtime fields aside), or branched from another seed than ``seed_sha`` (or from one when
    ``seed_sha`` is None). ``ignore`` names more fields that may differ. Unfinished folders pass: they are
    trained.

    Raises:
        MoinHubError: what differs, with the folder to remove.
    """
    path = folder / TRAINING_FILENAME
    if not is_finished(folder) or not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    skip = _RUNTIME_FIELDS | set(ignore)
    now = json.loads(json.dumps(config.to_dict()))  # as training.json holds it (tuples become lists)
    # fields added since the folder was trained hold their defaults there
    was = {**json.loads(json.dumps(TrainConfig().to_dict())), **record.get("config", {})}
    was, now = ({k: v for k, v in d.items() if k not in skip} for d in (was, now))
    differ = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if differ:
        changes = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise MoinHubError(f"{folder} was trained with other settings ({changes}).",
                           hint=f"Remove {folder} to retrain it, or train into a new workspace.")
    seeded = (record.get("seed") or {}).get("sha256")
    if folder.name != SEED_ID and seeded != seed_sha:
        raise MoinHubError(f"{folder} was branched from {'no seed' if not seeded else 'another seed'}, not from "
                           f"{'the current seed' if seed_sha else 'none'}.",
                           hint=f"Remove {folder} to retrain it from the current seed.")


def expert_dirs(workdir: str | os.PathLike) -> dict[str, Path]:
    """The finished experts of a workspace, ``{expert_id: folder}``, sorted by id."""
    root = Path(workdir) / EXPERTS_DIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_finished(p)}


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(workdir: str | os.PathLike, *, endpoint: str | None = None, token: str | bool | None = None,
             seq_len: int = 256, batch_size: int = 8, max_docs_per_topic: int | None = None,
             modes: Sequence[str] = MODES, k: int = 3, temperature: float = 0.05, mass: float = 0.8,
             threshold: float | None = None, plots: bool = True) -> dict[str, Any]:
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
    router would), ``topk`` a softmax over the ``k`` nearest, ``adaptive`` as few as carry ``mass``.

    Args:
        workdir: the workspace folder.
        endpoint / token: the Hub the base model is downloaded from.
        seq_len / batch_size: tokens per scored block, blocks per forward pass.
        max_docs_per_topic: score at most this many held-out documents per topic.
        modes: the routing modes to score (:data:`~moin_hub.hub.mixing.MODES`); ``()`` for none.
        k / temperature / mass / threshold: the mixing parameters (see :func:`~moin_hub.hub.mixing.mix_weights`);
            below ``threshold`` a query gets the base model.
        plots: write the PNG plots.

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
    from .evaluate import check_mixing, evaluate_experts

    check_mixing(modes, {"k": k, "temperature": temperature, "mass": mass, "threshold": threshold})
    workdir = Path(workdir)
    workspace = Workspace.load(workdir)
    experts = expert_dirs(workdir)
    if not experts:
        raise MoinHubError(f"No trained experts in {workdir / EXPERTS_DIR}.", hint="Run `moin-hub train` first.")
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
    dense_dir = workdir / DENSE_DIR / DENSE_ID
    start = time.perf_counter()
    model, tokenizer = load_base(base_model_dir(workspace, endpoint=endpoint, token=token))
    scores = evaluate_experts(model, tokenizer, experts, eval_sets, routed=routed, ranked=ranked or None,
                              modes=modes, k=k, temperature=temperature, mass=mass, threshold=threshold,
                              seq_len=seq_len, batch_size=batch_size,
                              dense_dir=dense_dir if is_finished(dense_dir) else None)
    seconds = time.perf_counter() - start
    report = {
        "workspace": str(workdir), "base_model": workspace.base_model.to_dict(),
        "embedder": workspace.embedder.to_dict(), "corpus": workspace.corpus,
        "clustering": workspace.clustering, "query_words": workspace.query_words,
        "routing": routing_scores(train_rows, heldout),
        "perplexity": scores, "training": _training_summary(experts, dense_dir),
        "eval_seconds": round(seconds, 2), "created_at": utc_now(), "created_by": f"moin-hub {__version__}",
    }
    report["targets"] = check_targets(report)
    if plots:
        from .plots import write_plots

        report["plots"] = [str(p) for p in write_plots(workdir, report, _topics(workdir))]
    write_json(workdir / REPORT_FILENAME, report)
    return report


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
    centroids = _topics(workdir).centroids
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


def _training_summary(experts: dict[str, Path], dense_dir: Path) -> dict[str, Any]:
    summary = {}
    for expert_id, folder in {**experts, **({DENSE_ID: dense_dir} if is_finished(dense_dir) else {})}.items():
        path = folder / TRAINING_FILENAME
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            summary[expert_id] = {k: data.get(k) for k in ("steps", "tokens", "seconds", "tokens_per_second",
                                                            "initial_loss", "final_loss", "topic_tokens")}
    return summary


#: The issue's targets: routed >= 10% below base, within 2% of oracle, no worse than dense; routing > 80%.
TARGETS = {"routed_vs_base": 0.90, "routed_vs_oracle": 1.02, "routed_vs_dense": 1.0, "label_accuracy": 0.80}


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """Compare the measured overall numbers with :data:`TARGETS`; ``met`` is ``None`` when not measured."""
    overall = report["perplexity"]["overall"]
    routed, base = overall.get("routed_ppl"), overall.get("base_ppl")
    oracle, dense = overall.get("oracle_ppl"), overall.get("dense_ppl")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a and b else None

    out = {"routed_vs_base": ratio(routed, base), "routed_vs_oracle": ratio(routed, oracle),
           "routed_vs_dense": ratio(routed, dense), "label_accuracy": report["routing"].get("label_accuracy")}
    met = {}
    for name, value in out.items():
        goal = TARGETS[name]
        met[name] = None if value is None else (value > goal if name == "label_accuracy" else value <= goal)
    return {"measured": out, "goals": TARGETS, "met": met}


# ------------------------------------------------------------------------------------------- push-all


def push_all(workdir: str | os.PathLike, *, registry: str, namespace: str, repo_prefix: str = "moin-",
             create_registry: bool = True, description: str = "", private: bool = False,
             endpoint: str | None = None, token: str | bool | None = None, progress: bool = True) -> list[Any]:
    """Push every finished expert of a workspace into a registry (created if missing), one bar for all.

    Expert ``topic-03`` goes to the model repo ``<namespace>/<repo_prefix><registry name>-topic-03``.
    Pushing again updates the experts' repos and rows; experts already pushed are not lost when a
    later one fails (each push is complete on its own).

    Returns:
        The :class:`PushResult` of each expert.
    """
    from ..hub.push import push_expert
    from ..hub.registry import init_registry

    workdir = Path(workdir)
    workspace = Workspace.load(workdir)
    experts = expert_dirs(workdir)
    if not experts:
        raise MoinHubError(f"No trained experts in {workdir / EXPERTS_DIR}.", hint="Run `moin-hub train` first.")
    endpoint = resolve_endpoint(endpoint)
    if create_registry:
        init_registry(registry, base_model=workspace.base_model.repo_id, base_revision=workspace.base_model.revision,
                      embedder=workspace.embedder.repo_id, embedder_revision=workspace.embedder.revision,
                      embedder_dim=workspace.embedder.dim, description=description, private=private,
                      exist_ok=True, endpoint=endpoint, token=token)
    name = registry.split("/", 1)[1]
    results = []
    for expert_id, folder in tqdm(experts.items(), desc="Pushing experts", unit="expert", disable=not progress):
        results.append(push_expert(folder, registry=registry, repo_id=f"{namespace}/{repo_prefix}{name}-{expert_id}",
                                   private=private, endpoint=endpoint, token=token))
    plots = workdir / "plots"
    if plots.is_dir() and any(plots.glob("*.png")):
        from ..hub.registry_plots import publish_plots

        publish_plots(registry, plots, endpoint=endpoint, token=token)  # shown in the registry card from now on
    return results
