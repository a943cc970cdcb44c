"""Route over a big v2 registry by downloading only part of it: the coarse file and the probed cells.

A cold :class:`~moin_hub.Router` over a compacted v2 registry of at least its ``index_threshold`` experts
uses :class:`PartialIndex` instead of downloading every row: the query is compared with the cell
centroids of ``index/coarse.safetensors``, the ``nprobe`` nearest cells' shards are downloaded (and
kept, per commit, in the HF cache) and searched exactly, together with the rows pushed since the last
compaction (the delta shards). See :mod:`moin_hub.hub.cells` for how cells and ``nprobe`` are made.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..errors import InvalidRegistryError
from .cells import Coarse, read_coarse
from .config import ExpertRecord
from .registry import Registry, shard_reader
from .retry import retry_transient
from .rows import experts_from_table
from .shards import COARSE_FILENAME, ShardReader


@dataclass
class PartialIndex:
    """Cells of a v2 registry, fetched on demand; searched exactly inside the probed cells."""

    reader: ShardReader = field(repr=False)
    coarse: Coarse = field(repr=False)
    nprobe: int = 0
    kind: str = "cells"
    build_seconds: float = 0.0
    _shards: dict[str, tuple[pa.Table, np.ndarray]] = field(default_factory=dict, repr=False)
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
        """How many shards have been downloaded so far."""
        return len(self._shards)

    def _fetch(self, paths: list[str]) -> None:
        """Download and parse the shards of ``paths`` not fetched yet (in parallel)."""
        with self._lock:
            missing = [path for path in paths if path not in self._shards]
        if not missing:
            return
        tables = retry_transient(lambda: self.reader.tables(missing), what=f"reading {len(missing)} shard(s)")
        dim = self.reader.manifest.embedder.dim
        for path, table in zip(missing, tables, strict=True):
            flat = table["centroid"].combine_chunks().flatten() if table.num_rows else []
            vectors = np.asarray(flat, dtype=np.float32)
            if vectors.size != table.num_rows * dim or not np.all(np.isfinite(vectors)):
                raise InvalidRegistryError(self.reader.registry_id, f"{path}: centroids are not finite {dim}-d vectors")
            vectors = vectors.reshape(table.num_rows, dim)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            with self._lock:
                self._shards[path] = (table, vectors / np.where(norms > 0, norms, 1.0))

    def search(self, query: np.ndarray, k: int) -> list[tuple[ExpertRecord, float]]:
        """The ``k`` nearest rows of the unit ``query`` among the probed cells and the deltas, best first.

        Only the rows returned are parsed into (checked) records.
        """
        paths = [*self.coarse.probe(query, self.nprobe), *sorted(self.reader.layout.deltas)]
        self._fetch(paths)
        sims, where = [], []
        for path in paths:
            table, vectors = self._shards[path]
            if table.num_rows:
                sims.append(vectors @ np.asarray(query, dtype=np.float32))
                where += [(path, row) for row in range(table.num_rows)]
        if not where:
            return []
        scores = np.concatenate(sims)
        order = np.argsort(-scores, kind="stable")[:k]
        out = []
        for i in order:
            path, row = where[i]
            record = experts_from_table(self._shards[path][0].slice(row, 1), registry_id=self.reader.registry_id,
                                        dim=self.reader.manifest.embedder.dim)[0]
            out.append((record, float(scores[i])))
        return out
