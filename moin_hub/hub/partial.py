"""Route over a big v2 registry by downloading only part of it: the coarse file and the probed cells.

A cold :class:`~moin_hub.Router` over a compacted v2 registry of at least its ``index_threshold`` experts
uses :class:`PartialIndex` instead of downloading every row: the query is compared with the cell
centroids of ``index/coarse.safetensors``; the float16 centroid files of the ``nprobe`` nearest cells
(``index/cells/``) are downloaded and scored; the shards holding the best candidates are downloaded and
rescored exactly, together with the rows pushed since the last compaction (the delta shards). Files are
kept, per commit, in the HF cache. See :mod:`moin_hub.hub.cells` for how cells and ``nprobe`` are made.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..errors import InvalidRegistryError
from .cells import Coarse, read_coarse, unit_rows
from .config import ExpertRecord
from .registry import Registry, shard_reader
from .retry import retry_transient
from .rows import experts_from_table
from .shards import COARSE_FILENAME, ShardReader, index_cell_path, table_centroids

#: Candidates whose float16 score is within this of the k-th best are rescored exactly (float32).
RERANK_MARGIN = 2e-3


@dataclass
class PartialIndex:
    """Cells of a v2 registry, fetched on demand; searched exactly inside the probed cells."""

    reader: ShardReader = field(repr=False)
    coarse: Coarse = field(repr=False)
    nprobe: int = 0
    kind: str = "cells"
    build_seconds: float = 0.0
    _shards: dict[str, tuple[pa.Table, np.ndarray]] = field(default_factory=dict, repr=False)
    _cells: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, registry: Registry, *, nprobe: int | None = None) -> PartialIndex | None:
        """The partial index of a v2 registry, or None when it has no coarse file (v1, small, not compacted)."""
        if registry.manifest.format_version < 2:
            return None
        start = time.perf_counter()

        def read() -> PartialIndex | None:
            reader = shard_reader(registry.registry_id, registry.revision, registry.manifest,
                                  endpoint=registry.endpoint, token=registry.token)
            if not reader.layout.has_coarse:
                return None
            coarse = read_coarse(str(reader.path(COARSE_FILENAME)), dim=registry.manifest.embedder.dim)
            return cls(reader, coarse, nprobe or coarse.nprobe)

        index = retry_transient(read, what=f"reading the index of {registry.registry_id}")
        if index is not None:
            index.build_seconds = time.perf_counter() - start
        return index

    @property
    def size(self) -> int:
        """Rows of the registry (compacted less removed, plus deltas)."""
        return self.reader.count()

    @property
    def exact(self) -> bool:
        return False

    @property
    def fetched_shards(self) -> int:
        """How many files (cell centroid files and shards) have been downloaded so far."""
        return len(self._shards) + len(self._cells)

    def _fetch(self, paths: list[str]) -> None:
        """Download and parse the shards of ``paths`` not fetched yet (in parallel)."""
        with self._lock:
            missing = [path for path in paths if path not in self._shards]
        if not missing:
            return
        tables = retry_transient(lambda: self.reader.tables(missing), what=f"reading {len(missing)} shard(s)")
        dim = self.reader.manifest.embedder.dim
        for path, table in zip(missing, tables, strict=True):
            vectors = table_centroids(table, dim)
            if not np.all(np.isfinite(vectors)):
                raise InvalidRegistryError(self.reader.registry_id, f"{path}: centroids are not finite")
            with self._lock:
                self._shards[path] = (table, unit_rows(vectors))

    def _fetch_cells(self, shards: list[str]) -> None:
        """Download the float16 centroid files of the cells ``shards`` not fetched yet (in parallel)."""
        from safetensors.numpy import load_file

        with self._lock:
            missing = [shard for shard in shards if shard not in self._cells]
        if not missing:
            return

        def one(shard: str) -> np.ndarray:
            path = retry_transient(lambda: self.reader.path(index_cell_path(shard)), what=f"reading {shard}")
            vectors = load_file(str(path))["centroids"].astype(np.float32)
            if vectors.ndim != 2 or vectors.shape[1] != self.reader.manifest.embedder.dim:
                raise InvalidRegistryError(self.reader.registry_id, f"{index_cell_path(shard)}: bad shape")
            return vectors

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            loaded = list(pool.map(one, missing))
        with self._lock:
            self._cells.update(zip(missing, loaded, strict=True))

    def search(self, query: np.ndarray, k: int) -> list[tuple[ExpertRecord, float]]:
        """The ``k`` nearest rows of the unit ``query`` among the probed cells and the deltas, best first.

        The probed cells are scored with their float16 centroid files; the shards of the candidates within
        :data:`RERANK_MARGIN` of the k-th best are then downloaded and rescored exactly (float32), with the
        delta rows. Only the rows returned are parsed into (checked) records.
        """
        query = np.asarray(query, dtype=np.float32)
        probed = self.coarse.probe(query, self.nprobe)
        self._fetch_cells(probed)
        scores = np.concatenate([self._cells[shard] @ query for shard in probed])
        owners = np.concatenate([np.full(len(self._cells[shard]), i) for i, shard in enumerate(probed)])
        rows = np.concatenate([np.arange(len(self._cells[shard])) for shard in probed])
        exact_paths = sorted(self.reader.layout.deltas)
        threshold = np.inf
        if len(scores):
            threshold = np.sort(scores)[::-1][:k][-1] - RERANK_MARGIN
            exact_paths += sorted({probed[owners[i]] for i in np.flatnonzero(scores >= threshold)})
        self._fetch(exact_paths)
        candidates: list[tuple[float, str, int]] = []
        for path in exact_paths:
            table, vectors = self._shards[path]
            if path in self.reader.layout.deltas:
                picked = range(table.num_rows)
            else:
                if table.num_rows != len(self._cells[path]):
                    raise InvalidRegistryError(self.reader.registry_id, f"{path} and its centroid file differ")
                owner = probed.index(path)
                picked = rows[(owners == owner) & (scores >= threshold)]
            candidates += [(float(vectors[row] @ query), path, int(row)) for row in picked]
        candidates.sort(key=lambda c: -c[0])
        out = []
        for score, path, row in candidates[:k]:
            record = experts_from_table(self._shards[path][0].slice(row, 1), registry_id=self.reader.registry_id,
                                        dim=self.reader.manifest.embedder.dim)[0]
            out.append((record, score))
        return out
