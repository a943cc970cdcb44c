"""What the local Hub stores, apart from disk and HTTP: repo keys, commits, trees, commit operations.

Also the error every part of the local Hub raises (:class:`HubError`, an HTTP status and message) and the
pure checks and helpers on these objects: git blob oids, repo-name and file-path checks, applying commit
operations to a tree. :mod:`moin_hub.local_hub.storage` keeps them on disk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

REPO_TYPES = ("model", "dataset", "space")

# Same rules as huggingface_hub's `validate_repo_id`: word characters, '-' and '.', at most 96 long,
# starting and ending with a word character, no '--' or '..', not ending with '.git'.
_REPO_PART = re.compile(r"^\w(?:[\w.-]{0,94}\w)?$", re.ASCII)


class HubError(Exception):
    """An error the server turns into an HTTP answer: ``status``, a message and maybe an ``X-Error-Code``.

    Args:
        status: HTTP status code (4xx for the caller's mistakes: the client retries 5xx).
        message: one line for humans; it becomes ``{"error": message}``.
        code: value of the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
            ``EntryNotFound``) that ``huggingface_hub`` maps to its typed errors.
        extra: more JSON fields for the body (e.g. ``url`` on a 409 from repo creation).
        headers: more response headers (e.g. ``Content-Range`` on a 416).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        extra: dict | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}
        self.headers = headers or {}


class RepoKey(NamedTuple):
    """Identifies one repo: ``RepoKey("model", "org", "name")``."""

    type: str
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_prefix(self) -> str:
        """The part of web URLs before the repo id: ``""`` for models, ``"datasets/"`` for datasets."""
        return "" if self.type == "model" else f"{self.type}s/"

    def __str__(self) -> str:
        return f"{self.type} repo '{self.repo_id}'"


@dataclass(frozen=True)
class TreeEntry:
    """One file in a commit's tree."""

    oid: str
    size: int


@dataclass(frozen=True)
class Commit:
    """An immutable commit: its parents and the complete tree of the repo at that point."""

    id: str
    parents: tuple[str, ...]
    tree: dict[str, TreeEntry]
    title: str
    message: str
    date: str
    author: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parents": list(self.parents),
            "tree": {path: [entry.oid, entry.size] for path, entry in sorted(self.tree.items())},
            "title": self.title,
            "message": self.message,
            "date": self.date,
            "author": self.author,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        return cls(
            id=data["id"],
            parents=tuple(data["parents"]),
            tree={path: TreeEntry(oid, size) for path, (oid, size) in data["tree"].items()},
            title=data["title"],
            message=data["message"],
            date=data["date"],
            author=data["author"],
        )


@dataclass(frozen=True)
class AddFile:
    """Commit operation: write ``path`` with the blob ``oid`` (already in the blob store)."""

    path: str
    oid: str
    size: int


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: remove the file ``path`` (404 ``EntryNotFound`` if absent)."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Commit operation: remove every file under the folder ``path`` (404 if it holds none)."""

    path: str


Operation = AddFile | DeleteFile | DeleteFolder


# ----------------------------------------------------------------------------------------------------
# small pure helpers


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``: what git, the Hub and ``huggingface_hub`` call a regular file's oid.

    Example:
        >>> git_blob_oid(b"")
        'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now_iso() -> str:
    """Current UTC time in the Hub's format, ``2024-05-01T12:00:00.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_repo_part(value: object, field_name: str) -> str:
    """Validate a namespace or repo name (no traversal, no odd characters) or raise a 400 naming it."""
    if (
        not isinstance(value, str)
        or not _REPO_PART.match(value)
        or "--" in value
        or ".." in value
        or value.endswith(".git")
    ):
        raise HubError(
            400,
            f"Invalid {field_name} {value!r}: use letters, digits, '-', '_' or '.', at most 96 characters, "
            "no '--' or '..', not ending with '.git'",
        )
    return value


def check_file_path(path: object, *, field_name: str = "path") -> str:
    """Validate a path inside a repo: relative, '/'-separated, no '.', '..' or empty parts, no '\\' or NUL.

    Raises:
        HubError: 400 naming the field and the bad value.
    """
    if not isinstance(path, str) or not path:
        raise HubError(400, f"Invalid {field_name} {path!r}: must be a non-empty string")
    bad = (
        path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    )
    if bad:
        raise HubError(
            400,
            f"Invalid {field_name} {path!r}: must be relative, without '..', '.', '\\', NUL or empty parts",
        )
    return path


def folder_oid(entries: Iterable[tuple[str, str]]) -> str:
    """A stable id for a folder, from its ``(relative path, oid)`` pairs (not git's tree hash, just as unique)."""
    digest = hashlib.sha1(b"tree\0")
    for path, oid in sorted(entries):
        digest.update(f"{path}\0{oid}\n".encode())
    return digest.hexdigest()


def _parent_folders(path: str) -> Iterator[str]:
    """``"a/b/c.txt"`` -> ``"a"``, ``"a/b"``."""
    parts = path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        yield "/".join(parts[:depth])


def apply_operations(tree: dict[str, TreeEntry], operations: Iterable[Operation]) -> dict[str, TreeEntry]:
    """Return a new tree with ``operations`` applied in order (the input is not modified).

    Raises:
        HubError: 404 ``EntryNotFound`` when deleting a file or folder that does not exist, 400 when a
            file would take the name of a folder or the other way round.
    """
    new_tree = dict(tree)
    folders: set[str] | None = None  # every folder of new_tree, rebuilt lazily after deletions
    for op in operations:
        if isinstance(op, AddFile):
            if folders is None:
                folders = {folder for path in new_tree for folder in _parent_folders(path)}
            if op.path in folders:
                raise HubError(400, f"Cannot add file '{op.path}': a folder with this name exists")
            for folder in _parent_folders(op.path):
                if folder in new_tree:
                    raise HubError(400, f"Cannot add file '{op.path}': '{folder}' is a file")
                folders.add(folder)
            new_tree[op.path] = TreeEntry(op.oid, op.size)
            continue
        folders = None
        if isinstance(op, DeleteFile):
            if new_tree.pop(op.path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: '{op.path}'", code="EntryNotFound")
        else:
            prefix = op.path.rstrip("/") + "/"
            doomed = [path for path in new_tree if path.startswith(prefix)]
            if not doomed:
                raise HubError(
                    404, f"A folder with this name doesn't exist: '{op.path}'", code="EntryNotFound"
                )
            for path in doomed:
                del new_tree[path]
    return new_tree
