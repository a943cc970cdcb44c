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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from ..errors import MoinHubError
from ..hub.client import get_api, resolve_endpoint, sha256_file
from ..hub.config import ADAPTER_WEIGHTS_FILENAME, EmbedderSpec, PinnedModel, similarity_stats
from ..hub.embed import download_model_dir, load_embedder
from ..hub.registry import embedder_dimension, resolve_pinned
from .brown import load_brown
from .corpus import Document, describe, load_documents
from .io import write_jsonl
from .jobs import Phase, TopicJob, TrainConfig, plan_budget
from .train import TRAINING_FILENAME, is_finished, train_dense, train_experts, train_seed
from .workspace import (
    DEFAULT_QUERY_WORDS,
    DENSE_DIR,
    DENSE_ID,
    EMBEDDINGS_FILENAME,
    EXPERTS_DIR,
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
    # the training documents as queries: what `evaluate` calibrates the mixing temperature on
    train_queries = embed_texts(model, [query_of(t, query_words) for t in texts], show_progress=progress)
    held_topic, _ = nearest_centroid(held_vectors, topics.centroids)
    routed, _ = nearest_centroid(query_vectors, topics.centroids)

    topics.save(workdir / "topics")
    train_rows = [{**dataclasses.asdict(d), "topic": int(t)} for d, t in zip(train, topics.training_assignments, strict=True)]
    held_rows = [{**dataclasses.asdict(d), "topic": int(t), "routed": int(r)}
                 for d, t, r in zip(heldout, held_topic, routed, strict=True)]
    write_jsonl(workdir / "documents" / "train.jsonl", train_rows)
    write_jsonl(workdir / "documents" / "heldout.jsonl", held_rows)
    save_file({"train": train_vectors, "heldout": held_vectors, "queries": query_vectors,
               "train_queries": train_queries},
              str(workdir / "documents" / EMBEDDINGS_FILENAME))
    clustering = {"k": topics.num_topics, "method": method, "seed": seed, "sizes": topics.sizes,
                  "metrics": topics.metrics,
                  "heldout_query_routing_agreement": float(np.mean(held_topic == routed)) if len(routed) else None}
    workspace = Workspace(base_model=base_model, embedder=embedder, corpus=corpus_info or {},
                          clustering=clustering, query_words=query_words)
    workspace.save(workdir)
    return workspace


def topic_model(workdir: Path) -> Any:
    """The workspace's :class:`~moin_hub.pipeline.topics.TopicModel` (centroids, keywords, metrics)."""
    from .topics import TopicModel

    return TopicModel.load(workdir / "topics")


# --------------------------------------------------------------------------------------------- train


def make_jobs(workdir: str | os.PathLike, *, max_eval_docs: int | None = 40, n_samples: int = 3,
              sample_chars: int = 400) -> list[TopicJob]:
    """One :class:`TopicJob` per topic of the workspace: its documents, centroid, keywords, samples,
    held-out documents of the same topic (for the perplexities on the expert's card), and the similarity
    statistics of the topic's own queries (the first words of its training documents, as ``cluster``
    embedded them) to its centroid, which calibrate routing scores in the registry."""
    workdir = Path(workdir)
    topics = topic_model(workdir)
    train = _read_jsonl(workdir / "documents" / "train.jsonl")
    heldout = _read_jsonl(workdir / "documents" / "heldout.jsonl")
    queries = read_embeddings(workdir).get("train_queries")
    if queries is not None and queries.shape[0] != len(train):
        queries = None  # not this workspace's documents: leave the statistics out rather than guess
    jobs = []
    for topic in range(topics.num_topics):
        rows = [i for i, row in enumerate(train) if row["topic"] == topic]
        texts = [train[i]["text"] for i in rows]
        if not texts:
            continue
        stats = similarity_stats(queries[rows], topics.centroids[topic]) if queries is not None else (None, None)
        evals = [row["text"] for row in heldout if row["topic"] == topic][:max_eval_docs]
        keywords = topics.keywords[topic] if topics.keywords else []
        samples = [t if len(t) <= sample_chars else t[:sample_chars].rsplit(" ", 1)[0] + " ..."
                   for t in texts[:n_samples]]
        jobs.append(TopicJob(topic_expert_id(topic), texts=texts, centroid=topics.centroids[topic],
                             keywords=keywords, samples=samples, title=", ".join(keywords[:3]),
                             eval_texts=evals or None, sim_mean=stats[0], sim_std=stats[1]))
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
        check_finished(workdir / SEED_ID, config, budget.seed_phase(config))
        seed_dir = train_seed(base_dir, jobs, workdir, config, expert_id=SEED_ID, **kw)
    seed_sha = sha256_file(seed_dir / ADAPTER_WEIGHTS_FILENAME) if seed_dir else None
    for job in jobs:
        check_finished(workdir / EXPERTS_DIR / job.expert_id, config, budget.expert_phase(config), seed_sha=seed_sha)
    folders = train_experts(jobs, workdir / EXPERTS_DIR, config, base_model_dir_or_loader=base_dir, workers=workers,
                            executor=executor, phase=budget.expert_phase(config), init_from=seed_dir, **kw)
    seconds = time.perf_counter() - start
    dense_dir = None
    if dense:
        check_finished(workdir / DENSE_DIR / DENSE_ID, config, budget.dense_phase(config))
        dense_dir = train_dense(base_dir, jobs, workdir / DENSE_DIR, config, expert_id=DENSE_ID, **kw)
    return {"experts": {job.expert_id: str(f) for job, f in zip(jobs, folders, strict=True)},
            "seed": str(seed_dir) if seed_dir else None, "dense": str(dense_dir) if dense_dir else None,
            "budget": budget.to_dict(), "seconds": round(seconds, 2), "workers": workers, "trained": todo}


#: TrainConfig fields that may differ between the experts of one workspace (where and how fast they ran).
_RUNTIME_FIELDS = frozenset({"torch_threads", "device", "bf16", "eval_max_tokens", "eval_batch_size"})
#: TrainConfig fields that only size the budget: a folder trained with the same phase (steps, warmup,
#: schedule) is the same whatever they said.
_BUDGET_FIELDS = frozenset({"tokens_per_expert", "max_steps", "seed_fraction"})


def check_finished(folder: Path, config: TrainConfig, phase: Phase, *, seed_sha: str | None = None) -> None:
    """Refuse a finished expert (or seed, or baseline) in ``folder`` that was not trained as ``config`` and
    ``phase`` say (runtime fields such as threads and device aside), or that was branched from another
    seed than ``seed_sha`` (or from one when ``seed_sha`` is None). Unfinished folders pass: they are trained.

    A folder trained with the same LoRA settings and the same phase (steps, warmup, schedule) passes even if
    the budget was asked for differently, so a seed or a dense baseline can be shared by workspaces that
    cluster the same corpus differently (each is trained on all the corpus, in an order independent of the
    clustering).

    Raises:
        MoinHubError: what differs, with the folder to remove.
    """
    path = folder / TRAINING_FILENAME
    if not is_finished(folder) or not path.is_file():
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(config.to_dict()))  # as training.json holds it (tuples become lists)
    # fields added since the folder was trained hold their defaults there
    was = {**json.loads(json.dumps(TrainConfig().to_dict())), **record.get("config", {})}
    differ = sorted(k for k in set(was) | set(now) if k not in _RUNTIME_FIELDS and was.get(k) != now.get(k))
    trained = record.get("phase") or {"steps": record.get("steps")}
    wanted = phase.to_dict() if "phase" in record else {"steps": phase.steps}
    if trained != wanted or set(differ) - _BUDGET_FIELDS:
        changes = [f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in differ]
        changes += [f"{phase.name} {k}: {trained.get(k)!r} -> {v!r}" for k, v in wanted.items() if trained.get(k) != v]
        raise MoinHubError(f"{folder} was trained with other settings ({', '.join(changes)}).",
                           hint=f"Remove {folder} to retrain it, or train into a new workspace.")
    seeded = (record.get("seed") or {}).get("sha256")
    if phase.name != "seed" and seeded != seed_sha:
        raise MoinHubError(f"{folder} was branched from {'no seed' if not seeded else 'another seed'}, not from "
                           f"{'the current seed' if seed_sha else 'none'}.",
                           hint=f"Remove {folder} to retrain it from the current seed.")


def expert_dirs(workdir: str | os.PathLike) -> dict[str, Path]:
    """The finished experts of a workspace, ``{expert_id: folder}``, sorted by id."""
    root = Path(workdir) / EXPERTS_DIR
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_finished(p)}


# ------------------------------------------------------------------------------------------- push-all


def push_all(workdir: str | os.PathLike, *, registry: str, namespace: str, repo_prefix: str = "moin-",
             create_registry: bool = True, description: str = "", private: bool = False,
             endpoint: str | None = None, token: str | bool | None = None, progress: bool = True,
             fallback_seed: bool = False) -> list[Any]:
    """Push every finished expert of a workspace into a registry (created if missing), one bar for all.

    Expert ``topic-03`` goes to the model repo ``<namespace>/<repo_prefix><registry name>-topic-03``.
    Pushing again updates the experts' repos and rows; experts already pushed are not lost when a
    later one fails (each push is complete on its own). With ``fallback_seed``, branch-train's seed
    (``WORKDIR/seed``) is pushed last as the registry's fallback expert (see ``push_expert(fallback=True)``).

    Returns:
        The :class:`PushResult` of each expert (the seed's last).

    Raises:
        MoinHubError: no trained experts, or ``fallback_seed`` without a finished seed.
    """
    from ..hub.push import push_expert
    from ..hub.registry import init_registry

    workdir = Path(workdir)
    workspace = Workspace.load(workdir)
    experts = expert_dirs(workdir)
    if not experts:
        raise MoinHubError(f"No trained experts in {workdir / EXPERTS_DIR}.", hint="Run `moin-hub train` first.")
    seed_dir = workdir / SEED_ID
    if fallback_seed and not is_finished(seed_dir):
        raise MoinHubError(f"No finished seed in {seed_dir}.",
                           hint="Train with --seed-fraction > 0 (branch-train) to have a seed to push.")
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
    if fallback_seed:
        results.append(push_expert(seed_dir, registry=registry, repo_id=f"{namespace}/{repo_prefix}{name}-{SEED_ID}",
                                   expert_id=SEED_ID, private=private, endpoint=endpoint, token=token,
                                   fallback=True))
    plots = workdir / "plots"
    if plots.is_dir() and any(plots.glob("*.png")):
        from ..hub.registry_plots import publish_plots

        publish_plots(registry, plots, endpoint=endpoint, token=token)  # shown in the registry card from now on
    return results
