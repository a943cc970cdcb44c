"""On-disk storage behind :class:`moin_hub.local_hub.server.LocalHub`: blobs, immutable commits, mutable refs.

The model is git's, flattened: a *commit* is an immutable JSON object holding its parents and the full
tree of the repo at that point (``path -> (blob oid, size)``); a *ref* (branch, tag, pull request) is a
mutable name pointing at a commit; file contents live once in a content-addressed blob store keyed by
their git blob sha1, the same ``oid`` the real Hub reports and ``huggingface_hub`` compares against.
The objects themselves (keys, commits, operations, checks) are in :mod:`moin_hub.local_hub.objects`.

Layout under ``data_dir``::

    blobs/ab/cdef0123...            file contents, named by git blob sha1
    repos/<type>s/<ns>/<name>/
        repo.json                   metadata: id, _id, private, createdAt (+ sdk for Spaces)
        refs.json                   {"branches": {...}, "tags": {...}, "pulls": {"1": sha, ...}}
        commits/<sha>.json          one immutable commit object per commit
    trash/                          deleted repos, removed on the next start

Every file is written to a temporary name in the same folder, flushed, fsynced and moved into place with
:func:`os.replace`, so a crash leaves either the old or the new version, never half of one. A commit
object is written before the ref that points at it, so readers never see a ref to a missing commit.

Concurrency: one :class:`threading.Lock` per repo serialises commits and ref updates (it makes the
``parentCommit`` check and the ref update one atomic step), one global lock guards repo creation and
deletion. Reads take no lock: they read ``refs.json`` (replaced atomically) and then immutable commit
objects. The locks are in-process: two server processes must not share one ``data_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .objects import (
    Commit,
    HubError,
    Operation,
    RepoKey,
    TreeEntry,
    apply_operations,
    check_file_path,
    git_blob_oid,
    now_iso,
)

_SHA_PREFIX = re.compile(r"^[0-9a-f]{4,40}$")
_PR_REF = re.compile(r"^refs/pr/(\d+)$")

# The .gitattributes the real Hub puts in the "initial commit" of every new repo (abridged).
_INITIAL_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in (
        "7z",
        "arrow",
        "bin",
        "bz2",
        "ckpt",
        "gguf",
        "gz",
        "h5",
        "joblib",
        "msgpack",
        "npy",
        "npz",
        "onnx",
        "ot",
        "parquet",
        "pb",
        "pickle",
        "pkl",
        "pt",
        "pth",
        "safetensors",
        "tar",
        "tflite",
        "tgz",
        "wasm",
        "xz",
        "zip",
        "zst",
    )
)


@dataclass
class CommitResult:
    """What :meth:`HubStorage.commit` made: the new commit and, for ``create_pr``, the PR number."""

    commit: Commit
    pr_num: int | None = None


@dataclass
class _Refs:
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[str, str] = field(default_factory=dict)

    def lookup(self, name: str) -> str | None:
        """The commit a ref name points at: ``main``, ``refs/heads/main``, ``v1``, ``refs/tags/v1``, ``refs/pr/3``."""
        if name.startswith("refs/heads/"):
            return self.branches.get(name[len("refs/heads/") :])
        if name.startswith("refs/tags/"):
            return self.tags.get(name[len("refs/tags/") :])
        if match := _PR_REF.match(name):
            return self.pulls.get(match[1])
        return self.branches.get(name) or self.tags.get(name)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class _LRU:
    """A small thread-safe least-recently-used cache (commit objects are immutable, so caching is safe)."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


# ----------------------------------------------------------------------------------------------------


class HubStorage:
    """Repos, commits and blobs under one folder; safe to share between the server's threads.

    Args:
        data_dir: the folder to keep everything in (created if missing). A new :class:`HubStorage` on
            the same folder sees every repo and commit an earlier one made.

    Example:
        >>> storage = HubStorage(tmp_path)
        >>> key = RepoKey("model", "org", "demo")
        >>> _ = storage.create_repo(key)
        >>> oid = storage.put_blob(b"hello")
        >>> result = storage.commit(key, "main", [AddFile("a.txt", oid, 5)], title="add a.txt")
        >>> sorted(storage.resolve(key, "main").tree)
        ['.gitattributes', 'a.txt']
    """

    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir).expanduser().resolve()
        self._blobs = self.root / "blobs"
        self._repos = self.root / "repos"
        self._trash = self.root / "trash"
        for folder in (self._blobs, self._repos, self._trash):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._trash, ignore_errors=True)  # leftovers of deletions interrupted by a crash
        self._trash.mkdir(exist_ok=True)
        self._global_lock = threading.Lock()
        self._repo_locks: dict[RepoKey, threading.Lock] = {}
        self._commit_cache = _LRU(capacity=1024)

    # -- blobs ----------------------------------------------------------------------------------------

    def blob_path(self, oid: str) -> Path:
        """Where the blob ``oid`` lives on disk."""
        return self._blobs / oid[:2] / oid[2:]

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its git blob sha1."""
        oid = git_blob_oid(data)
        path = self.blob_path(oid)
        if not path.exists():
            _atomic_write(path, data)
        return oid

    # -- repos ----------------------------------------------------------------------------------------

    def _repo_dir(self, key: RepoKey) -> Path:
        return self._repos / f"{key.type}s" / key.namespace / key.name

    def _repo_lock(self, key: RepoKey) -> threading.Lock:
        with self._global_lock:
            return self._repo_locks.setdefault(key, threading.Lock())

    def repo_meta(self, key: RepoKey) -> dict[str, Any]:
        """The repo's metadata (``id``, ``_id``, ``private``, ``createdAt``...).

        Raises:
            HubError: 404 ``RepoNotFound``.
        """
        try:
            return _read_json(self._repo_dir(key) / "repo.json")
        except FileNotFoundError:
            raise HubError(404, f"Repository not found: {key}", code="RepoNotFound") from None

    def create_repo(
        self, key: RepoKey, *, private: bool = False, extra: dict | None = None
    ) -> dict[str, Any]:
        """Create an empty repo whose ``main`` holds the Hub's usual "initial commit" with ``.gitattributes``.

        Raises:
            HubError: 409 if the repo already exists.
        """
        folder = self._repo_dir(key)
        with self._global_lock:
            if (folder / "repo.json").exists():
                raise HubError(409, f"You already created this {key.type} repo: {key.repo_id}")
            meta = {
                "id": key.repo_id,
                "_id": secrets.token_hex(12),
                "type": key.type,
                "private": bool(private),
                "createdAt": now_iso(),
                **(extra or {}),
            }
            oid = self.put_blob(_INITIAL_GITATTRIBUTES)
            initial = self._new_commit(
                parents=(),
                tree={".gitattributes": TreeEntry(oid, len(_INITIAL_GITATTRIBUTES))},
                title="initial commit",
                message="",
                author="system",
            )
            self._write_commit(key, initial)
            _write_json(folder / "refs.json", {"branches": {"main": initial.id}, "tags": {}, "pulls": {}})
            _write_json(folder / "repo.json", meta)  # last: the repo exists once this file does
            return meta

    def delete_repo(self, key: RepoKey) -> None:
        """Delete a repo and its history (blobs stay: they may be shared).

        Raises:
            HubError: 404 ``RepoNotFound``.
        """
        repo_lock = self._repo_lock(key)  # before taking the global lock, which _repo_lock needs
        with self._global_lock, repo_lock:
            folder = self._repo_dir(key)
            if not (folder / "repo.json").exists():
                raise HubError(404, f"Repository not found: {key}", code="RepoNotFound")
            doomed = self._trash / secrets.token_hex(8)
            os.replace(folder, doomed)  # atomic: the repo disappears at once
        shutil.rmtree(doomed, ignore_errors=True)

    def update_meta(self, key: RepoKey, **changes: Any) -> dict[str, Any]:
        """Change metadata fields (e.g. ``private=True``) and return the new metadata."""
        with self._repo_lock(key):
            meta = {**self.repo_meta(key), **changes}
            _write_json(self._repo_dir(key) / "repo.json", meta)
            return meta

    def list_repos(self, repo_type: str) -> Iterator[RepoKey]:
        """Every repo of one type, in no particular order."""
        for meta_file in (self._repos / f"{repo_type}s").glob("*/*/repo.json"):
            yield RepoKey(repo_type, meta_file.parent.parent.name, meta_file.parent.name)

    # -- refs and commits -----------------------------------------------------------------------------

    def _read_refs(self, key: RepoKey) -> _Refs:
        self.repo_meta(key)  # 404 RepoNotFound first
        return _Refs(**_read_json(self._repo_dir(key) / "refs.json"))

    def _write_refs(self, key: RepoKey, refs: _Refs) -> None:
        _write_json(
            self._repo_dir(key) / "refs.json",
            {"branches": refs.branches, "tags": refs.tags, "pulls": refs.pulls},
        )

    def refs(self, key: RepoKey) -> dict[str, dict[str, str]]:
        """``{"branches": {name: sha}, "tags": {name: sha}, "pulls": {num: sha}}``."""
        refs = self._read_refs(key)
        return {"branches": dict(refs.branches), "tags": dict(refs.tags), "pulls": dict(refs.pulls)}

    def _new_commit(self, *, parents, tree, title, message, author) -> Commit:
        date = now_iso()
        # A random salt makes ids unique even for identical content, time and parents in two repos.
        seed = json.dumps(
            [
                parents,
                sorted((p, e.oid) for p, e in tree.items()),
                title,
                message,
                date,
                author,
                secrets.token_hex(16),
            ]
        )
        return Commit(
            hashlib.sha1(seed.encode()).hexdigest(), tuple(parents), tree, title, message, date, author
        )

    def _write_commit(self, key: RepoKey, commit: Commit) -> None:
        _write_json(self._repo_dir(key) / "commits" / f"{commit.id}.json", commit.to_json())
        self._commit_cache.put(commit.id, commit)

    def _load_commit(self, key: RepoKey, sha: str) -> Commit | None:
        path = self._repo_dir(key) / "commits" / f"{sha}.json"
        if not path.exists():
            return None
        if (cached := self._commit_cache.get(sha)) is None:
            cached = Commit.from_json(_read_json(path))
            self._commit_cache.put(sha, cached)
        return cached

    def _commit_ids(self, key: RepoKey) -> list[str]:
        return [p.stem for p in (self._repo_dir(key) / "commits").glob("*.json")]

    def _resolve_sha(self, key: RepoKey, refs: _Refs, revision: str) -> str | None:
        """Ref name first, then a full or unique short commit sha of this repo."""
        if (sha := refs.lookup(revision)) is not None:
            return sha
        if _SHA_PREFIX.match(revision):
            if len(revision) == 40:
                return revision if (self._repo_dir(key) / "commits" / f"{revision}.json").exists() else None
            matches = [sha for sha in self._commit_ids(key) if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def resolve(self, key: RepoKey, revision: str = "main") -> Commit:
        """The commit that ``revision`` (branch, tag, ``refs/pr/N``, full or short sha) names.

        Raises:
            HubError: 404 ``RepoNotFound`` or ``RevisionNotFound``.
        """
        sha = self._resolve_sha(key, self._read_refs(key), revision)
        commit = self._load_commit(key, sha) if sha else None
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision} ({key})", code="RevisionNotFound")
        return commit

    def history(self, key: RepoKey, revision: str = "main") -> list[Commit]:
        """Commits reachable from ``revision`` through first parents, newest first."""
        commits, commit = [], self.resolve(key, revision)
        while commit is not None:
            commits.append(commit)
            commit = self._load_commit(key, commit.parents[0]) if commit.parents else None
        return commits

    def commit(
        self,
        key: RepoKey,
        revision: str,
        operations: list[Operation],
        *,
        title: str,
        message: str = "",
        author: str = "anonymous",
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> CommitResult:
        """Apply ``operations`` on top of branch ``revision`` as one atomic commit and move the ref.

        Args:
            key: the repo.
            revision: the branch to commit to (or, with ``create_pr``, the revision the PR starts from).
            operations: :class:`AddFile` / :class:`DeleteFile` / :class:`DeleteFolder`, applied in order;
                blobs must already be stored with :meth:`put_blob`.
            title, message, author: commit metadata.
            parent_commit: optimistic-concurrency guard: full or short sha the branch must still point at.
            create_pr: commit to a new ``refs/pr/N`` instead of moving ``revision``.

        Returns:
            The new commit (and PR number with ``create_pr``).

        Raises:
            HubError: 404 (repo, revision, deleted entry), 400 (not a branch, file/folder clash),
                412 when ``parent_commit`` is not the branch head any more.
        """
        with self._repo_lock(key):
            refs = self._read_refs(key)
            if create_pr:
                head = self._resolve_sha(key, refs, parent_commit or revision)
                if head is None:
                    raise HubError(404, f"Invalid rev id: {revision} ({key})", code="RevisionNotFound")
            else:
                branch = revision.removeprefix("refs/heads/")
                head = refs.branches.get(branch)
                if head is None:
                    if self._resolve_sha(key, refs, revision) is not None:
                        raise HubError(400, f"Can only commit to a branch, and '{revision}' is not one")
                    raise HubError(404, f"Invalid rev id: {revision} ({key})", code="RevisionNotFound")
                if parent_commit is not None and not head.startswith(parent_commit.lower()):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            base = self._load_commit(key, head)
            new = self._new_commit(
                parents=(head,),
                tree=apply_operations(base.tree, operations),
                title=title,
                message=message,
                author=author,
            )
            self._write_commit(key, new)  # before the ref: a ref never points at a missing commit
            pr_num = None
            if create_pr:
                pr_num = max((int(n) for n in refs.pulls), default=0) + 1
                refs.pulls[str(pr_num)] = new.id
            else:
                refs.branches[branch] = new.id
            self._write_refs(key, refs)
            return CommitResult(new, pr_num)

    def set_ref(
        self, key: RepoKey, kind: str, name: str, revision: str | None, *, exist_ok: bool = False
    ) -> str:
        """Create branch or tag ``name`` (``kind`` is ``"branches"`` or ``"tags"``) at ``revision``.

        Raises:
            HubError: 409 if it exists (unless ``exist_ok``), 404 if ``revision`` does not resolve.
        """
        check_file_path(name, field_name=f"{kind[:-1]} name")
        with self._repo_lock(key):
            refs = self._read_refs(key)
            table = getattr(refs, kind)
            if name in table and not exist_ok:
                raise HubError(409, f"{kind[:-1].capitalize()} '{name}' already exists in {key}")
            sha = self._resolve_sha(key, refs, revision or "main")
            if sha is None:
                raise HubError(404, f"Invalid rev id: {revision} ({key})", code="RevisionNotFound")
            table[name] = sha
            self._write_refs(key, refs)
            return sha

    def delete_ref(self, key: RepoKey, kind: str, name: str) -> None:
        """Delete a branch or tag (``main`` cannot be deleted).

        Raises:
            HubError: 404 ``RevisionNotFound`` if absent, 403 for ``main``.
        """
        with self._repo_lock(key):
            refs = self._read_refs(key)
            if kind == "branches" and name == "main":
                raise HubError(403, "The default branch 'main' cannot be deleted")
            if getattr(refs, kind).pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name} ({key})", code="RevisionNotFound")
            self._write_refs(key, refs)
