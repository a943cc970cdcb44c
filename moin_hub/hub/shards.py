"""Registry format v2: rows in parquet shards, so that a push's cost does not grow with the registry.

Layout of a v2 registry repo::

    moin_registry.json              RegistryManifest (format_version 2)
    data/cell-NNNNN.parquet         compacted rows, one shard per k-means cell (one shard when small)
    data/delta-<repo key>-<id>.parquet
                                    one row pushed since the last compaction (repo key: 12 hex of the
                                    repo id's sha1); a re-push of the same expert overwrites it
    index/ids.parquet               expert_id, repo_id, shard of every compacted row (the push's lookup)
    index/removed/<expert_id>       a compacted row that was removed or moved to a delta since
    index/coarse.safetensors        cell centroids and nprobe (registries of >= CELLS_MIN_EXPERTS rows)
    index/cells/cell-NNNNN.safetensors
                                    the centroids of one cell's rows (float16, in its shard's row order):
                                    what a partial route downloads per probed cell
    README.md                       dataset card; ``configs`` reads ``data/*.parquet``

Every row is in exactly one ``data/`` shard, so ``datasets.load_dataset`` sees the registry's rows.
A push into a registry of more than :data:`SMALL_REGISTRY_ROWS` rows reads the ids file (unchanged
between compactions, so cached) and the file list, and writes one delta shard: its cost does not grow
with the registry. Updating or removing a compacted row also rewrites that row's cell (a bounded
shard) and adds a tombstone. Smaller registries are rewritten whole on every write (one shard, the card's
experts table), like v1. :func:`compact_operations` folds deltas and tombstones back into cells.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

from ..errors import InvalidRegistryError
from . import cards
from .cells import coarse_bytes, plan_cells
from .client import download_file
from .config import ExpertRecord, RegistryManifest
from .rows import conform, experts_from_table, experts_table, read_parquet, table_to_parquet

DATA_DIR = "data"
#: The ``configs`` data_files glob of a v2 registry card: every shard.
DATA_GLOB = "data/*.parquet"
CELL_TEMPLATE = "data/cell-{:05d}.parquet"
DELTA_PREFIX = "data/delta-"
IDS_FILENAME = "index/ids.parquet"
COARSE_FILENAME = "index/coarse.safetensors"
REMOVED_DIR = "index/removed"
INDEX_CELLS_DIR = "index/cells"
#: Registries of at most this many rows are rewritten whole (one shard) on every write, card table included.
SMALL_REGISTRY_ROWS = 256
#: How many rows of a bigger registry the card's experts table shows (rendered at compaction).
CARD_TABLE_ROWS = 200

_DELTA_RE = re.compile(r"^data/delta-([0-9a-f]{12})-([A-Za-z0-9][A-Za-z0-9._-]{0,95})\.parquet$")
IDS_SCHEMA = pa.schema([pa.field("expert_id", pa.string()), pa.field("repo_id", pa.string()),
                        pa.field("shard", pa.string())])


def repo_key(repo_id: str) -> str:
    """12 hex digits of the sha1 of a repo id: the repo part of a delta shard's name."""
    return hashlib.sha1(repo_id.encode()).hexdigest()[:12]


def delta_path(record: ExpertRecord) -> str:
    """The delta shard of one pushed row, e.g. ``data/delta-1a2b3c4d5e6f-topic-03.parquet``."""
    return f"{DELTA_PREFIX}{repo_key(record.repo_id)}-{record.expert_id}.parquet"


def index_cell_path(shard: str) -> str:
    """The centroid file of a cell shard: ``data/cell-00042.parquet`` -> ``index/cells/cell-00042.safetensors``."""
    return f"{INDEX_CELLS_DIR}/{shard.rsplit('/', 1)[-1].removesuffix('.parquet')}.safetensors"


def table_centroids(table: pa.Table, dim: int) -> np.ndarray:
    """The centroid column of a rows table as an ``(n, dim)`` float32 array."""
    if not table.num_rows:
        return np.zeros((0, dim), np.float32)
    return np.asarray(table["centroid"].combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, dim)


def index_cell_bytes(table: pa.Table, dim: int) -> bytes:
    """The centroid file of a cell: its rows' unit centroids as float16 (tensor ``"centroids"``)."""
    from safetensors.numpy import save

    from .cells import unit_rows

    return save({"centroids": unit_rows(table_centroids(table, dim)).astype(np.float16)},
                metadata={"format": "moin-cell-centroids"})


def is_data_shard(path: str) -> bool:
    """True for a parquet shard directly under ``data/``."""
    return path.startswith(f"{DATA_DIR}/") and path.endswith(".parquet") and path.count("/") == 1


@dataclass(frozen=True)
class Layout:
    """The v2 files of a registry at one commit, from its file list."""

    shards: tuple[str, ...]
    deltas: dict[str, tuple[str, str]]  # delta path -> (repo key, expert id)
    removed: frozenset[str]  # expert ids with a tombstone
    has_ids: bool
    has_coarse: bool

    @classmethod
    def from_files(cls, files: Iterable[str]) -> Layout:
        files = list(files)
        deltas = {}
        for path in files:
            match = _DELTA_RE.match(path)
            if match:
                deltas[path] = (match.group(1), match.group(2))
        removed = frozenset(p[len(REMOVED_DIR) + 1:] for p in files if p.startswith(f"{REMOVED_DIR}/"))
        return cls(tuple(sorted(p for p in files if is_data_shard(p))), deltas, removed, IDS_FILENAME in files,
                   COARSE_FILENAME in files)

    @property
    def cells(self) -> tuple[str, ...]:
        return tuple(p for p in self.shards if p not in self.deltas)


class ShardReader:
    """Reads the shards of a v2 registry at one commit (downloads go through the HF cache)."""

    def __init__(self, registry_id: str, sha: str, layout: Layout, manifest: RegistryManifest, *, endpoint: str,
                 token: str | bool | None):
        self.registry_id, self.sha, self.layout, self.manifest = registry_id, sha, layout, manifest
        self.endpoint, self.token = endpoint, token
        self._ids: pa.Table | None = None
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return download_file(self.registry_id, name, revision=self.sha, repo_type="dataset", endpoint=self.endpoint,
                             token=self.token)

    def table(self, shard: str) -> pa.Table:
        return read_parquet(self.path(shard), registry_id=self.registry_id, name=shard)

    def records(self, shard: str) -> list[ExpertRecord]:
        return experts_from_table(self.table(shard), registry_id=self.registry_id, dim=self.manifest.embedder.dim)

    def tables(self, shards: Sequence[str]) -> list[pa.Table]:
        """Several shards, downloaded in parallel, in order."""
        if len(shards) <= 1:
            return [self.table(s) for s in shards]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(self.table, shards))

    def ids(self) -> pa.Table:
        """The ids file (expert_id, repo_id, shard of every compacted row); empty when there is none."""
        with self._lock:
            if self._ids is None:
                self._ids = (read_parquet(self.path(IDS_FILENAME), registry_id=self.registry_id, name=IDS_FILENAME)
                             if self.layout.has_ids else IDS_SCHEMA.empty_table())
            return self._ids

    def count(self) -> int:
        """Rows of the registry: compacted ones, less the tombstoned, plus the deltas (no shard is read)."""
        ids = self.ids()
        removed = pc.sum(pc.is_in(ids["expert_id"], pa.array(sorted(self.layout.removed), pa.string()))).as_py()
        return ids.num_rows - (removed or 0) + len(self.layout.deltas)

    def all_rows(self) -> list[tuple[ExpertRecord, str]]:
        """Every row with its shard; duplicates across shards are an invalid registry."""
        shards = list(self.layout.shards)
        out: list[tuple[ExpertRecord, str]] = []
        dim = self.manifest.embedder.dim
        for shard, table in zip(shards, self.tables(shards), strict=True):
            out += [(record, shard) for record in experts_from_table(table, registry_id=self.registry_id, dim=dim)]
        _check_unique(self.registry_id, [record for record, _ in out])
        return out

    def lookup(self, keys: Iterable[str]) -> list[tuple[ExpertRecord, str]]:
        """The rows whose expert id or repo id is one of ``keys``, with their shards (reads only those)."""
        keys = sorted(set(keys))
        hashed = {repo_key(key) for key in keys}
        wanted: dict[str, set[str]] = {}
        for path, (key_hash, expert_id) in self.layout.deltas.items():
            if expert_id in keys or key_hash in hashed:
                wanted.setdefault(path, set())
        ids = self.ids()
        if ids.num_rows:
            values = pa.array(keys, pa.string())
            hits = ids.filter(pc.or_(pc.is_in(ids["expert_id"], values), pc.is_in(ids["repo_id"], values)))
            for expert_id, shard in zip(hits["expert_id"].to_pylist(), hits["shard"].to_pylist(), strict=True):
                if expert_id not in self.layout.removed:
                    wanted.setdefault(shard, set()).add(expert_id)
        out = []
        for shard in sorted(wanted):
            for record in self.records(shard):
                if shard in self.layout.deltas:
                    if record.expert_id in keys or record.repo_id in keys:
                        out.append((record, shard))
                elif record.expert_id in wanted[shard]:
                    out.append((record, shard))
        return out


def _check_unique(registry_id: str, records: Sequence[ExpertRecord]) -> None:
    for attribute in ("expert_id", "repo_id"):
        values = [getattr(r, attribute) for r in records]
        if len(set(values)) != len(values):
            seen: set[str] = set()
            duplicate = next(v for v in values if v in seen or seen.add(v))
            raise InvalidRegistryError(registry_id, f"{attribute} {duplicate!r} is in more than one row")


def delta_operations(reader: ShardReader, old: Sequence[tuple[ExpertRecord, str]],
                     new: Sequence[ExpertRecord]) -> list[CommitOperationAdd | CommitOperationDelete]:
    """The operations that turn the rows ``old`` (with their shards) into ``new``, touching only them.

    New or changed rows get their own delta shard; a compacted row that changes or goes is removed from
    its cell (the cell is rewritten) and gets a tombstone; a delta that goes is deleted.
    """
    old_by_id = {record.expert_id: (record, shard) for record, shard in old}
    new_by_id = {record.expert_id: record for record in new}
    operations: list[CommitOperationAdd | CommitOperationDelete] = []
    written: set[str] = set()
    for expert_id, record in new_by_id.items():
        before = old_by_id.get(expert_id)
        if before is not None and before[0] == record:
            continue
        path = delta_path(record)
        operations.append(CommitOperationAdd(path, table_to_parquet(experts_table([record]))))
        written.add(path)
    out_of_cells: dict[str, set[str]] = {}
    for expert_id, (record, shard) in old_by_id.items():
        if new_by_id.get(expert_id) == record:
            continue
        if shard in reader.layout.deltas:
            if shard not in written:
                operations.append(CommitOperationDelete(shard))
        else:
            out_of_cells.setdefault(shard, set()).add(expert_id)
            if expert_id not in reader.layout.removed:
                operations.append(CommitOperationAdd(f"{REMOVED_DIR}/{expert_id}", record.repo_id.encode()))
    for shard, expert_ids in sorted(out_of_cells.items()):
        table = reader.table(shard)
        kept = table.filter(pc.invert(pc.is_in(table["expert_id"], pa.array(sorted(expert_ids), pa.string()))))
        operations.append(CommitOperationAdd(shard, table_to_parquet(conform(kept))))
        if reader.layout.has_coarse:
            operations.append(CommitOperationAdd(index_cell_path(shard),
                                                 index_cell_bytes(kept, reader.manifest.embedder.dim)))
    return operations


def compact_operations(table: pa.Table, manifest: RegistryManifest, *, registry_id: str, endpoint: str,
                       old_files: Iterable[str] = (), plots: Sequence[str] = (),
                       seed: int = 0) -> list[CommitOperationAdd | CommitOperationDelete]:
    """The operations that write ``table`` (every row of the registry) as compacted cells.

    Writes the cells (one shard below :data:`~moin_hub.hub.cells.CELLS_MIN_EXPERTS` rows), the ids file,
    the coarse file (when there are several cells) and the card; deletes every other shard, tombstone and
    a stale coarse file among ``old_files``.
    """
    table = conform(table).sort_by("expert_id")
    n = table.num_rows
    dim = manifest.embedder.dim
    centroids = table_centroids(table, dim)
    plan = plan_cells(centroids, seed=seed)
    operations: list[CommitOperationAdd | CommitOperationDelete] = []
    cells, shard_of_row = [], np.empty(n, dtype=object)
    order = np.argsort(plan.assignment, kind="stable")
    bounds = np.searchsorted(plan.assignment[order], np.arange(len(plan.centroids) + 1))
    for cell in range(len(plan.centroids)):
        rows = order[bounds[cell]:bounds[cell + 1]]
        path = CELL_TEMPLATE.format(cell)
        cells.append(path)
        shard_of_row[rows] = path
        cell_table = table.take(pa.array(rows, pa.int64()))
        operations.append(CommitOperationAdd(path, table_to_parquet(cell_table)))
        if len(plan.centroids) > 1:
            operations.append(CommitOperationAdd(index_cell_path(path), index_cell_bytes(cell_table, dim)))
    ids = pa.table({"expert_id": table["expert_id"], "repo_id": table["repo_id"],
                    "shard": pa.array(shard_of_row.tolist(), pa.string())}, schema=IDS_SCHEMA)
    operations.append(CommitOperationAdd(IDS_FILENAME, table_to_parquet(ids)))
    old_files = set(old_files)
    if len(cells) > 1:
        operations.append(CommitOperationAdd(COARSE_FILENAME, coarse_bytes(
            plan.centroids, cells, nprobe=plan.nprobe, n_experts=n, recall=plan.recall)))
    elif COARSE_FILENAME in old_files:
        operations.append(CommitOperationDelete(COARSE_FILENAME))
    keep = set(cells) | ({index_cell_path(c) for c in cells} if len(cells) > 1 else set())
    operations += [CommitOperationDelete(path) for path in sorted(old_files)
                   if ((is_data_shard(path) or path.startswith(f"{INDEX_CELLS_DIR}/")) and path not in keep)
                   or path.startswith(f"{REMOVED_DIR}/")]
    operations.append(card_operation(manifest, experts_from_table(table.slice(0, CARD_TABLE_ROWS),
                                                                  registry_id=registry_id, dim=dim),
                                     n_experts=n, registry_id=registry_id, endpoint=endpoint, plots=plots))
    return operations


def card_operation(manifest: RegistryManifest, shown: list[ExpertRecord], *, n_experts: int, registry_id: str,
                   endpoint: str, plots: Sequence[str] = ()) -> CommitOperationAdd:
    """The registry card (README.md) as a commit operation."""
    card = cards.registry_card(manifest, shown, registry_id=registry_id, endpoint=endpoint, plots=plots,
                               n_experts=n_experts)
    return CommitOperationAdd("README.md", str(card).encode())


def list_files(api: HfApi, registry_id: str, sha: str) -> list[str]:
    """Every file of the registry repo at commit ``sha``."""
    return api.list_repo_files(registry_id, repo_type="dataset", revision=sha)
