"""The registry: a Hub dataset repo that indexes experts (format v2, sharded; v1 is still read).

Layout of a v1 repo::

    moin_registry.json   RegistryManifest: base model + embedder pinned to commits, distance, version
    experts.parquet      one ExpertRecord per row (see EXPERTS_SCHEMA)
    README.md            dataset card with the experts table (``configs:`` points at experts.parquet,
                         so ``datasets.load_dataset(registry_id)`` reads the rows)

A v2 repo keeps the same rows in shards under ``data/`` (:mod:`moin_hub.hub.shards`), so that a push
writes one small shard whatever the registry's size; ``moin-hub registry migrate`` upgrades a v1 repo.

Every write is one commit made with ``parent_commit`` = the head it was computed from; when someone
else committed in between, the Hub answers 412 and the update is recomputed on the new head. No write
is lost, however many people push at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import CommitOperationAdd, HfApi

from .._validators import validate_repo_id
from ..errors import (
    ExpertNotFoundError,
    HubUnavailableError,
    InvalidRegistryError,
    MoinHubError,
    RegistryConflictError,
    RegistryNotFoundError,
)
from . import cards, shards
from .client import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    download_file,
    get_api,
    http_status,
    resolve_endpoint,
    sha256_file,
)
from .config import (
    EXPERTS_FILENAME,
    MANIFEST_FILENAME,
    PLOT_SUFFIXES,
    PLOTS_DIR,
    REGISTRY_FORMAT_VERSION,
    EmbedderSpec,
    ExpertRecord,
    FileDigest,
    PinnedModel,
    RegistryManifest,
)
from .retry import backoff, default_attempts, is_transient, retry_transient
from .rows import EXPERTS_SCHEMA, experts_from_parquet, experts_table, experts_to_parquet

__all__ = ["EXPERTS_SCHEMA", "Registry", "experts_from_parquet", "experts_to_parquet", "init_registry",
           "remove_expert_rows", "update_registry", "upsert_expert"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 30


@dataclass(frozen=True)
class _Snapshot:
    manifest: RegistryManifest
    experts: tuple[ExpertRecord, ...]


_SNAPSHOTS: dict[tuple[str, str, str], _Snapshot] = {}
_MANIFESTS: dict[tuple[str, str, str], RegistryManifest] = {}
_SNAPSHOTS_LOCK = threading.Lock()


def read_manifest(registry_id: str, sha: str, *, endpoint: str, token: str | bool | None) -> RegistryManifest:
    """The manifest of a registry at commit ``sha`` (cached per commit).

    Raises:
        RegistryNotFoundError: the repo has no manifest.
        InvalidRegistryError: the manifest is malformed.
    """
    key = (endpoint, registry_id, sha)
    with _SNAPSHOTS_LOCK:
        if key in _MANIFESTS:
            return _MANIFESTS[key]
    try:
        manifest_path = download_file(registry_id, MANIFEST_FILENAME, revision=sha, repo_type="dataset",
                                      endpoint=endpoint, token=token)
    except EntryNotFoundError:
        raise RegistryNotFoundError(registry_id, revision=sha,
                                    reason=f"the dataset repo has no {MANIFEST_FILENAME}; it is not a moin registry") from None
    try:
        manifest = RegistryManifest.from_dict(json.loads(Path(manifest_path).read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidRegistryError(registry_id, f"{MANIFEST_FILENAME}: {err}") from None
    with _SNAPSHOTS_LOCK:
        _MANIFESTS[key] = manifest
    return manifest


def shard_reader(registry_id: str, sha: str, manifest: RegistryManifest, *, endpoint: str,
                 token: str | bool | None) -> shards.ShardReader:
    """A reader of the shards of a v2 registry at commit ``sha``."""
    files = shards.list_files(get_api(endpoint, token), registry_id, sha)
    return shards.ShardReader(registry_id, sha, shards.Layout.from_files(files), manifest, endpoint=endpoint,
                              token=token)


def _read_snapshot(registry_id: str, sha: str, *, endpoint: str, token: str | bool | None) -> _Snapshot:
    """Manifest and rows of a registry at commit ``sha`` (cached per commit: commits are immutable)."""
    key = (endpoint, registry_id, sha)
    with _SNAPSHOTS_LOCK:
        if key in _SNAPSHOTS:
            return _SNAPSHOTS[key]
    manifest = read_manifest(registry_id, sha, endpoint=endpoint, token=token)
    if manifest.format_version == 1:
        try:
            parquet_path = download_file(registry_id, EXPERTS_FILENAME, revision=sha, repo_type="dataset",
                                         endpoint=endpoint, token=token)
        except EntryNotFoundError:
            raise InvalidRegistryError(registry_id, f"{EXPERTS_FILENAME} is missing") from None
        experts = experts_from_parquet(parquet_path, registry_id=registry_id, dim=manifest.embedder.dim)
    else:
        reader = shard_reader(registry_id, sha, manifest, endpoint=endpoint, token=token)
        experts = sorted((record for record, _ in reader.all_rows()), key=lambda r: r.expert_id)
    snapshot = _Snapshot(manifest, tuple(experts))
    with _SNAPSHOTS_LOCK:
        _SNAPSHOTS[key] = snapshot
    return snapshot


def _head_sha(api: HfApi, registry_id: str, revision: str | None = None) -> str:
    """Resolve a registry revision (default: main) to its commit sha."""
    try:
        return api.dataset_info(registry_id, revision=revision).sha
    except RepositoryNotFoundError:
        raise RegistryNotFoundError(registry_id) from None
    except RevisionNotFoundError:
        raise RegistryNotFoundError(registry_id, revision=revision, reason="no such revision") from None


class Registry:
    """A registry of experts, read at one commit.

    Use :meth:`Registry.load`; a loaded registry never changes (it is pinned to ``revision``).

    Example:
        >>> registry = Registry.load("acme/moin-registry", endpoint="http://127.0.0.1:8080")  # doctest: +SKIP
        >>> [e.expert_id for e in registry]  # doctest: +SKIP
        ['topic-00', 'topic-01']
    """

    def __init__(self, registry_id: str, revision: str, manifest: RegistryManifest,
                 experts: list[ExpertRecord] | tuple[ExpertRecord, ...] | None, *, endpoint: str | None = None,
                 token: str | bool | None = None, size: int | None = None):
        self.registry_id = registry_id
        self.revision = revision
        self.manifest = manifest
        self.endpoint = resolve_endpoint(endpoint)
        self.token = token
        self._experts = None if experts is None else tuple(experts)
        self._size = size
        self._by_id: dict[str, ExpertRecord] | None = None
        self._by_repo: dict[str, ExpertRecord] | None = None
        self._lock = threading.Lock()

    @property
    def experts(self) -> tuple[ExpertRecord, ...]:
        """Every row, sorted by expert id (a registry loaded with ``lazy=True`` reads them on first use)."""
        if self._experts is None:
            with self._lock:
                if self._experts is None:
                    snapshot = retry_transient(
                        lambda: _read_snapshot(self.registry_id, self.revision, endpoint=self.endpoint,
                                               token=self.token),
                        what=f"reading registry {self.registry_id}@{self.revision[:12]}")
                    self._experts = snapshot.experts
        return self._experts

    @property
    def loaded(self) -> bool:
        """True when the rows are in memory (always, unless loaded with ``lazy=True`` and not used yet)."""
        return self._experts is not None

    @classmethod
    def load(cls, registry_id: str, *, revision: str | None = None, endpoint: str | None = None,
             token: str | bool | None = None, lazy: bool = False) -> Registry:
        """Load a registry at ``revision`` (default: the head of main).

        Args:
            registry_id: the dataset repo id, ``"org/name"``.
            revision: a branch, tag or commit sha; it is resolved to a commit sha first.
            endpoint: Hub endpoint (default ``$HF_ENDPOINT`` or huggingface.co).
            token: Hub token (default: the client's own lookup).
            lazy: read the manifest (and, for v2, the row count) now and the rows on first use; a
                :class:`~moin_hub.Router` over a big v2 registry then never reads them all.

        Returns:
            The registry pinned to the resolved commit. Files are cached per commit.

        Raises:
            RegistryNotFoundError: no such dataset repo or revision, or no manifest in it.
            InvalidRegistryError: the manifest or a row is malformed.
        """
        validate_repo_id(registry_id, field="registry")
        endpoint = resolve_endpoint(endpoint)
        sha = retry_transient(lambda: _head_sha(get_api(endpoint, token), registry_id, revision),
                              what=f"reading registry {registry_id}")
        if lazy:
            manifest = retry_transient(lambda: read_manifest(registry_id, sha, endpoint=endpoint, token=token),
                                       what=f"reading registry {registry_id}@{sha[:12]}")
            size = None
            if manifest.format_version >= 2:
                size = retry_transient(
                    lambda: shard_reader(registry_id, sha, manifest, endpoint=endpoint, token=token).count(),
                    what=f"reading registry {registry_id}@{sha[:12]}")
            return cls(registry_id, sha, manifest, None, endpoint=endpoint, token=token, size=size)
        snapshot = retry_transient(lambda: _read_snapshot(registry_id, sha, endpoint=endpoint, token=token),
                                   what=f"reading registry {registry_id}@{sha[:12]}")
        return cls(registry_id, sha, snapshot.manifest, snapshot.experts, endpoint=endpoint, token=token)

    def __len__(self) -> int:
        if self._experts is None and self._size is not None:
            return self._size
        return len(self.experts)

    def __iter__(self) -> Iterator[ExpertRecord]:
        return iter(self.experts)

    def __repr__(self) -> str:
        return f"Registry({self.registry_id!r}, revision={self.revision[:12]!r}, experts={len(self)})"

    @property
    def url(self) -> str:
        """The registry's page."""
        return f"{self.endpoint}/datasets/{self.registry_id}"

    @property
    def fallback(self) -> ExpertRecord | None:
        """The fallback expert (see ``push_expert(fallback=True)``), or None: a routed query below the
        threshold gets it instead of the bare base model. It is not a row: no centroid routes to it."""
        data = self.manifest.fallback
        return None if data is None else ExpertRecord.from_dict(dict(data))

    def get(self, expert: str) -> ExpertRecord:
        """The record of an expert, by expert id or by repo id (the fallback expert's too).

        Raises:
            ExpertNotFoundError: no such expert in this registry.
        """
        fallback = self.fallback
        if fallback is not None and expert in (fallback.expert_id, fallback.repo_id):
            return fallback
        if self._by_id is None or self._by_repo is None:
            self._by_id = {record.expert_id: record for record in self.experts}
            self._by_repo = {record.repo_id: record for record in self.experts}
        record = self._by_id.get(expert) or self._by_repo.get(expert)
        if record is None:
            raise ExpertNotFoundError(expert, registry_id=self.registry_id)
        return record

    def centroids(self) -> np.ndarray:
        """All centroids as a ``(n_experts, dim)`` float32 array, in row order."""
        dim = self.manifest.embedder.dim
        if not self.experts:
            return np.zeros((0, dim), dtype=np.float32)
        return np.asarray([record.centroid for record in self.experts], dtype=np.float32)

    def to_pandas(self) -> Any:
        """The rows as a pandas DataFrame (centroids as lists)."""
        import pandas as pd

        return pd.DataFrame([record.to_dict() for record in self.experts])


def resolve_pinned(api: HfApi, repo_id: str, revision: str | None, *, what: str) -> PinnedModel:
    """Resolve a model repo + revision to a :class:`PinnedModel` (commit sha)."""
    validate_repo_id(repo_id, field=what, namespaced=False)
    try:
        sha = api.model_info(repo_id, revision=revision).sha
    except RepositoryNotFoundError:
        raise MoinHubError(f"The {what} {repo_id!r} was not found on {api.endpoint}.") from None
    except RevisionNotFoundError:
        raise MoinHubError(f"The {what} {repo_id!r} has no revision {revision!r}.") from None
    return PinnedModel(repo_id, sha)


def embedder_dimension(repo_id: str, revision: str, *, endpoint: str, token: str | bool | None) -> int:
    """Output dimension of a sentence-transformers model, read from its module configs (no weights)."""
    modules = json.loads(download_file(repo_id, "modules.json", revision=revision, endpoint=endpoint,
                                       token=token).read_text(encoding="utf-8"))
    dim = None
    for module in modules:
        kind, path = module.get("type", ""), module.get("path", "")
        if kind.endswith("Pooling") or kind.endswith("Dense"):
            config = json.loads(download_file(repo_id, f"{path}/config.json".lstrip("/"), revision=revision,
                                              endpoint=endpoint, token=token).read_text(encoding="utf-8"))
            dim = config.get("out_features") if kind.endswith("Dense") else config.get("word_embedding_dimension")
    if not isinstance(dim, int) or dim < 1:
        raise MoinHubError(f"Cannot tell the output dimension of embedder {repo_id!r}; pass embedder_dim.")
    return dim


def init_registry(registry_id: str, *, base_model: str, embedder: str, base_revision: str | None = None,
                  embedder_revision: str | None = None, embedder_dim: int | None = None,
                  description: str = "", private: bool = False, exist_ok: bool = False,
                  endpoint: str | None = None, token: str | bool | None = None,
                  format_version: int = REGISTRY_FORMAT_VERSION) -> Registry:
    """Create a registry dataset repo with its manifest, an empty experts table and its card.

    Args:
        registry_id: the dataset repo to create, ``"org/name"``.
        base_model: Hub id of the base model every expert adapts.
        embedder: Hub id of the sentence-transformers model for centroids and queries.
        base_revision / embedder_revision: revisions to pin (default main), resolved to commit shas.
        embedder_dim: the embedder's dimension; read from its config files when omitted.
        description: free text for the registry card.
        private: create a private dataset repo.
        exist_ok: return the existing registry if it has the same base model and embedder.
        endpoint / token: Hub settings.
        format_version: 2 (sharded, the default) or 1 (one ``experts.parquet``, for older readers).

    Returns:
        The new (or existing) :class:`Registry`.

    Raises:
        MoinHubError: the base model or embedder cannot be resolved, or the registry exists
            (without ``exist_ok``, or with another base model / embedder).

    Example:
        >>> init_registry("acme/moin-registry", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...               embedder="sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    """
    validate_repo_id(registry_id, field="registry")
    endpoint = resolve_endpoint(endpoint)
    api = get_api(endpoint, token)
    base = resolve_pinned(api, base_model, base_revision, what="base model")
    emb = resolve_pinned(api, embedder, embedder_revision, what="embedder")
    dim = embedder_dim or embedder_dimension(emb.repo_id, emb.revision, endpoint=endpoint, token=token)
    manifest = RegistryManifest(base_model=base, embedder=EmbedderSpec(emb.repo_id, emb.revision, dim=dim),
                                description=description, format_version=format_version)
    try:
        existing = Registry.load(registry_id, endpoint=endpoint, token=token)
    except RegistryNotFoundError:
        existing = None
    if existing is not None:
        same = (existing.manifest.base_model == manifest.base_model
                and existing.manifest.embedder == manifest.embedder)
        if exist_ok and same:
            return existing
        raise MoinHubError(
            f"Registry {registry_id!r} already exists" + ("" if same else " with another base model or embedder") + ".",
            hint="Use another id, or pass --exist-ok to reuse a compatible one.",
        )
    api.create_repo(registry_id, repo_type="dataset", private=private, exist_ok=True)
    head = api.dataset_info(registry_id).sha
    operations = [manifest_operation(manifest)]
    if format_version == 1:
        card = cards.registry_card(manifest, [], registry_id=registry_id, endpoint=endpoint)
        operations += [CommitOperationAdd(EXPERTS_FILENAME, experts_to_parquet([])),
                       CommitOperationAdd("README.md", str(card).encode())]
    else:
        operations += shards.compact_operations(EXPERTS_SCHEMA.empty_table(), manifest, registry_id=registry_id,
                                                endpoint=endpoint)
    try:
        info = api.create_commit(registry_id, operations, repo_type="dataset", parent_commit=head,
                                 commit_message="Initialise moin registry")
    except HfHubHTTPError as err:
        if http_status(err) == 412:
            raise MoinHubError(f"Registry {registry_id!r} was created by someone else at the same time.",
                               hint="Load it, or pass --exist-ok.") from None
        raise
    return Registry(registry_id, info.oid, manifest, [], endpoint=endpoint, token=token)


def manifest_operation(manifest: RegistryManifest) -> CommitOperationAdd:
    """``moin_registry.json`` as a commit operation."""
    return CommitOperationAdd(MANIFEST_FILENAME, json.dumps(manifest.to_dict(), indent=2).encode() + b"\n")


#: ``mutate(manifest, rows) -> new rows``. A mutation with a ``keys`` attribute (expert ids and repo ids)
#: reads only the rows of those keys, so a v2 registry hands it just those (see :func:`update_registry`).
Mutation = Callable[[RegistryManifest, list[ExpertRecord]], list[ExpertRecord]]


def is_plot_path(path: str) -> bool:
    """True for an image under ``plots/`` of a registry repo (shown in its card)."""
    return path.startswith(f"{PLOTS_DIR}/") and path.lower().endswith(PLOT_SUFFIXES)


@dataclass(frozen=True)
class WritePlan:
    """One registry write computed on a head commit: its operations, and the registry after it."""

    head: str
    manifest: RegistryManifest
    operations: list[Any]  # empty: nothing to commit
    rows: list[ExpertRecord] | None  # every row after the write, when they were all read
    size: int


def _by_id(rows: list[ExpertRecord]) -> dict[str, ExpertRecord]:
    return {row.expert_id: row for row in rows}


def _plan_update(api: HfApi, registry_id: str, mutate: Mutation, *, endpoint: str, token: str | bool | None,
                 extra_files: Mapping[str, str | Path] | None) -> WritePlan:
    head = _head_sha(api, registry_id)
    manifest = read_manifest(registry_id, head, endpoint=endpoint, token=token)
    files = shards.list_files(api, registry_id, head)
    extra = [CommitOperationAdd(path, str(local)) for path, local in (extra_files or {}).items()]
    plots = sorted({*(f for f in files if is_plot_path(f)), *(p for p in extra_files or {} if is_plot_path(p))})
    if manifest.format_version == 1:
        before = list(_read_snapshot(registry_id, head, endpoint=endpoint, token=token).experts)
        rows = mutate(manifest, list(before))
        if rows == before and not extra_files:  # nothing to change (e.g. a retried update)
            return WritePlan(head, manifest, [], rows, len(rows))
        card = cards.registry_card(manifest, rows, registry_id=registry_id, endpoint=endpoint, plots=plots)
        operations = [*extra, CommitOperationAdd(EXPERTS_FILENAME, experts_to_parquet(rows)),
                      CommitOperationAdd("README.md", str(card).encode())]
        return WritePlan(head, manifest, operations, rows, len(rows))
    reader = shards.ShardReader(registry_id, head, shards.Layout.from_files(files), manifest, endpoint=endpoint,
                                token=token)
    count = reader.count()
    keys = getattr(mutate, "keys", None)
    full = keys is None or bool(extra_files) or count <= shards.SMALL_REGISTRY_ROWS
    old = reader.all_rows() if full else reader.lookup(keys)
    before = [record for record, _ in old]
    rows = mutate(manifest, list(before))
    if _by_id(rows) == _by_id(before) and not extra_files:
        return WritePlan(head, manifest, [], sorted(rows, key=lambda r: r.expert_id) if full else None, count)
    size = count - len(before) + len(rows)
    rows = sorted(rows, key=lambda r: r.expert_id)
    if full and size <= shards.SMALL_REGISTRY_ROWS:  # small: one shard and the card's table, rewritten whole
        operations = shards.compact_operations(experts_table(rows), manifest, registry_id=registry_id,
                                               endpoint=endpoint, old_files=files, plots=plots)
    else:
        operations = shards.delta_operations(reader, old, rows)
        if full:
            operations.append(shards.card_operation(manifest, rows[:shards.CARD_TABLE_ROWS], n_experts=size,
                                                    registry_id=registry_id, endpoint=endpoint, plots=plots))
    return WritePlan(head, manifest, [*extra, *operations], rows if full else None, size)


def commit_plan(api: HfApi, registry_id: str, plan: Callable[[], WritePlan], *, commit_message: str,
                max_retries: int = DEFAULT_MAX_RETRIES,
                sleep: Callable[[float], None] = time.sleep) -> tuple[WritePlan, str]:
    """Compute ``plan()`` on the head and commit it with ``parent_commit`` = that head; on 412 start over.

    Returns:
        The plan that landed and the new commit sha (the head itself when the plan had no operations).

    Raises:
        RegistryConflictError: the head moved on every one of ``max_retries`` attempts.
        HubUnavailableError: the commit kept failing transiently.
    """
    transient = 0
    for attempt in range(max_retries):
        planned = retry_transient(plan, what=f"reading registry {registry_id}")
        if not planned.operations:
            return planned, planned.head
        try:
            # no retry inside: after a transient failure the head may have moved (even by this very
            # commit, if only its answer was lost), so the whole read-modify-write starts over
            info = api.create_commit(registry_id, planned.operations, repo_type="dataset",
                                     parent_commit=planned.head, commit_message=commit_message)
        except Exception as err:
            if http_status(err) != 412 and not is_transient(err):
                raise
            if is_transient(err):
                transient += 1
                if transient >= default_attempts():
                    raise HubUnavailableError(f"the commit to registry {registry_id}", transient, err) from err
            delay = backoff(min(attempt, 5), base=0.05, cap=2.0)
            logger.info("registry %s: commit not confirmed (%s, attempt %d); retrying in %.2fs",
                        registry_id, type(err).__name__, attempt + 1, delay)
            sleep(delay)
            continue
        return planned, info.oid
    raise RegistryConflictError(registry_id, max_retries)


def update_registry(registry_id: str, mutate: Mutation, *, commit_message: str, endpoint: str | None = None,
                    token: str | bool | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                    extra_files: Mapping[str, str | Path] | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> Registry:
    """Apply ``mutate`` to the registry rows in one optimistic, conflict-safe commit.

    ``mutate(manifest, rows)`` returns the new rows; it is called again on the fresh head whenever
    another writer committed first (HTTP 412), so it must be a pure function of its inputs. Errors
    it raises abort the update (nothing is written). ``extra_files`` (``{path in repo: local file}``) are
    added in the same commit; the plot images among them and those already in the repo are shown in the
    re-rendered card. Without extra files, rows that do not change make no commit.

    On a v2 registry bigger than :data:`~moin_hub.hub.shards.SMALL_REGISTRY_ROWS`, a mutation with a
    ``keys`` attribute (as :func:`upsert_expert` and :func:`remove_expert_rows` have) gets only the rows of
    those keys, and the commit writes only the shards they change: the cost does not grow with the registry.

    Returns:
        The registry at the new commit (rows read on first use when they were not all read here).

    Raises:
        RegistryConflictError: the head moved on every one of ``max_retries`` attempts.
        RegistryNotFoundError / InvalidRegistryError: as for :meth:`Registry.load`.
    """
    endpoint = resolve_endpoint(endpoint)
    api = get_api(endpoint, token)
    planned, sha = commit_plan(
        api, registry_id,
        lambda: _plan_update(api, registry_id, mutate, endpoint=endpoint, token=token, extra_files=extra_files),
        commit_message=commit_message, max_retries=max_retries, sleep=sleep)
    if planned.rows is not None:
        with _SNAPSHOTS_LOCK:
            _SNAPSHOTS[(endpoint, registry_id, sha)] = _Snapshot(planned.manifest, tuple(planned.rows))
    return Registry(registry_id, sha, planned.manifest, planned.rows, endpoint=endpoint, token=token,
                    size=planned.size)


def update_manifest(registry_id: str, change: Callable[[RegistryManifest], RegistryManifest], *,
                    commit_message: str, endpoint: str | None = None, token: str | bool | None = None,
                    max_retries: int = DEFAULT_MAX_RETRIES) -> str:
    """Replace the registry's manifest by ``change(manifest)`` in one conflict-safe commit (rows untouched).

    ``change`` is called again on the fresh head whenever another writer committed first, so it must be
    a pure function of the manifest. Returns the new commit sha (the head when nothing changed).
    """
    endpoint = resolve_endpoint(endpoint)
    api = get_api(endpoint, token)

    def plan() -> WritePlan:
        head = _head_sha(api, registry_id)
        before = read_manifest(registry_id, head, endpoint=endpoint, token=token)
        after = change(before)
        return WritePlan(head, after, [] if after == before else [manifest_operation(after)], None, -1)

    _, sha = commit_plan(api, registry_id, plan, commit_message=commit_message, max_retries=max_retries)
    return sha


def upsert_expert(record: ExpertRecord) -> Mutation:
    """A mutation that adds ``record`` or replaces the row of the same expert (same id and repo).

    Raises (from the mutation):
        ValueError: the expert id belongs to another repo, or the repo is registered under another id.
    """

    def mutate(manifest: RegistryManifest, rows: list[ExpertRecord]) -> list[ExpertRecord]:
        for row in rows:
            if row.expert_id == record.expert_id and row.repo_id != record.repo_id:
                raise MoinHubError(
                    f"Expert id {record.expert_id!r} is already taken by {row.repo_id!r} in this registry.",
                    hint="Pass --expert-id with another id.",
                )
            if row.repo_id == record.repo_id and row.expert_id != record.expert_id:
                raise MoinHubError(
                    f"Repo {record.repo_id!r} is already registered as expert {row.expert_id!r}.",
                    hint=f"Pass --expert-id {row.expert_id} to update it, or remove it first.",
                )
        kept = [row for row in rows if row.expert_id != record.expert_id]
        return sorted([*kept, record], key=lambda r: r.expert_id)

    mutate.keys = (record.expert_id, record.repo_id)  # type: ignore[attr-defined]
    return mutate


def remove_expert_rows(expert: str, *, missing_ok: bool = False) -> Mutation:
    """A mutation that removes the row of ``expert`` (expert id or repo id).

    With ``missing_ok`` a missing row is not an error (the result is the same: no such row), which makes a
    retried removal whose first commit landed unnoticed idempotent.
    """

    def mutate(manifest: RegistryManifest, rows: list[ExpertRecord]) -> list[ExpertRecord]:
        kept = [row for row in rows if expert not in (row.expert_id, row.repo_id)]
        if len(kept) == len(rows) and not missing_ok:
            raise ExpertNotFoundError(expert)
        return kept

    mutate.keys = (expert,)  # type: ignore[attr-defined]
    return mutate


def file_digest(path: Path, name: str) -> FileDigest:
    """The :class:`FileDigest` of a local file."""
    return FileDigest(name, sha256_file(path), path.stat().st_size)
