"""Uploads to the local Hub: preupload and the atomic commit endpoint (NDJSON, ``parentCommit``).

Uploads are always "regular" (base64 inside the commit): the server never hands out LFS or Xet uploads, so
nothing leaves the machine, and an ``lfsFile`` line in a commit is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from .cards import validate_card_metadata
from .objects import AddFile, DeleteFile, DeleteFolder, HubError, Operation, RepoKey, check_file_path
from .protocol import _json_reply, _Reply, _Request


class UploadRoutes:
    """The upload routes of :class:`~moin_hub.local_hub.api._HubApi`, which inherits them.

    They use the API's ``storage`` and its auth helpers (``_readable_commit``, ``_require_write``,
    ``_user_name``, ``_repo_url``).
    """

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
