"""Checks applied where data enters moin-hub: repo ids, revisions, vectors, relative paths, queries.

Every check raises a :class:`ValueError` subclass whose message names the field and the bad value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from huggingface_hub.utils import HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from .errors import EmbedderMismatchError, EmptyQueryError, UnsafeFileError

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

#: Longest query the router accepts, in characters; longer input is almost surely a mistake.
MAX_QUERY_CHARS = 100_000


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages never echo a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}...({len(text)} chars)"


def validate_repo_id(repo_id: str, *, field: str = "repo_id", namespaced: bool = True) -> str:
    """Check a Hub repo id (``"org/name"``) and return it.

    Args:
        repo_id: the id to check.
        field: the name shown in the error message (``"--registry"`` ...).
        namespaced: require the ``org/`` part, as every moin-hub repo lives in a namespace.

    Raises:
        ValueError: with the field name and the bad value.

    Example:
        >>> validate_repo_id("acme/moin-registry")
        'acme/moin-registry'
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"{field} must be a non-empty 'org/name' string, got {short_repr(repo_id)}.")
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{field}={short_repr(repo_id)} is not a valid Hub repo id: "
                         f"{str(err).splitlines()[0][:200]}") from None
    if namespaced and "/" not in repo_id:
        raise ValueError(f"{field}={short_repr(repo_id)} must include a namespace, like 'org/NAME'.")
    return repo_id


def is_commit_sha(revision: str | None) -> bool:
    """True if ``revision`` is a full 40-hex commit sha (a pinned, immutable revision)."""
    return isinstance(revision, str) and bool(_SHA_RE.match(revision))


def validate_commit_sha(revision: str, *, field: str = "revision") -> str:
    """Check that ``revision`` is a full 40-hex commit sha and return it."""
    if not is_commit_sha(revision):
        raise ValueError(f"{field}={short_repr(revision)} must be a full 40-character commit sha.")
    return revision


def validate_vector(vector: Sequence[float] | np.ndarray, *, dim: int | None = None,
                    field: str = "centroid") -> np.ndarray:
    """Check that ``vector`` is a finite, non-zero 1-d float vector (of length ``dim`` if given).

    Returns:
        The vector as a contiguous ``float32`` numpy array.

    Raises:
        EmbedderMismatchError: if its length differs from ``dim``.
        ValueError: if it is not 1-d, holds NaN/inf, or is all zeros.
    """
    try:
        arr = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field} must be a sequence of numbers: {err}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{field} must be a non-empty 1-d vector, got shape {tuple(arr.shape)}.")
    if dim is not None and arr.shape[0] != dim:
        raise EmbedderMismatchError(expected=dim, actual=int(arr.shape[0]), what=field)
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{field} must be finite; element {bad} is {arr[bad]}.")
    if not np.any(arr):
        raise ValueError(f"{field} is all zeros: it has no direction to route by.")
    return np.ascontiguousarray(arr)


def validate_relative_path(path: str, *, field: str = "path") -> str:
    """Check that ``path`` is a relative POSIX path that stays inside its folder.

    Raises:
        UnsafeFileError: for absolute paths, ``..`` parts, backslashes or NUL bytes.
    """
    if not isinstance(path, str) or not path:
        raise UnsafeFileError(str(path), f"{field} must be a non-empty relative path")
    if "\x00" in path or "\\" in path:
        raise UnsafeFileError(path, f"{field} must not contain NUL or backslashes")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise UnsafeFileError(path, f"{field} must be relative")
    if any(part in ("..", "") for part in path.split("/")):
        raise UnsafeFileError(path, f"{field} must not contain '..' or empty parts")
    return path


def validate_query(query: str) -> str:
    """Check a routing query and return it stripped.

    Raises:
        EmptyQueryError: for an empty or whitespace-only query.
        ValueError: for a non-string or a query over :data:`MAX_QUERY_CHARS` characters.
    """
    if not isinstance(query, str):
        raise ValueError(f"query must be a string, got {type(query).__name__}.")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. undecodable bytes from the command line
        raise ValueError("query is not valid UTF-8 text (it holds undecodable bytes).") from None
    stripped = query.strip()
    if not stripped:
        raise EmptyQueryError()
    if len(stripped) > MAX_QUERY_CHARS:
        raise ValueError(f"query is {len(stripped)} characters; the limit is {MAX_QUERY_CHARS}.")
    return stripped


def validate_positive_int(value: int, *, field: str) -> int:
    """Check that ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {short_repr(value)}.")
    return value


def validate_finite_or_none(value: float | None, *, field: str) -> float | None:
    """Check that ``value`` is None or a finite number, and return it as float."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be a number, got {short_repr(value)}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{field} must be finite, got {short_repr(value)}.")
    return number
