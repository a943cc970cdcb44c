"""The one place that turns `endpoint` / `token` settings into Hub client calls.

The endpoint is configuration and nothing else: an explicit ``endpoint=`` argument wins, then the
``HF_ENDPOINT`` environment variable *as it is now* (huggingface_hub reads it once at import), then the
client's default (huggingface.co). Production code never knows whether it talks to the real Hub or to
:class:`moin_hub.LocalHub`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

__all__ = [
    "EntryNotFoundError",
    "HfHubHTTPError",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "download_file",
    "get_api",
    "http_status",
    "resolve_endpoint",
    "sha256_file",
]


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint to use: ``endpoint``, else ``$HF_ENDPOINT``, else the client's default."""
    value = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return value.rstrip("/")


def get_api(endpoint: str | None = None, token: str | bool | None = None) -> HfApi:
    """An :class:`HfApi` bound to the resolved endpoint (``token=None`` lets the client find one)."""
    return HfApi(endpoint=resolve_endpoint(endpoint), token=token, library_name="moin-hub")


def download_file(repo_id: str, filename: str, *, revision: str, repo_type: str = "model",
                  endpoint: str | None = None, token: str | bool | None = None,
                  local_dir: str | Path | None = None, force_download: bool = False) -> Path:
    """Download one file with the standard HF cache (or into ``local_dir``) and return its path."""
    path = hf_hub_download(
        repo_id, filename, revision=revision, repo_type=repo_type, endpoint=resolve_endpoint(endpoint),
        token=token, local_dir=local_dir, force_download=force_download, library_name="moin-hub",
    )
    return Path(path)


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a Hub client error, or None."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def sha256_file(path: str | Path, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
