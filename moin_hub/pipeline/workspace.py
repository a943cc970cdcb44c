"""The workspace folder of the MoIN pipeline: what each step writes and the next one reads.

Layout of a workspace::

    moin_workspace.json      base model and embedder (pinned to commits), corpus, clustering parameters
    documents/train.jsonl    training documents with their topic
    documents/heldout.jsonl  held-out documents (other source files): ``topic`` from the whole text,
                             ``routed`` from its first ``query_words`` words, as a query would be routed
    documents/embeddings.safetensors  train, held-out and query embeddings (float32)
    topics/                  the TopicModel: centroids, assignments, keywords, metrics
    experts/<expert_id>/     one trained expert per topic (``topic-00``, ``topic-01``, ...)
    baselines/dense/         the dense baseline: one LoRA on all topics with the experts' total budget
    report.json, plots/      what ``evaluate`` measured (base / routed / oracle / dense, and the routing modes)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file

from .._validators import validate_positive_int
from .._version import __version__
from ..errors import MoinHubError
from ..hub.config import EmbedderSpec, PinnedModel, _Serializable, utc_now
from .io import write_json

WORKSPACE_FILENAME = "moin_workspace.json"
REPORT_FILENAME = "report.json"
EMBEDDINGS_FILENAME = "embeddings.safetensors"
EXPERTS_DIR = "experts"
DENSE_DIR = "baselines"
DENSE_ID = "dense"
#: The shared seed of branch-train (``TrainConfig.seed_fraction > 0``): ``<workspace>/seed``.
SEED_ID = "seed"
#: Words of a held-out document used as its "query" when routing is scored.
DEFAULT_QUERY_WORDS = 32


def topic_expert_id(topic: int) -> str:
    """The expert id of topic ``topic``: ``topic-00``, ``topic-01``, ..."""
    return f"topic-{topic:02d}"


@dataclass(frozen=True)
class Workspace(_Serializable):
    """Contents of ``moin_workspace.json``: what every later step of the pipeline agrees on."""

    _kind: ClassVar[str] = "workspace"

    base_model: PinnedModel = field(metadata={"help": "The frozen base model, pinned to a commit."})
    embedder: EmbedderSpec = field(metadata={"help": "The embedder of documents, centroids and queries."})
    corpus: dict[str, Any] = field(default_factory=dict, metadata={"help": "Where the documents came from."})
    clustering: dict[str, Any] = field(default_factory=dict, metadata={"help": "k, method, seed, metrics."})
    query_words: int = field(default=DEFAULT_QUERY_WORDS,
                             metadata={"help": "Words of a held-out document routed as its query."})
    created_by: str = field(default=f"moin-hub {__version__}", metadata={"help": "Producer and version."})
    created_at: str = field(default_factory=utc_now, metadata={"help": "ISO-8601 UTC creation time."})

    def __post_init__(self) -> None:
        if isinstance(self.base_model, dict):
            object.__setattr__(self, "base_model", PinnedModel.from_dict(self.base_model))
        if isinstance(self.embedder, dict):
            object.__setattr__(self, "embedder", EmbedderSpec.from_dict(self.embedder))
        validate_positive_int(self.query_words, field="query_words")

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> Workspace:
        """Read ``<workdir>/moin_workspace.json``.

        Raises:
            MoinHubError: the folder is not a workspace made by ``moin-hub cluster``.
        """
        path = Path(workdir) / WORKSPACE_FILENAME
        if not path.is_file():
            raise MoinHubError(f"{workdir} is not a moin-hub workspace (no {WORKSPACE_FILENAME}).",
                               hint="Run `moin-hub cluster --out DIR` first.")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as err:
            raise MoinHubError(f"{path} is not a valid workspace file: {err}") from None

    def save(self, workdir: str | os.PathLike) -> Path:
        path = Path(workdir) / WORKSPACE_FILENAME
        write_json(path, self.to_dict())
        return path


# --------------------------------------------------------------------------------------------- helpers


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise MoinHubError(f"{path} is missing: the workspace is incomplete.",
                           hint="Run `moin-hub cluster` again into this folder.")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def query_of(text: str, words: int) -> str:
    """The first ``words`` words of ``text``: what a user's query about this document might look like."""
    return " ".join(text.split()[:words])


def read_embeddings(workdir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The embeddings written by :func:`cluster`: ``train``, ``heldout`` and ``queries`` (held-out prefixes)."""
    return load_file(str(Path(workdir) / "documents" / EMBEDDINGS_FILENAME))
