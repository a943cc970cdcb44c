"""The registry's embedder, downloaded at its pinned commit and loaded safely.

Only safetensors weights and plain config/tokenizer files are downloaded (never pickles, never remote
code); loaded embedders are cached per (endpoint, repo, commit).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from huggingface_hub import snapshot_download

from ..errors import EmbedderMismatchError, MoinHubError
from .client import resolve_endpoint
from .config import EmbedderSpec
from .expert import refuse_pickles
from .retry import retry_transient

#: Files fetched for an embedder or a base model: configs, tokenizers, safetensors weights.
SAFE_MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def download_model_dir(repo_id: str, revision: str, *, endpoint: str | None = None,
                       token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path:
    """Download the safe files of a model repo at ``revision`` and return the local folder.

    Raises:
        UnsafeFileError: never raised for skipped pickles; they are simply not downloaded.
        MoinHubError: the repo has no safetensors weights at that revision.
    """
    folder = Path(retry_transient(lambda: snapshot_download(
        repo_id, revision=revision, endpoint=resolve_endpoint(endpoint), token=token, cache_dir=cache_dir,
        allow_patterns=list(SAFE_MODEL_PATTERNS), library_name="moin-hub",
    ), what=f"the download of {repo_id}@{revision[:12]}"))
    names = [p.name for p in folder.rglob("*")]
    refuse_pickles(names, where=f"{repo_id}@{revision[:12]}")
    if not any(name.endswith(".safetensors") for name in names):
        raise MoinHubError(
            f"{repo_id}@{revision[:12]} has no safetensors weights; moin-hub never loads pickled weights.",
            hint="Convert the model with `save_pretrained(..., safe_serialization=True)` and push it again.",
        )
    return folder


class Embedder:
    """A sentence embedder producing L2-normalised float32 vectors.

    Args:
        model: a ``SentenceTransformer`` (or anything with a compatible ``encode``).
        dim: the dimension its vectors must have.
    """

    def __init__(self, model, dim: int):  # noqa: ANN001 - SentenceTransformer is imported lazily
        self.model = model
        self.dim = dim
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Embed ``texts`` into a ``(len(texts), dim)`` float32 array of unit vectors."""
        with self._lock:
            vectors = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=show_progress)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise EmbedderMismatchError(expected=self.dim, actual=vectors.shape[-1], what="embedding")
        return vectors


def load_sentence_transformer(folder: str | Path):  # noqa: ANN201
    """Load a sentence-transformers folder on CPU with safetensors only and no remote code."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", trust_remote_code=False, local_files_only=True,
                               model_kwargs={"use_safetensors": True})


def embedding_dimension(model) -> int:  # noqa: ANN001
    """Output dimension of a SentenceTransformer (the method was renamed in sentence-transformers 6)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


@functools.lru_cache(maxsize=4)
def _load_cached(endpoint: str, repo_id: str, revision: str, dim: int, token: str | bool | None) -> Embedder:
    folder = download_model_dir(repo_id, revision, endpoint=endpoint, token=token)
    model = load_sentence_transformer(folder)
    actual = embedding_dimension(model)
    if actual != dim:
        raise EmbedderMismatchError(expected=dim, actual=actual, what=f"embedder {repo_id!r} output")
    return Embedder(model, dim)


def load_embedder(spec: EmbedderSpec, *, endpoint: str | None = None, token: str | bool | None = None) -> Embedder:
    """Download (once) and load the embedder of a registry, pinned to its commit.

    Raises:
        EmbedderMismatchError: the model's output dimension differs from the registry's.
    """
    return _load_cached(resolve_endpoint(endpoint), spec.repo_id, spec.revision, spec.dim, token)
