"""The partial-fetch index of a v2 registry: k-means cells over the centroids, one data shard per cell.

A compacted v2 registry of at least :data:`CELLS_MIN_EXPERTS` experts keeps its rows in one parquet shard
per cell (``data/cell-NNNNN.parquet``) and a small coarse file, ``index/coarse.safetensors``: tensor
``"centroids"`` (float16, one unit vector per cell, row i for the i-th shard of ``cells``) and metadata (``cells``,
``nprobe``, ``n_experts``, ``recall``). A cold client downloads the coarse file, picks the ``nprobe``
cells nearest to the query, and downloads those shards only (plus the few rows pushed since the last
compaction, which it searches exactly). ``nprobe`` is calibrated at compaction to recall@1 >=
:data:`CELL_RECALL` against exact search, on queries made from the registry's own centroids plus noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

#: Compaction clusters registries of at least this many experts into cells (smaller: one shard, no coarse file).
CELLS_MIN_EXPERTS = 2048
#: Recall@1 against exact search that the cell ``nprobe`` is calibrated to reach at compaction.
CELL_RECALL = 0.995
COARSE_FORMAT = "moin-coarse-index"

_CALIBRATION_QUERIES = 1024
_CALIBRATION_NOISE = (1.0, 1.7, 3.0)  # query-to-centroid cosine about 0.7, 0.5 and 0.3
_MIN_NPROBE = 2


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as float32 with L2-normalised rows (zero rows stay zero)."""
    out = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def n_cells(n_experts: int) -> int:
    """Cells for ``n_experts`` centroids: 1 below :data:`CELLS_MIN_EXPERTS`, else about 4 sqrt(n).

    Example:
        >>> n_cells(1000), n_cells(10_000), n_cells(100_000)
        (1, 256, 1265)
    """
    if n_experts < CELLS_MIN_EXPERTS:
        return 1
    return max(1, min(round(4 * math.sqrt(n_experts)), n_experts // 39))


@dataclass(frozen=True)
class CellPlan:
    """How compaction splits the rows: a cell per row, the cells' unit centroids and the calibrated nprobe."""

    assignment: np.ndarray = field(metadata={"help": "Cell of each row (int64, in 0..n_cells-1)."})
    centroids: np.ndarray = field(metadata={"help": "(n_cells, dim) unit float32 cell centroids."})
    nprobe: int = field(default=1, metadata={"help": "Cells a query searches."})
    recall: float = field(default=1.0, metadata={"help": "Calibrated recall@1 vs exact search."})


def plan_cells(centroids: np.ndarray, *, seed: int = 0, target_recall: float = CELL_RECALL) -> CellPlan:
    """Cluster ``centroids`` into :func:`n_cells` cells (faiss k-means) and calibrate ``nprobe``.

    Empty cells are dropped (cells are renumbered). Deterministic for a ``seed``.
    """
    vectors = unit_rows(centroids)
    n, dim = vectors.shape
    cells = n_cells(n)
    if cells <= 1:
        mean = vectors.mean(axis=0, keepdims=True) if n else np.zeros((1, dim), np.float32)
        return CellPlan(np.zeros(n, dtype=np.int64), unit_rows(mean), 1, 1.0)
    import faiss

    kmeans = faiss.Kmeans(dim, cells, niter=12, seed=seed, spherical=True, verbose=False)
    kmeans.train(vectors)
    cell_vectors = unit_rows(kmeans.centroids).astype(np.float16).astype(np.float32)  # as stored
    _, nearest = faiss.knn(vectors, cell_vectors, 1, metric=faiss.METRIC_INNER_PRODUCT)
    assignment = nearest[:, 0].astype(np.int64)
    used = np.unique(assignment)
    remap = np.full(cells, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    assignment, cell_vectors = remap[assignment], cell_vectors[used]
    nprobe, recall = calibrate_nprobe(vectors, assignment, cell_vectors, target=target_recall, seed=seed)
    return CellPlan(assignment, cell_vectors, nprobe, recall)


def calibration_queries(vectors: np.ndarray, *, seed: int, count: int = _CALIBRATION_QUERIES) -> np.ndarray:
    """Up to ``count`` queries near the registry's own centroids: a sample of them plus noise, at three
    distances (query-to-centroid cosine about 0.7, 0.5 and 0.3); unit rows."""
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    rows = rng.choice(n, size=min(n, count), replace=False)
    scale = np.resize(np.asarray(_CALIBRATION_NOISE, dtype=np.float32), len(rows))[:, None]
    noise = rng.standard_normal((len(rows), dim)).astype(np.float32) * (scale / math.sqrt(dim))
    return unit_rows(vectors[rows] + noise)


def best_cell_ranks(queries: np.ndarray, vectors: np.ndarray, assignment: np.ndarray,
                    cell_vectors: np.ndarray) -> np.ndarray:
    """For each unit query, the rank (0 = nearest) of the cell holding its exact nearest centroid.

    Probing ``nprobe`` cells finds the exact best of a query exactly when its rank is below ``nprobe``.
    """
    import faiss

    _, best = faiss.knn(queries, vectors, 1, metric=faiss.METRIC_INNER_PRODUCT)
    target_cells = assignment[best[:, 0]]
    cell_sims = queries @ cell_vectors.T
    own = cell_sims[np.arange(len(queries)), target_cells]
    return (cell_sims > own[:, None]).sum(axis=1)


def calibrate_nprobe(vectors: np.ndarray, assignment: np.ndarray, cell_vectors: np.ndarray, *, target: float,
                     seed: int = 0) -> tuple[int, float]:
    """The smallest ``nprobe`` (at least 2) whose recall@1 against exact search reaches ``target``.

    Measured on queries made from the registry's own centroids plus noise (cosine 0.7, 0.5 and 0.3 to
    their centroid).
    """
    ranks = best_cell_ranks(calibration_queries(vectors, seed=seed), vectors, assignment, cell_vectors)
    total = len(cell_vectors)
    needed = int(np.quantile(ranks, target, method="higher")) + 1
    nprobe = min(total, max(_MIN_NPROBE, needed))
    return nprobe, float(np.mean(ranks < nprobe))


def coarse_bytes(cell_vectors: np.ndarray, cells: list[str], *, nprobe: int, n_experts: int,
                 recall: float) -> bytes:
    """The coarse file: cell centroids (float16) as safetensors, with the shard of each cell in its metadata."""
    from safetensors.numpy import save

    metadata = {"format": COARSE_FORMAT, "cells": json.dumps(cells), "nprobe": str(nprobe),
                "n_experts": str(n_experts), "recall": f"{recall:.4f}"}
    return save({"centroids": np.ascontiguousarray(cell_vectors, dtype=np.float16)}, metadata=metadata)


@dataclass(frozen=True)
class Coarse:
    """A parsed coarse file."""

    centroids: np.ndarray
    cells: tuple[str, ...]
    nprobe: int
    n_experts: int
    recall: float

    def probe(self, query: np.ndarray, nprobe: int | None = None) -> list[str]:
        """The shards of the ``nprobe`` cells nearest to the unit ``query``, nearest first."""
        count = min(nprobe or self.nprobe, len(self.cells))
        sims = self.centroids @ np.asarray(query, dtype=np.float32)
        return [self.cells[i] for i in np.argsort(-sims)[:count]]


def read_coarse(path: str, *, dim: int) -> Coarse:
    """Parse a coarse file.

    Raises:
        ValueError: not a coarse file of this dimension, or cells and centroids that do not match.
    """
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as handle:
        metadata = handle.metadata() or {}
        centroids = handle.get_tensor("centroids")
    if metadata.get("format") != COARSE_FORMAT:
        raise ValueError(f"not a {COARSE_FORMAT} file (format={metadata.get('format')!r})")
    cells = tuple(json.loads(metadata["cells"]))
    if centroids.ndim != 2 or centroids.shape != (len(cells), dim) or not np.all(np.isfinite(centroids)):
        raise ValueError(f"coarse centroids of shape {centroids.shape} do not fit {len(cells)} cells of dim {dim}")
    return Coarse(centroids.astype(np.float32), cells, int(metadata["nprobe"]), int(metadata["n_experts"]),
                  float(metadata.get("recall", "nan")))
