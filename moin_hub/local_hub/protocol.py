"""Requests and replies of the local Hub: what a route handler reads and what it answers.

:class:`_Request` is one parsed HTTP request, :class:`_Reply` one answer (bytes, or a slice of a blob file to
stream); the helpers parse revisions in URLs and ``Range`` headers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from .objects import HubError

_TRUE = {"1", "true", "True", "yes"}


@dataclass
class _Reply:
    """An HTTP answer: a status, headers and either bytes or a slice of a file to stream."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    file: tuple[Path, int, int] | None = None  # (path, offset, length)

    @property
    def length(self) -> int:
        return self.file[2] if self.file else len(self.body)


def _json_reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
    body = json.dumps(obj, default=str).encode()
    return _Reply(status=status, body=body, headers=headers or {})


def _error_reply(error: HubError) -> _Reply:
    headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode()[:1000], **error.headers}
    if error.code:
        headers["X-Error-Code"] = error.code
    return _json_reply({"error": error.message, **error.extra}, error.status, headers)


@dataclass
class _Request:
    """What a route handler needs to know about one request."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Message
    base_url: str
    read_body: Callable[[], bytes]

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return self.param(name, "") in _TRUE

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return token.strip() or None

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (``{}`` when empty); 400 on malformed JSON."""
        body = self.read_body()
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HubError(400, f"Malformed JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise HubError(400, f"JSON body must be an object, got {type(data).__name__}")
        return data


def _split_revision(parts: list[str]) -> tuple[str, list[str]]:
    """Split ``[rev, *path]``; an unquoted ``refs/pr/1`` (or heads/tags/convert) spans three segments."""
    if not parts or not parts[0]:
        raise HubError(400, "Missing revision in URL")
    if len(parts) >= 3 and parts[0] == "refs" and parts[1] in ("pr", "heads", "tags", "convert"):
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


def _whole_revision(parts: list[str]) -> str:
    """A revision that is the rest of the URL (``commit/{rev}``), quoted or not."""
    revision, rest = _split_revision(parts)
    if rest:
        raise HubError(404, f"Unknown route below revision {revision!r}")
    return revision


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` / ``a-`` / ``-n`` -> inclusive ``(start, end)``; ``None`` to serve it all.

    Raises:
        HubError: 416 when the range cannot be satisfied.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multi-range requests: RFC 9110 lets us ignore the header
    first, dash, last = (part.strip() for part in spec.partition("-"))
    well_formed = dash and (first or last) and (first or "0").isdigit() and (last or "0").isdigit()
    if not well_formed or (first and last and int(last) < int(first)):
        return None  # malformed: RFC 9110 lets us ignore the header and send the whole file
    unsatisfiable = HubError(
        416,
        f"Range {header!r} not satisfiable for {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
    if not first:  # suffix range: the last n bytes
        if int(last) == 0 or size == 0:
            raise unsatisfiable
        return max(size - int(last), 0), size - 1
    if int(first) >= size:
        raise unsatisfiable
    return int(first), min(int(last) if last else size - 1, size - 1)
