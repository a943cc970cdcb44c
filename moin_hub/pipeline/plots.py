"""The paper's plots of an evaluated workspace, as PNG files (matplotlib, no display needed).

- ``perplexity_per_expert.png``: held-out perplexity of each topic under the base model and under its
  expert, sorted by the expert's relative gain, so the experts that underperform stand out;
- ``documents_per_topic.png``: training documents per topic;
- ``topic_map.png``: a 2-D map (PCA) of the training documents, coloured by topic, with the centroids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .workspace import read_embeddings

PLOTS_DIR = "plots"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def write_plots(workdir: str | Path, report: dict[str, Any], topics: Any) -> list[Path]:
    """Write the three plots under ``<workdir>/plots`` and return their paths."""
    out = Path(workdir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_perplexity(report, out / "perplexity_per_expert.png"),
             plot_sizes(topics, out / "documents_per_topic.png")]
    embeddings = read_embeddings(workdir)["train"]
    paths.append(plot_map(embeddings, topics, out / "topic_map.png"))
    return paths


def plot_perplexity(report: dict[str, Any], path: Path) -> Path:
    """Base vs expert (oracle) perplexity per topic, sorted by the relative gain of the expert."""
    plt = _pyplot()
    rows = [(topic, s["base_ppl"], s["oracle_ppl"]) for topic, s in report["perplexity"]["topics"].items()
            if s.get("base_ppl") and s.get("oracle_ppl")]
    rows.sort(key=lambda r: r[2] / r[1])
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(rows) + 2), 4), dpi=110)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], width=0.4, label="base model", color="#9aa5b1")
    ax.bar(x + 0.2, [r[2] for r in rows], width=0.4, label="topic expert", color="#ff9d00")
    for i, (_, base, expert) in enumerate(rows):
        ax.annotate(f"{100 * (expert / base - 1):+.1f}%", (i + 0.2, expert), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r[0] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity per expert, best gain first")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sizes(topics: Any, path: Path) -> Path:
    """Training documents per topic, labelled with the top keywords."""
    plt = _pyplot()
    k = topics.num_topics
    names = [f"topic-{i:02d}" + (f"\n{', '.join(topics.keywords[i][:2])}" if topics.keywords else "")
             for i in range(k)]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * k + 2), 4), dpi=110)
    ax.bar(np.arange(k), topics.sizes, color="#4c78a8")
    ax.set_xticks(np.arange(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("training documents")
    ax.set_title("Documents per topic")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_map(embeddings: np.ndarray, topics: Any, path: Path) -> Path:
    """PCA map of the documents (dots, coloured by topic) and the topic centres (crosses).

    A centroid is a unit vector, longer than the mean of its members, so it would be drawn outside its
    cloud; the cross is the mean of the members' projections (PCA is linear: the same direction)."""
    from .cluster import project_2d

    plt = _pyplot()
    points, _ = project_2d(embeddings, topics.centroids)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    cmap = plt.get_cmap("tab10" if topics.num_topics <= 10 else "tab20")
    labels = topics.training_assignments
    for t in range(topics.num_topics):
        mask = labels == t
        color = cmap(t % cmap.N)
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.5, color=color, label=f"topic-{t:02d}")
        if mask.any():
            center = points[mask].mean(axis=0)
            ax.scatter(center[0], center[1], marker="X", s=140, color=color, edgecolors="black")
    ax.set_title("Documents and topic centroids (PCA of the embeddings)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
