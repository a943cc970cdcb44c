"""Synthetic registry rows (384-d clustered centroids), written directly: no training, no expert repos."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from moin_hub.hub.rows import EXPERTS_SCHEMA

DIM = 384


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, *, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, DIM)))
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (0.7 / np.sqrt(DIM))
    return unit(centres[rng.integers(0, clusters, n)] + noise)


def synthetic_table(vectors: np.ndarray, prefix: str = "s") -> pa.Table:
    """Rows of synthetic experts (ids ``{prefix}00000``...), written directly: no training, no expert repos."""
    n = len(vectors)
    ids = [f"{prefix}{i:05d}" for i in range(n)]
    centroid = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * DIM, pa.int32()),
                                        pa.array(vectors.reshape(-1), pa.float32()))
    columns = {"expert_id": pa.array(ids), "repo_id": pa.array([f"test-org/{i}" for i in ids]),
               "revision": pa.array(["c" * 40] * n), "centroid": centroid}
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in EXPERTS_SCHEMA}, schema=EXPERTS_SCHEMA)
