"""A Hugging Face Hub-compatible HTTP server on loopback, for offline work and tests.

The real ``huggingface_hub`` client, ``datasets.load_dataset``, ``pandas.read_parquet("hf://...")`` and
``from_pretrained(repo, revision=sha)`` talk to :class:`LocalHub` exactly as they talk to huggingface.co:
only the endpoint differs. It speaks the subset of the Hub's HTTP API those clients use (see
``HUB_EMULATOR.md`` for the contract): repo create/delete/info, preupload, the atomic NDJSON commit
endpoint with ``parentCommit`` (optimistic concurrency: 412 when stale), tree, paths-info, refs, commits,
branches and tags, model/dataset listing with tag filters, card YAML validation, ``whoami-v2`` and
``resolve`` downloads with ``ETag``, ``X-Repo-Commit`` and byte ranges.

Uploads are always "regular" (base64 inside the commit): the server never hands out LFS or Xet uploads,
so nothing leaves the machine. Storage is :class:`moin_hub.local_hub.storage.HubStorage`: content-addressed
blobs, immutable commits and atomically replaced refs under ``data_dir``, so a restarted server sees
everything an earlier one stored.

Example:
    >>> from huggingface_hub import HfApi
    >>> with LocalHub(tmp_path) as hub:
    ...     api = HfApi(endpoint=hub.url)
    ...     api.create_repo("org/demo")
    ...     api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="org/demo")
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import mimetypes
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import yaml

from .storage import (
    REPO_TYPES,
    AddFile,
    Commit,
    DeleteFile,
    DeleteFolder,
    HubError,
    HubStorage,
    Operation,
    RepoKey,
    TreeEntry,
    check_file_path,
    check_repo_part,
    folder_oid,
)

logger = logging.getLogger(__name__)

__all__ = ["Fault", "LocalHub", "validate_card_metadata"]

DEFAULT_MAX_BODY_BYTES = 2 * 1024**3
_DRAIN_LIMIT = 16 * 1024**2  # unread request bodies up to this size are drained to keep the connection
_COPY_CHUNK = 1024**2
_STALE_PARENT = "A commit has happened since. Please refresh and try again."
_PLURAL_TO_TYPE = {f"{t}s": t for t in REPO_TYPES}
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_TRUE = {"1", "true", "True", "yes"}


# ====================================================================================================
# Repo cards: front matter, validation, tags


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_type(meta: dict, name: str, kind: str) -> list[str]:
    """One message if ``meta[name]`` is present and not of ``kind`` ("str", "list", "str|list", "bool")."""
    if name not in meta or meta[name] is None:
        return []
    value = meta[name]
    ok = {
        "str": isinstance(value, str),
        "list": _is_str_list(value),
        "str|list": isinstance(value, str) or _is_str_list(value),
        "bool": isinstance(value, bool),
    }[kind]
    wanted = {
        "str": "a string",
        "list": "a list of strings",
        "str|list": "a string or a list of strings",
        "bool": "a boolean",
    }[kind]
    return [] if ok else [f'"{name}" must be {wanted}, got {value!r}']


def _check_model_index(value: Any) -> list[str]:
    """Check ``model-index`` the way the Hub does: names, tasks, datasets and metrics in place."""
    if not isinstance(value, list):
        return [f'"model-index" must be a list of mappings, got {value!r}']
    errors = []
    for i, model in enumerate(value):
        where = f'"model-index"[{i}]'
        if not isinstance(model, dict):
            errors.append(f"{where} must be a mapping, got {model!r}")
            continue
        if not isinstance(model.get("name"), str):
            errors.append(f"{where}.name must be a string, got {model.get('name')!r}")
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be a list, got {results!r}")
            continue
        for j, result in enumerate(results):
            errors += _check_eval_result(result, f"{where}.results[{j}]")
    return errors


def _check_eval_result(result: Any, where: str) -> list[str]:
    if not isinstance(result, dict):
        return [f"{where} must be a mapping, got {result!r}"]
    errors = []
    task = result.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
        errors.append(f"{where}.task must be a mapping with a string 'type', got {task!r}")
    dataset = result.get("dataset")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
        errors.append(f"{where}.dataset must be a mapping with string 'type' and 'name', got {dataset!r}")
    metrics = result.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        errors.append(f"{where}.metrics must be a non-empty list, got {metrics!r}")
    else:
        for k, metric in enumerate(metrics):
            if (
                not isinstance(metric, dict)
                or not isinstance(metric.get("type"), str)
                or "value" not in metric
            ):
                errors.append(f"{where}.metrics[{k}] must be a mapping with a string 'type' and a 'value'")
    return errors


def _check_configs(value: Any) -> list[str]:
    """Check a dataset card's ``configs``: config names and ``data_files`` (str, list, or split mappings)."""
    if not isinstance(value, list):
        return [f'"configs" must be a list of mappings, got {value!r}']
    errors = []
    for i, config in enumerate(value):
        where = f'"configs"[{i}]'
        if not isinstance(config, dict):
            errors.append(f"{where} must be a mapping, got {config!r}")
            continue
        if not isinstance(config.get("config_name"), str):
            errors.append(f"{where}.config_name must be a string, got {config.get('config_name')!r}")
        errors += [f"{where}.{e}" for e in _check_type(config, "default", "bool")]
        data_files = config.get("data_files")
        if data_files is None or isinstance(data_files, str) or _is_str_list(data_files):
            continue
        splits_ok = isinstance(data_files, list) and all(
            isinstance(split, dict)
            and isinstance(split.get("split"), str)
            and (isinstance(split.get("path"), str) or _is_str_list(split.get("path")))
            for split in data_files
        )
        if not splits_ok:
            errors.append(
                f"{where}.data_files must be a string, a list of strings, or a list of "
                f"{{split, path}} mappings, got {data_files!r}"
            )
    return errors


def parse_front_matter(content: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README.md, as a dict (``{}`` when there is none).

    Raises:
        ValueError: the block is not valid YAML or not a mapping.
    """
    match = _YAML_BLOCK.search(content)
    if match is None:
        return {}
    try:
        meta = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        raise ValueError(f"Invalid YAML in README.md front matter: {exc}".replace("\n", " ")) from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"README.md front matter must be a YAML mapping, got {type(meta).__name__}")
    return meta


def validate_card_metadata(content: str, repo_type: str = "model") -> list[str]:
    """Check a README.md's metadata like the Hub's ``/api/validate-yaml``; return one message per problem.

    Known fields must have the Hub's types: ``tags`` a list of strings; ``license``, ``library_name``,
    ``pipeline_tag`` strings (a dataset's ``license`` may be a list); ``base_model``, ``datasets``,
    ``language``, ``metrics`` a string or a list of strings; ``model-index`` a list of models with
    results; ``configs`` a list of dataset configs. Unknown fields are accepted.

    Example:
        >>> validate_card_metadata("---\\ntags: oops\\n---\\n")
        ['"tags" must be a list of strings, got \\'oops\\'']
    """
    try:
        meta = parse_front_matter(content)
    except ValueError as exc:
        return [str(exc)]
    kinds = {
        "tags": "list",
        "library_name": "str",
        "pipeline_tag": "str",
        "license": "str" if repo_type == "model" else "str|list",
        "license_name": "str",
        "license_link": "str",
        "pretty_name": "str",
        "base_model": "str|list",
        "datasets": "str|list",
        "language": "str|list",
        "metrics": "str|list",
        "task_categories": "str|list",
        "size_categories": "str|list",
    }
    errors = [message for name, kind in kinds.items() for message in _check_type(meta, name, kind)]
    if "model-index" in meta:
        errors += _check_model_index(meta["model-index"])
    if "configs" in meta:
        errors += _check_configs(meta["configs"])
    return errors


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def derive_tags(meta: dict[str, Any], repo_type: str) -> list[str]:
    """Repo tags as the Hub derives them from card metadata, without duplicates.

    Example:
        >>> derive_tags({"tags": ["lora"], "library_name": "peft", "license": "mit", "base_model": "a/b"}, "model")
        ['lora', 'peft', 'base_model:a/b', 'license:mit']
    """
    tags = _as_list(meta.get("tags"))
    if repo_type == "model":
        tags += _as_list(meta.get("library_name")) + _as_list(meta.get("pipeline_tag"))
        tags += [f"base_model:{m}" for m in _as_list(meta.get("base_model"))]
        tags += [f"dataset:{d}" for d in _as_list(meta.get("datasets"))]
        tags += _as_list(meta.get("language"))
    else:
        for name in ("task_categories", "size_categories", "language"):
            tags += [f"{name}:{v}" for v in _as_list(meta.get(name))]
    tags += [f"license:{lic}" for lic in _as_list(meta.get("license"))]
    return list(dict.fromkeys(tags))


# ====================================================================================================
# Write tokens


class _TokenBook:
    """Which tokens may write into which namespace (thread-safe)."""

    def __init__(self) -> None:
        self._tokens: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def add(self, namespace: str, token: str) -> None:
        with self._lock:
            self._tokens.setdefault(namespace, set()).add(token)

    def allowed(self, namespace: str) -> set[str]:
        """The tokens of ``namespace``; empty when anyone may write there."""
        with self._lock:
            return set(self._tokens.get(namespace, ()))

    def namespaces_of(self, token: str) -> list[str]:
        with self._lock:
            return sorted(ns for ns, tokens in self._tokens.items() if token in tokens)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._tokens)


# ====================================================================================================
# Fault injection


FAULT_KINDS = ("status", "delay", "drop", "drop_after")


@dataclass
class Fault:
    """A misbehaviour the hub applies to matching requests (see :meth:`LocalHub.inject_fault`).

    Attributes:
        kind: ``"status"`` (answer ``status`` with a JSON error), ``"delay"`` (sleep ``seconds``, then
            serve normally), ``"drop"`` (close the connection without answering) or ``"drop_after"`` (serve
            the request, so a commit lands, then close the connection without answering).
        method: HTTP method to match (``None``: any).
        path_regex: searched in the raw request target (path and query).
        times: how many more requests it applies to (``None``: forever).
    """

    kind: str
    method: str | None = None
    path_regex: str = ""
    status: int = 503
    seconds: float = 0.0
    times: int | None = 1
    hits: int = 0
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"Fault times must be >= 1 or None, got {self.times!r}")
        self._pattern = re.compile(self.path_regex)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method.upper() == method) and bool(self._pattern.search(target))


# ====================================================================================================
# Requests and replies


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


# ====================================================================================================
# The API


class _HubApi:
    """Route handlers: each turns a :class:`_Request` into a :class:`_Reply` or raises :class:`HubError`."""

    def __init__(self, storage: HubStorage, tokens: _TokenBook):
        self.storage = storage
        self.tokens = tokens
        self._card_cache: dict[str, dict] = {}  # README blob oid -> parsed metadata

    # -- routing --------------------------------------------------------------------------------------

    def dispatch(self, req: _Request) -> _Reply:
        segs, method = req.segments, req.method
        read = method in ("GET", "HEAD")
        match segs:
            case ["api", "whoami-v2"] if read:
                return self.whoami(req)
            case ["api", "validate-yaml"] if method == "POST":
                return self.validate_yaml(req)
            case ["api", "repos", "create"] if method == "POST":
                return self.create_repo(req)
            case ["api", "repos", "delete"] if method == "DELETE":
                return self.delete_repo(req)
            case ["api", plural] if read and plural in _PLURAL_TO_TYPE:
                return self.list_repos(req, _PLURAL_TO_TYPE[plural])
            case ["api", plural, ns, name, *tail] if plural in _PLURAL_TO_TYPE:
                return self.repo_api(req, self._key(_PLURAL_TO_TYPE[plural], ns, name), tail)
            case [("datasets" | "spaces") as plural, ns, name, "resolve", *rest] if read:
                return self.resolve(req, self._key(_PLURAL_TO_TYPE[plural], ns, name), rest)
            case [ns, name, "resolve", *rest] if read:
                return self.resolve(req, self._key("model", ns, name), rest)
        raise HubError(404, f"Unknown route: {method} /{'/'.join(segs)}")

    def repo_api(self, req: _Request, key: RepoKey, tail: list[str]) -> _Reply:
        method, read = req.method, req.method in ("GET", "HEAD")
        match tail:
            case [] if read:
                return self.info(req, key, "main")
            case ["revision", *rest] if read:
                return self.info(req, key, _whole_revision(rest))
            case ["tree", *rest] if read:
                revision, path = _split_revision(rest)
                return self.tree(req, key, revision, "/".join(path))
            case ["paths-info", *rest] if method == "POST":
                return self.paths_info(req, key, _whole_revision(rest))
            case ["refs"] if read:
                return self.refs(req, key)
            case ["commits", *rest] if read:
                return self.commits(req, key, _whole_revision(rest))
            case ["preupload", *rest] if method == "POST":
                return self.preupload(req, key, _whole_revision(rest))
            case ["commit", *rest] if method == "POST":
                return self.commit(req, key, _whole_revision(rest))
            case [("branch" | "tag") as kind, *rest] if method in ("POST", "DELETE"):
                return self.ref_change(req, key, kind, "/".join(rest))
            case ["settings"] if method == "PUT":
                return self.settings(req, key)
        raise HubError(404, f"Unknown route: {method} /api/{key.type}s/{key.repo_id}/{'/'.join(tail)}")

    @staticmethod
    def _key(repo_type: str, namespace: str, name: str) -> RepoKey:
        return RepoKey(repo_type, check_repo_part(namespace, "namespace"), check_repo_part(name, "repo name"))

    # -- auth -----------------------------------------------------------------------------------------

    def _user_name(self, token: str | None) -> str | None:
        """The user a token stands for: its first namespace, or a name derived from the token itself."""
        if token is None:
            return None
        namespaces = self.tokens.namespaces_of(token)
        if namespaces:
            return namespaces[0]
        return "user-" + hashlib.sha256(token.encode()).hexdigest()[:8]

    def _require_write(self, req: _Request, namespace: str) -> None:
        """401 without a token, 403 with a wrong one, when ``namespace`` is protected by tokens."""
        allowed = self.tokens.allowed(namespace)
        if not allowed:
            return
        if req.token is None:
            raise HubError(401, f"Writing to namespace '{namespace}' needs 'Authorization: Bearer <token>'")
        if req.token not in allowed:
            raise HubError(403, f"This token cannot write to namespace '{namespace}'")

    def _can_read(self, req: _Request, key: RepoKey, meta: dict) -> bool:
        allowed = self.tokens.allowed(key.namespace)
        return not meta.get("private") or not allowed or req.token in allowed

    def _readable_meta(self, req: _Request, key: RepoKey) -> dict:
        """The repo's metadata; private repos look missing (404) to anyone without their token."""
        meta = self.storage.repo_meta(key)
        if not self._can_read(req, key, meta):
            raise HubError(404, f"Repository not found: {key}", code="RepoNotFound")
        return meta

    def _readable_commit(self, req: _Request, key: RepoKey, revision: str) -> Commit:
        self._readable_meta(req, key)
        return self.storage.resolve(key, revision)

    # -- account and validation -----------------------------------------------------------------------

    def whoami(self, req: _Request) -> _Reply:
        token = req.token
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header (no token given)")
        if self.tokens and not self.tokens.namespaces_of(token):
            raise HubError(401, "Invalid credentials in Authorization header")
        name = self._user_name(token)
        orgs = [
            {"type": "org", "name": ns, "roleInOrg": "write"} for ns in self.tokens.namespaces_of(token)[1:]
        ]
        return _json_reply(
            {
                "type": "user",
                "id": hashlib.sha256(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "avatarUrl": "",
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": "write"},
                },
            }
        )

    def validate_yaml(self, req: _Request) -> _Reply:
        body = req.json()
        content, repo_type = body.get("content", ""), body.get("repoType") or "model"
        if not isinstance(content, str):
            raise HubError(400, f'"content" must be a string, got {type(content).__name__}')
        errors = validate_card_metadata(content, repo_type)
        if not errors:
            return _json_reply({"errors": [], "warnings": []})
        if "text/plain" in req.headers.get("Accept", ""):  # what RepoCard.validate asks for
            return _Reply(400, "\n".join(errors).encode(), "text/plain; charset=utf-8")
        return _json_reply(
            {
                "error": "Invalid metadata in README.md: " + "; ".join(errors),
                "errors": [{"message": e} for e in errors],
                "warnings": [],
            },
            400,
        )

    # -- repos ----------------------------------------------------------------------------------------

    def _repo_url(self, req: _Request, key: RepoKey) -> str:
        return f"{req.base_url}/{key.url_prefix}{key.repo_id}"

    def _key_from_body(self, req: _Request, body: dict) -> RepoKey:
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f'"type" must be one of {", ".join(REPO_TYPES)}, got {repo_type!r}')
        namespace = body.get("organization") or self._user_name(req.token)
        if namespace is None:
            raise HubError(400, '"organization" is required when no token tells whose repo it is')
        return self._key(repo_type, namespace, body.get("name"))

    def create_repo(self, req: _Request) -> _Reply:
        body = req.json()
        key = self._key_from_body(req, body)
        self._require_write(req, key.namespace)
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        extra = {"sdk": body["sdk"]} if key.type == "space" and body.get("sdk") else None
        try:
            meta = self.storage.create_repo(key, private=private, extra=extra)
        except HubError as exc:
            exc.extra["url"] = self._repo_url(req, key)
            raise
        return _json_reply({"url": self._repo_url(req, key), "name": key.repo_id, "id": meta["_id"]})

    def delete_repo(self, req: _Request) -> _Reply:
        key = self._key_from_body(req, req.json())
        self._require_write(req, key.namespace)
        self.storage.delete_repo(key)
        return _json_reply({})

    def settings(self, req: _Request, key: RepoKey) -> _Reply:
        body = req.json()
        self._require_write(req, key.namespace)
        self.storage.repo_meta(key)
        if "visibility" in body:
            self.storage.update_meta(key, private=body["visibility"] != "public")
        elif isinstance(body.get("private"), bool):
            self.storage.update_meta(key, private=body["private"])
        return _json_reply({})

    # -- repo info and listing ------------------------------------------------------------------------

    def _card(self, commit: Commit) -> dict[str, Any]:
        """The README.md metadata of a commit (``{}`` when absent or unparsable), cached by blob oid."""
        entry = commit.tree.get("README.md")
        if entry is None:
            return {}
        cached = self._card_cache.get(entry.oid)
        if cached is None:
            try:
                text = self.storage.blob_path(entry.oid).read_text(encoding="utf-8", errors="replace")
                cached = parse_front_matter(text)
            except (OSError, ValueError):
                cached = {}
            self._card_cache[entry.oid] = cached
        return cached

    def _repo_json(
        self,
        key: RepoKey,
        meta: dict,
        commit: Commit,
        *,
        full: bool,
        blobs: bool = False,
        card_data: bool = True,
    ) -> dict[str, Any]:
        """A repo as the Hub describes it in info (``full``) and list answers."""
        card = self._card(commit)
        data: dict[str, Any] = {
            "_id": meta["_id"],
            "id": key.repo_id,
            "author": key.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": meta["createdAt"],
            "private": meta.get("private", False),
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": derive_tags(card, key.type),
        }
        if key.type == "model":
            data["modelId"] = key.repo_id
            for name in ("library_name", "pipeline_tag"):
                if isinstance(card.get(name), str):
                    data[name] = card[name]
        elif key.type == "space":
            data["sdk"] = meta.get("sdk")
        if card_data and "README.md" in commit.tree:
            data["cardData"] = card
        if full:
            data["siblings"] = [
                {"rfilename": path, **({"size": e.size, "blobId": e.oid} if blobs else {})}
                for path, e in sorted(commit.tree.items())
            ]
            if blobs:
                data["usedStorage"] = sum(e.size for e in commit.tree.values())
        return data

    def info(self, req: _Request, key: RepoKey, revision: str) -> _Reply:
        meta = self._readable_meta(req, key)
        commit = self.storage.resolve(key, revision)
        return _json_reply(self._repo_json(key, meta, commit, full=True, blobs=req.flag("blobs")))

    def list_repos(self, req: _Request, repo_type: str) -> _Reply:
        """``GET /api/models``: ``filter`` (repeatable, all must be tags), ``search``, ``author``, ``sort``..."""
        wanted_tags = [tag for value in req.query.get("filter", []) for tag in value.split(",") if tag]
        search = (req.param("search") or "").lower()
        author = req.param("author")
        full, card_data = req.flag("full"), req.flag("cardData") or req.flag("full")
        items = []
        for key in self.storage.list_repos(repo_type):
            if (author and key.namespace != author) or search not in key.repo_id.lower():
                continue
            try:
                meta = self.storage.repo_meta(key)
                commit = self.storage.resolve(key, "main")
            except HubError:  # deleted while we were listing
                continue
            if not self._can_read(req, key, meta):
                continue
            item = self._repo_json(key, meta, commit, full=full, card_data=card_data)
            if all(tag in item["tags"] for tag in wanted_tags):
                items.append(item)
        sort_key = req.param("sort")
        if sort_key in ("lastModified", "createdAt", "downloads", "likes", "id", "trendingScore"):
            field_name = "likes" if sort_key == "trendingScore" else sort_key
            items.sort(key=lambda item: item[field_name], reverse=req.param("direction", "-1") == "-1")
        else:
            items.sort(key=lambda item: item["id"])
        limit = req.param("limit")
        if limit is not None:
            if not limit.isdigit():
                raise HubError(400, f'"limit" must be a non-negative integer, got {limit!r}')
            items = items[: int(limit)]
        return _json_reply(items)

    # -- tree, paths-info, refs, commits --------------------------------------------------------------

    @staticmethod
    def _file_entry(path: str, entry: TreeEntry) -> dict[str, Any]:
        return {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}

    @staticmethod
    def _folder_entry(path: str, files: Iterable[tuple[str, str]]) -> dict[str, Any]:
        return {"type": "directory", "oid": folder_oid(files), "size": 0, "path": path}

    def _with_last_commits(self, key: RepoKey, commit: Commit, entries: list[dict]) -> list[dict]:
        """Add ``lastCommit`` (the newest commit that changed each entry) for ``expand=true``."""
        history = self.storage.history(key, commit.id)

        def signature(tree: dict[str, TreeEntry], entry: dict) -> Any:
            if entry["type"] == "file":
                return tree.get(entry["path"])
            prefix = entry["path"] + "/"
            return sorted((p, e.oid) for p, e in tree.items() if p.startswith(prefix))

        for entry in entries:
            for current, parent in zip(history, history[1:] + [None], strict=True):
                before = signature(parent.tree, entry) if parent else None
                if signature(current.tree, entry) != before:
                    entry["lastCommit"] = {"id": current.id, "title": current.title, "date": current.date}
                    break
        return entries

    def tree(self, req: _Request, key: RepoKey, revision: str, path: str) -> _Reply:
        commit = self._readable_commit(req, key, revision)
        if path:
            check_file_path(path)
        base = f"{path}/" if path else ""
        recursive = req.flag("recursive")
        files: list[dict] = []
        folders: dict[str, list[tuple[str, str]]] = {}
        for file_path, entry in sorted(commit.tree.items()):
            if not file_path.startswith(base):
                continue
            parts = file_path[len(base) :].split("/")
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            for i in range(1, depth + 1):
                folders.setdefault(base + "/".join(parts[:i]), [])
            for i in range(1, len(parts)):  # every enclosing folder's oid covers this file
                folder = base + "/".join(parts[:i])
                if folder in folders:
                    folders[folder].append(("/".join(parts[i:]), entry.oid))
            if recursive or len(parts) == 1:
                files.append(self._file_entry(file_path, entry))
        if path and not files and not folders:  # missing, or a file (HfFileSystem relies on the 404 then)
            raise HubError(404, f"Folder '{path}' not found at {revision} ({key})", code="EntryNotFound")
        entries = [self._folder_entry(p, f) for p, f in sorted(folders.items())] + files
        if req.flag("expand"):
            entries = self._with_last_commits(key, commit, entries)
        return _json_reply(entries)

    def paths_info(self, req: _Request, key: RepoKey, revision: str) -> _Reply:
        """``POST paths-info/{rev}`` with form (or JSON) ``paths``: entries for the paths that exist."""
        if "json" in req.headers.get("Content-Type", ""):
            form = req.json()
            paths, expand = form.get("paths") or [], bool(form.get("expand"))
        else:
            form = parse_qs(req.read_body().decode("utf-8", "replace"), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", [""])[-1] in _TRUE
        if not isinstance(paths, list):
            raise HubError(400, f'"paths" must be a list of strings, got {paths!r}')
        commit = self._readable_commit(req, key, revision)
        entries = []
        for path in dict.fromkeys(paths):
            path = check_file_path(path.strip("/") if isinstance(path, str) else path, field_name="paths")
            if path in commit.tree:
                entries.append(self._file_entry(path, commit.tree[path]))
                continue
            prefix = path + "/"
            inside = [(p[len(prefix) :], e.oid) for p, e in commit.tree.items() if p.startswith(prefix)]
            if inside:
                entries.append(self._folder_entry(path, inside))
        if expand:
            entries = self._with_last_commits(key, commit, entries)
        return _json_reply(entries)

    def refs(self, req: _Request, key: RepoKey) -> _Reply:
        self._readable_meta(req, key)
        refs = self.storage.refs(key)

        def describe(name: str, ref: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": ref, "targetCommit": sha}

        data = {
            "branches": [describe(n, f"refs/heads/{n}", s) for n, s in sorted(refs["branches"].items())],
            "tags": [describe(n, f"refs/tags/{n}", s) for n, s in sorted(refs["tags"].items())],
            "converts": [],
        }
        if req.flag("include_prs"):
            data["pullRequests"] = [
                describe(f"refs/pr/{n}", f"refs/pr/{n}", s)
                for n, s in sorted(refs["pulls"].items(), key=lambda item: int(item[0]))
            ]
        return _json_reply(data)

    def commits(self, req: _Request, key: RepoKey, revision: str) -> _Reply:
        self._readable_meta(req, key)
        return _json_reply(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": None}],
                    "date": c.date,
                }
                for c in self.storage.history(key, revision)
            ]
        )

    def ref_change(self, req: _Request, key: RepoKey, kind: str, name: str) -> _Reply:
        """Create or delete a branch (``branch/{name}``) or tag (``tag/{revision}`` + ``{"tag": name}``)."""
        self._require_write(req, key.namespace)
        table = "branches" if kind == "branch" else "tags"
        if req.method == "DELETE":
            self.storage.delete_ref(key, table, name)
            return _json_reply({})
        body = req.json()
        if kind == "branch":
            self.storage.set_ref(key, table, name, body.get("startingPoint"))
        else:
            tag = body.get("tag")
            if not isinstance(tag, str):
                raise HubError(400, f'"tag" must be a string, got {tag!r}')
            self.storage.set_ref(key, table, tag, name)
        return _json_reply({})

    # -- uploads --------------------------------------------------------------------------------------

    def preupload(self, req: _Request, key: RepoKey, revision: str) -> _Reply:
        """Every file is "regular" (sent inline in the commit); ``oid`` lets the client skip unchanged ones."""
        body = req.json()
        commit = self._readable_commit(req, key, revision)
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, f'"files" must be a list, got {files!r}')
        answer = []
        for item in files:
            path = check_file_path(
                item.get("path") if isinstance(item, dict) else None, field_name="files[].path"
            )
            entry = commit.tree.get(path)
            answer.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": entry.oid if entry else None,
                }
            )
        return _json_reply({"files": answer, "commitOid": commit.id})

    def _parse_commit_payload(self, body: bytes, repo_type: str) -> tuple[dict, list[Operation]]:
        """Read the NDJSON commit body into its header and operations, storing added blobs on the way."""
        header: dict | None = None
        operations: list[Operation] = []
        for lineno, line in enumerate(body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if not isinstance(value, dict):
                    raise TypeError("value must be an object")
            except (ValueError, KeyError, TypeError) as exc:
                raise HubError(400, f"Malformed commit payload, line {lineno}: {exc}") from None
            if key == "header":
                header = value
            elif key == "file":
                operations.append(self._add_file(value, repo_type))
            elif key == "deletedFile":
                operations.append(DeleteFile(check_file_path(value.get("path"))))
            elif key == "deletedFolder":
                operations.append(DeleteFolder(check_file_path(str(value.get("path", "")).rstrip("/"))))
            elif key == "lfsFile":
                raise HubError(
                    400,
                    f"LFS files are not supported by this hub ('{value.get('path')}'): "
                    "preupload always answers 'regular', send the content inline",
                )
            else:
                raise HubError(400, f"Malformed commit payload, line {lineno}: unknown key {key!r}")
        if header is None:
            raise HubError(400, "Malformed commit payload: the first line must be the 'header'")
        return header, operations

    def _add_file(self, value: dict, repo_type: str) -> AddFile:
        path = check_file_path(value.get("path"))
        content, encoding = value.get("content"), value.get("encoding", "utf-8")
        if not isinstance(content, str):
            raise HubError(400, f"File '{path}': \"content\" must be a string")
        try:
            data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
        except binascii.Error as exc:
            raise HubError(400, f"File '{path}': invalid base64 content ({exc})") from None
        if path == "README.md":
            errors = validate_card_metadata(data.decode("utf-8", "replace"), repo_type)
            if errors:
                raise HubError(
                    400,
                    "Invalid metadata in README.md: " + "; ".join(errors),
                    extra={"errors": [{"message": e} for e in errors]},
                )
        return AddFile(path, self.storage.put_blob(data), len(data))

    def commit(self, req: _Request, key: RepoKey, revision: str) -> _Reply:
        """The atomic commit endpoint; a stale ``parentCommit`` gets the Hub's 412."""
        self._require_write(req, key.namespace)
        self.storage.repo_meta(key)
        header, operations = self._parse_commit_payload(req.read_body(), key.type)
        title = header.get("summary")
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, '"summary" (the commit message) must be a non-empty string')
        parent = header.get("parentCommit")
        if parent is not None and not re.fullmatch(r"[0-9a-fA-F]{4,40}", str(parent)):
            raise HubError(400, f'"parentCommit" must be a commit sha, got {parent!r}')
        result = self.storage.commit(
            key,
            revision,
            operations,
            title=title,
            message=str(header.get("description") or ""),
            author=self._user_name(req.token) or "anonymous",
            parent_commit=parent,
            create_pr=req.flag("create_pr"),
        )
        repo_url = self._repo_url(req, key)
        answer = {
            "success": True,
            "commitOid": result.commit.id,
            "commitUrl": f"{repo_url}/commit/{result.commit.id}",
            "hookOutput": "",
        }
        if result.pr_num is not None:
            answer["pullRequestUrl"] = f"{repo_url}/discussions/{result.pr_num}"
        return _json_reply(answer)

    # -- downloads ------------------------------------------------------------------------------------

    def resolve(self, req: _Request, key: RepoKey, rest: list[str]) -> _Reply:
        """``/{repo}/resolve/{rev}/{path}``: the file, with the headers ``hf_hub_download`` relies on."""
        revision, path_parts = _split_revision(rest)
        path = check_file_path("/".join(path_parts))
        commit = self._readable_commit(req, key, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(
                404,
                f"Entry not found: '{path}' at {revision} ({key})",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.id},  # lets the client cache "does not exist"
            )
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{Path(path).name}"'.encode(
                "ascii", "replace"
            ).decode(),
        }
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        blob = self.storage.blob_path(entry.oid)
        byte_range = _parse_range(req.headers["Range"], entry.size) if req.headers.get("Range") else None
        if byte_range is None:
            return _Reply(200, content_type=content_type, headers=headers, file=(blob, 0, entry.size))
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        return _Reply(206, content_type=content_type, headers=headers, file=(blob, start, end - start + 1))


# ====================================================================================================
# HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP/1.1 requests into :class:`_Request` objects and :class:`_Reply` objects into bytes."""

    protocol_version = "HTTP/1.1"
    server_version = "moin-hub-local/1"
    timeout = 300  # seconds an idle keep-alive connection may wait for its next request
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- one request ----------------------------------------------------------------------------------

    def _handle(self) -> None:
        hub: LocalHub = self.server.hub
        self._body: bytes | None = None
        started = time.monotonic()
        fault = hub._take_fault(self.command, self.path)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            hub._record(self.command, self.path, None)
            return
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "status":
            reply = _error_reply(HubError(fault.status, f"Injected fault: HTTP {fault.status}"))
        else:
            reply = self._route(hub)
        if fault is not None and fault.kind == "drop_after":  # the work is done, the answer is lost
            self.close_connection = True
            hub._record(self.command, self.path, None)
            return
        self._send(reply)
        hub._record(self.command, self.path, reply.status)
        if hub.verbose:
            self.log_message(
                '"%s %s" %s %.1f ms',
                self.command,
                self.path,
                reply.status,
                (time.monotonic() - started) * 1000,
            )

    def _route(self, hub: LocalHub) -> _Reply:
        raw_path, _, raw_query = self.path.partition("?")
        try:
            if not raw_path.startswith("/"):
                raise HubError(400, f"Bad request target {self.path!r}")
            segments = [unquote(part) for part in raw_path.split("/")[1:]]
            if segments and segments[-1] == "" and len(segments) > 1:
                segments.pop()  # tolerate one trailing slash
            if any("\0" in segment for segment in segments):
                raise HubError(400, "NUL characters are not allowed in URLs")
            request = _Request(
                method=self.command,
                segments=segments,
                query=parse_qs(raw_query, keep_blank_values=True),
                headers=self.headers,
                base_url=f"http://{self.headers.get('Host') or hub.host_port}",
                read_body=self._read_body,
            )
            return hub._api.dispatch(request)
        except HubError as exc:
            return _error_reply(exc)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:  # a bug in this server: say so, keep serving
            logger.exception("LocalHub: internal error on %s %s", self.command, self.path)
            return _error_reply(
                HubError(500, f"Internal error in the local hub: {type(exc).__name__}: {exc}")
            )

    # -- request bodies -------------------------------------------------------------------------------

    def _content_length(self) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            return 0
        if not value.strip().isdigit():
            raise HubError(400, f"Bad Content-Length {value!r}")
        return int(value)

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _read_body(self) -> bytes:
        """The request body (read once, bounded by the hub's ``max_body_bytes``; 413 beyond)."""
        if self._body is not None:
            return self._body
        limit = self.server.hub.max_body_bytes
        if self._is_chunked():
            self._body = self._read_chunked(limit)
            return self._body
        length = self._content_length()
        if length > limit:
            raise HubError(413, f"Request body of {length} bytes exceeds the limit of {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("client closed the connection mid-body")
        self._body = body
        return body

    def _read_chunked(self, limit: int) -> bytes:
        chunks, total = [], 0
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise HubError(400, f"Bad chunk size {size_line!r}") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                raise HubError(413, f"Request body exceeds the limit of {limit} bytes")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(8)  # the CRLF after each chunk

    def _settle_unread_body(self) -> bool:
        """Drain a small unread body so the connection can be reused; ``False`` if it must be closed."""
        if self._body is not None:
            return True
        try:
            if self._is_chunked():
                return False
            length = self._content_length()
        except HubError:
            return False
        if length == 0:
            return True
        if length > _DRAIN_LIMIT:
            return False
        self.rfile.read(length)
        return True

    # -- replies --------------------------------------------------------------------------------------

    def _send(self, reply: _Reply) -> None:
        keep_alive = self._settle_unread_body()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(reply.length))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if not keep_alive:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        if reply.file is None:
            self.wfile.write(reply.body)
            return
        path, offset, length = reply.file
        with open(path, "rb") as handle:
            handle.seek(offset)
            while length > 0:
                chunk = handle.read(min(_COPY_CHUNK, length))
                if not chunk:
                    raise ConnectionError(f"blob {path} is shorter than recorded")
                self.wfile.write(chunk)
                length -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):  # the client went away: nothing to answer
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server that remembers its open connections so :meth:`LocalHub.stop` can close them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: LocalHub):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a handler crash through :mod:`logging` instead of printing a traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            logger.debug("LocalHub: connection from %s ended: %r", client_address, exc)
        else:
            logger.exception("LocalHub: error while serving %s", client_address)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            (self._connections.add if add else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ====================================================================================================
# The public class


class LocalHub:
    """A Hugging Face Hub-compatible server on loopback, storing repos under ``data_dir``.

    Args:
        data_dir: where blobs, commits and refs live; a new hub on the same folder sees all of them.
        host: interface to bind (``"127.0.0.1"``; use ``"0.0.0.0"`` to serve other machines).
        port: TCP port; ``0`` picks a free one (read it back from :attr:`url`).
        tokens: optional write tokens, ``{namespace: token}`` (a token may also be a list of tokens).
            Once a namespace has a token, creating, deleting and committing to its repos need
            ``Authorization: Bearer <token>`` (401 without, 403 with a wrong one) and its private repos
            are visible only with it. Public reads stay open.
        verbose: log one line per request on stderr.
        max_body_bytes: largest request body accepted (413 beyond).

    Example:
        >>> from huggingface_hub import HfApi, hf_hub_download
        >>> with LocalHub(tmp_path, tokens={"org": "secret"}) as hub:
        ...     api = HfApi(endpoint=hub.url, token="secret")
        ...     api.create_repo("org/demo")
        ...     info = api.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="org/demo")
        ...     path = hf_hub_download("org/demo", "a.txt", revision=info.oid, endpoint=hub.url)
    """

    def __init__(
        self,
        data_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, str | Iterable[str]] | None = None,
        *,
        verbose: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.storage = HubStorage(data_dir)
        self.data_dir = self.storage.root
        self.host = host
        self.port = port
        self.verbose = verbose
        self.max_body_bytes = max_body_bytes
        #: The last requests served, as ``(method, raw path, status or None for a dropped one)``.
        self.request_log: deque[tuple[str, str, int | None]] = deque(maxlen=10_000)
        self._tokens = _TokenBook()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._api = _HubApi(self.storage, self._tokens)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        for namespace, token in (tokens or {}).items():
            for one in [token] if isinstance(token, str) else token:
                self.add_token(namespace, one)

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: pass it as ``endpoint=`` or ``HF_ENDPOINT``.

        Raises:
            RuntimeError: before :meth:`start` / :meth:`serve_forever` bound the port.
        """
        if self._server is None:
            raise RuntimeError("LocalHub is not started: call start() first")
        return f"http://{self.host_port}"

    @property
    def host_port(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{host}:{self.port}"

    def _bind(self) -> _Server:
        if self._server is not None:
            raise RuntimeError(f"LocalHub already serving at {self.url}")
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        return self._server

    def start(self) -> LocalHub:
        """Serve in a background daemon thread and return ``self`` (so ``hub = LocalHub(d).start()``)."""
        server = self._bind()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits at most this long for the loop to notice
            name=f"LocalHub:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until Ctrl+C (for the ``moin-hub local-hub`` command)."""
        server = self._bind()
        print(
            f"Local Hub serving {self.data_dir} at {self.url} (Ctrl+C to stop)", file=sys.stderr, flush=True
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._close()

    def stop(self) -> None:
        """Stop serving, close open connections and release the port (safe to call twice)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._close()

    def _close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.server_close()
            server.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server else "not started"
        return f"LocalHub({str(self.data_dir)!r}, {where})"

    # -- direct access (tests) ------------------------------------------------------------------------

    def blob_path(self, repo_id: str, revision: str, path: str, repo_type: str = "model") -> Path:
        """The file on disk that holds ``path`` of ``repo_id`` at ``revision``.

        Meant for tests that simulate a broken or compromised server: blobs are shared by content, so
        overwriting this file changes what every commit holding the same content serves (and the
        served bytes then no longer match their ``ETag``). Restore it afterwards.

        Raises:
            LookupError: the repo, revision or file does not exist.

        Example:
            >>> blob = hub.blob_path("org/demo", "main", "a.txt")
            >>> original = blob.read_bytes()
        """
        namespace, _, name = repo_id.partition("/")
        try:
            commit = self.storage.resolve(RepoKey(repo_type, namespace, name), revision)
        except HubError as exc:
            raise LookupError(exc.message) from None
        if path not in commit.tree:
            raise LookupError(f"No file '{path}' in {repo_type} repo '{repo_id}' at {revision}")
        return self.storage.blob_path(commit.tree[path].oid)

    # -- tokens ---------------------------------------------------------------------------------------

    def add_token(self, namespace: str, token: str) -> None:
        """Require ``token`` (or another token added for it) to write into ``namespace`` from now on.

        Raises:
            ValueError: empty token or invalid namespace.
        """
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"token must be a non-empty string, got {token!r}")
        try:
            check_repo_part(namespace, "namespace")
        except HubError as exc:
            raise ValueError(exc.message) from None
        self._tokens.add(namespace, token)

    # -- faults ---------------------------------------------------------------------------------------

    @property
    def faults(self) -> list[Fault]:
        """The faults still active (a copy)."""
        with self._lock:
            return list(self._faults)

    def inject_fault(
        self,
        method: str | None = None,
        path_regex: str = "",
        kind: str = "status",
        *,
        status: int = 503,
        seconds: float = 0.0,
        times: int | None = 1,
    ) -> Fault:
        """Make the next ``times`` requests matching ``method`` and ``path_regex`` misbehave.

        Args:
            method: ``"GET"``, ``"POST"``... (``None``: any method).
            path_regex: regular expression searched in the raw request target, e.g. ``r"/commit/"``.
            kind: ``"status"`` answers ``status`` with ``{"error": ...}``; ``"delay"`` sleeps
                ``seconds`` and then serves normally; ``"drop"`` closes the connection unanswered;
                ``"drop_after"`` serves the request (a commit lands) and then closes it unanswered.
            times: number of matching requests affected (``None``: until :meth:`clear_faults`).

        Returns:
            The :class:`Fault`; its ``hits`` counts the requests it affected.

        Example:
            >>> hub.inject_fault("POST", r"/commit/", status=503, times=2)  # two 503s, then normal
        """
        fault = Fault(
            kind=kind, method=method, path_regex=path_regex, status=status, seconds=seconds, times=times
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, target):
                    fault.hits += 1
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _record(self, method: str, target: str, status: int | None) -> None:
        self.request_log.append((method, target, status))
