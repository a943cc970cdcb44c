"""Compaction and migration of a registry: rewrite every row as v2 cells, in one conflict-safe commit.

``compact_registry`` folds a v2 registry's delta shards and tombstones back into k-means cells and
rewrites the ids file, the coarse routing file and the card. ``migrate_registry`` does the same for a v1
registry (``experts.parquet``) and bumps its manifest to format 2. Both read every row once: they are the
O(n) maintenance steps that keep pushes O(1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
from huggingface_hub import CommitOperationDelete

from ..errors import InvalidRegistryError
from . import shards
from .client import get_api, resolve_endpoint
from .config import EXPERTS_FILENAME, REGISTRY_FORMAT_VERSION
from .registry import (
    DEFAULT_MAX_RETRIES,
    Registry,
    WritePlan,
    _head_sha,
    commit_plan,
    is_plot_path,
    manifest_operation,
    read_manifest,
)
from .rows import EXPERTS_SCHEMA, conform, experts_table, read_parquet


@dataclass(frozen=True)
class CompactResult:
    """What a compaction (or migration) wrote."""

    registry_id: str
    revision: str
    n_experts: int
    n_cells: int
    format_version: int
    committed: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _all_rows(registry_id: str, head: str, manifest, files: list[str], *, endpoint: str,  # noqa: ANN001
              token: str | bool | None) -> pa.Table:
    """Every row of the registry at ``head`` as one table (v1 or v2), checked for duplicate ids and repos."""
    reader = shards.ShardReader(registry_id, head, shards.Layout.from_files(files), manifest, endpoint=endpoint,
                                token=token)
    if manifest.format_version == 1:
        tables = [read_parquet(reader.path(EXPERTS_FILENAME), registry_id=registry_id)]
    else:
        tables = reader.tables(list(reader.layout.shards))
    table = (pa.concat_tables([conform(t) for t in tables]) if tables
             else EXPERTS_SCHEMA.empty_table())
    for column in ("expert_id", "repo_id"):
        if len(pc.unique(table[column])) != table.num_rows:
            raise InvalidRegistryError(registry_id, f"a {column} is in more than one row; fix it before compacting")
    return table


def _plan_rewrite(registry_id: str, *, endpoint: str, token: str | bool | None, migrate: bool,
                  table: pa.Table | None = None) -> WritePlan:
    api = get_api(endpoint, token)
    head = _head_sha(api, registry_id)
    manifest = read_manifest(registry_id, head, endpoint=endpoint, token=token)
    files = shards.list_files(api, registry_id, head)
    if manifest.format_version == 1 and not migrate:
        raise InvalidRegistryError(registry_id, "format v1 has no shards to compact; run `moin-hub registry migrate`")
    if manifest.format_version >= 2 and migrate and table is None:
        return WritePlan(head, manifest, [], None, -1)  # already v2: nothing to migrate
    rows = table if table is not None else _all_rows(registry_id, head, manifest, files, endpoint=endpoint,
                                                     token=token)
    operations = []
    if manifest.format_version == 1:
        manifest = replace(manifest, format_version=REGISTRY_FORMAT_VERSION)
        operations.append(manifest_operation(manifest))
        if EXPERTS_FILENAME in files:
            operations.append(CommitOperationDelete(EXPERTS_FILENAME))
    operations += shards.compact_operations(rows, manifest, registry_id=registry_id, endpoint=endpoint,
                                            old_files=files, plots=[f for f in files if is_plot_path(f)])
    return WritePlan(head, manifest, operations, None, rows.num_rows)


def _rewrite(registry_id: str, *, migrate: bool, message: str, table: pa.Table | None = None,
             endpoint: str | None, token: str | bool | None, max_retries: int,
             sleep: Callable[[float], None]) -> CompactResult:
    endpoint = resolve_endpoint(endpoint)
    api = get_api(endpoint, token)
    planned, sha = commit_plan(
        api, registry_id, lambda: _plan_rewrite(registry_id, endpoint=endpoint, token=token, migrate=migrate,
                                                table=table),
        commit_message=message, max_retries=max_retries, sleep=sleep)
    size = planned.size if planned.size >= 0 else len(Registry.load(registry_id, revision=sha, endpoint=endpoint,
                                                                    token=token, lazy=True))
    n_cells = sum(1 for op in planned.operations
                  if getattr(op, "path_in_repo", "").startswith(shards.CELL_TEMPLATE.split("{")[0])
                  and not isinstance(op, CommitOperationDelete))
    return CompactResult(registry_id, sha, size, n_cells, planned.manifest.format_version,
                         committed=bool(planned.operations))


def compact_registry(registry_id: str, *, endpoint: str | None = None, token: str | bool | None = None,
                     max_retries: int = DEFAULT_MAX_RETRIES,
                     sleep: Callable[[float], None] = time.sleep) -> CompactResult:
    """Rewrite a v2 registry's rows as k-means cells, folding in deltas and tombstones (one commit).

    Raises:
        InvalidRegistryError: a v1 registry (migrate it), or duplicate ids.
        RegistryConflictError: the head kept moving for ``max_retries`` attempts.

    Example:
        >>> compact_registry("acme/moin-registry")  # doctest: +SKIP
    """
    return _rewrite(registry_id, migrate=False, message="Compact moin registry", endpoint=endpoint, token=token,
                    max_retries=max_retries, sleep=sleep)


def migrate_registry(registry_id: str, *, endpoint: str | None = None, token: str | bool | None = None,
                     max_retries: int = DEFAULT_MAX_RETRIES,
                     sleep: Callable[[float], None] = time.sleep) -> CompactResult:
    """Upgrade a v1 registry to format v2 (one commit; a v2 registry is left as it is).

    Example:
        >>> migrate_registry("acme/old-registry")  # doctest: +SKIP
    """
    return _rewrite(registry_id, migrate=True, message="Migrate moin registry to format v2", endpoint=endpoint,
                    token=token, max_retries=max_retries, sleep=sleep)


def write_rows(registry_id: str, rows: pa.Table | list, *, endpoint: str | None = None,
               token: str | bool | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
               message: str = "Write moin registry rows") -> CompactResult:
    """Replace every row of a registry by ``rows`` (records or a table with the rows schema), compacted.

    For bulk loads and benchmarks: the rows are written as they are, without reading the old ones.
    """
    table = rows if isinstance(rows, pa.Table) else experts_table(list(rows))
    return _rewrite(registry_id, migrate=True, message=message, table=table, endpoint=endpoint, token=token,
                    max_retries=max_retries, sleep=time.sleep)
