"""The local Hub's HTTP API: the routes of the Hub that ``huggingface_hub`` uses, and who may write where.

:class:`_HubApi` dispatches each :class:`~moin_hub.local_hub.protocol._Request` to its route handler: repo
create/delete/settings, info and listing with tag filters, tree, paths-info, refs, commits, branches and tags,
``whoami-v2``, ``validate-yaml`` and ``resolve`` downloads. Preupload and the commit endpoint are in
:mod:`moin_hub.local_hub.uploads`.
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from .cards import derive_tags, parse_front_matter, validate_card_metadata
from .objects import (
    REPO_TYPES,
    Commit,
    HubError,
    RepoKey,
    TreeEntry,
    check_file_path,
    check_repo_part,
    folder_oid,
)
from .protocol import _TRUE, _json_reply, _parse_range, _Reply, _Request, _split_revision, _whole_revision
from .storage import HubStorage
from .uploads import UploadRoutes

_PLURAL_TO_TYPE = {f"{t}s": t for t in REPO_TYPES}


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


class _HubApi(UploadRoutes):
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
