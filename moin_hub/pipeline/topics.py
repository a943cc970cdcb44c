"""The topics of a corpus, as the clustering step found them and saves them: :class:`TopicModel`.

A saved topic model is a folder: ``topics.json`` (method, parameters, sizes, keywords, metrics),
``centroids.safetensors`` (float32[k, dim]) and ``assignments.json`` (each document's topic). It is made by
:mod:`moin_hub.pipeline.cluster` and read by the later steps of the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .._version import __version__
from ..errors import InvalidTopicModelError, UnsafeFileError
from .io import write_json

METHODS = ("kmeans", "hdbscan")
TOPICS_FILENAME = "topics.json"
CENTROIDS_FILENAME = "centroids.safetensors"
ASSIGNMENTS_FILENAME = "assignments.json"
TOPICS_FORMAT_NAME = "moin-topics"
TOPICS_FORMAT_VERSION = 1


@dataclass
class TopicModel:
    """Topics found in a corpus: who belongs where, the centroids to route by, and their names.

    Topics are numbered ``0 .. k-1`` by descending size. Construct one with
    :func:`~moin_hub.pipeline.cluster.cluster_embeddings` or :func:`~moin_hub.pipeline.cluster.cluster_documents`;
    persist it with :meth:`save` / :meth:`load`.

    Example:
        >>> topics = cluster_embeddings(vectors, k=8)  # doctest: +SKIP
        >>> topics.sizes, topics.centroids.shape  # doctest: +SKIP
        ([412, 380, ...], (8, 384))
    """

    assignments: np.ndarray = field(
        metadata={"help": "int64[n_docs]: the topic of each document; -1 = noise (HDBSCAN only)."})
    centroids: np.ndarray = field(
        metadata={"help": "float32[k, dim]: re-normalised mean of each topic's unit member embeddings."})
    sizes: list[int] = field(
        metadata={"help": "documents each topic trains on (noise included), descending."})
    keywords: list[list[str]] = field(
        default_factory=list, metadata={"help": "c-TF-IDF keywords per topic; empty if not computed."})
    method: str = field(
        default="kmeans", metadata={"help": f"the clustering method, one of {METHODS}."})
    params: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "the parameters the topics were found with (JSON values)."})
    metrics: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "noise_fraction, routing_agreement; purity, nmi, adjusted_rand given labels."})
    training_assignments: np.ndarray | None = field(
        default=None,
        metadata={"help": "int64[n_docs]: assignments with each noise document moved to its nearest "
                          "centroid; defaults to `assignments` when there is no noise."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2 or self.centroids.shape[0] < 1 or not np.all(np.isfinite(self.centroids)):
            raise ValueError(f"centroids must be a finite (k, dim) array, got shape {self.centroids.shape}.")
        k = self.num_topics
        self.assignments = _topic_ids(self.assignments, k, field="assignments", allow_noise=True)
        if self.training_assignments is None:
            if self.noise_mask.any():
                raise ValueError("training_assignments is required when assignments hold noise (-1).")
            self.training_assignments = self.assignments.copy()
        self.training_assignments = _topic_ids(self.training_assignments, k, field="training_assignments")
        if len(self.training_assignments) != len(self.assignments):
            raise ValueError(f"training_assignments has {len(self.training_assignments)} entries, "
                             f"assignments has {len(self.assignments)}.")
        self.sizes = [int(size) for size in self.sizes]
        counted = np.bincount(self.training_assignments, minlength=k).tolist()
        if self.sizes != counted:
            raise ValueError(f"sizes={self.sizes} do not count training_assignments per topic ({counted}).")
        self.keywords = [[str(word) for word in words] for words in self.keywords]
        if len(self.keywords) not in (0, k):
            raise ValueError(f"keywords has {len(self.keywords)} lists for {k} topics.")

    @property
    def num_topics(self) -> int:
        """The number of topics ``k``."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """The embedding dimension of the centroids."""
        return int(self.centroids.shape[1])

    @property
    def noise_mask(self) -> np.ndarray:
        """``bool[n_docs]``: the documents the clusterer left unclustered."""
        return self.assignments < 0

    def save(self, folder: str | Path) -> Path:
        """Write the topics to ``folder`` (created if needed).

        Writes ``topics.json`` (method, params, sizes, keywords, metrics, moin-hub version),
        ``centroids.safetensors`` (tensor ``"centroids"``) and ``assignments.json``.

        Args:
            folder: the folder to write into; existing files of the same names are replaced.

        Returns:
            The folder as a :class:`~pathlib.Path`.

        Example:
            >>> TopicModel.load(topics.save("topics/")).sizes == topics.sizes  # doctest: +SKIP
            True
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": self.centroids}, str(folder / CENTROIDS_FILENAME),
                  metadata={"format": TOPICS_FORMAT_NAME})
        manifest = {
            "format": TOPICS_FORMAT_NAME, "format_version": TOPICS_FORMAT_VERSION,
            "created_by": f"moin-hub {__version__}", "moin_hub_version": __version__,
            "method": self.method, "params": self.params, "num_topics": self.num_topics, "dim": self.dim,
            "sizes": self.sizes, "keywords": self.keywords, "metrics": self.metrics,
        }
        write_json(folder / TOPICS_FILENAME, manifest)
        write_json(folder / ASSIGNMENTS_FILENAME, {
            "assignments": self.assignments.tolist(),
            "training_assignments": self.training_assignments.tolist(),
        })
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TopicModel:
        """Read topics written by :meth:`save`; arrays are only ever read from safetensors.

        Args:
            folder: a folder holding ``topics.json``, ``centroids.safetensors`` and ``assignments.json``.

        Returns:
            The :class:`TopicModel`.

        Raises:
            FileNotFoundError: ``folder`` does not exist.
            UnsafeFileError: the centroids come in another format (``.npy``, ``.pt``, a pickle ...).
            InvalidTopicModelError: a file is missing, malformed, or disagrees with the others.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"Topic model folder {str(folder)!r} does not exist.")
        manifest = _read_json(folder, TOPICS_FILENAME)
        if manifest.get("format_version") != TOPICS_FORMAT_VERSION:
            raise InvalidTopicModelError(str(folder), f"unsupported format_version "
                                                      f"{manifest.get('format_version')!r}")
        assigned = _read_json(folder, ASSIGNMENTS_FILENAME)
        centroids = _read_centroids(folder)
        try:
            return cls(assignments=assigned["assignments"], centroids=centroids, sizes=manifest["sizes"],
                       keywords=manifest.get("keywords", []), method=manifest["method"],
                       params=manifest.get("params", {}), metrics=manifest.get("metrics", {}),
                       training_assignments=assigned.get("training_assignments"))
        except KeyError as err:
            raise InvalidTopicModelError(str(folder), f"missing field {err}") from None
        except (TypeError, ValueError) as err:  # __post_init__ found the files disagree
            raise InvalidTopicModelError(str(folder), str(err)) from None


def _topic_ids(values: Any, k: int, *, field: str, allow_noise: bool = False) -> np.ndarray:
    """Check a per-document topic id array (ints in ``[0, k)``, or ``-1`` if ``allow_noise``)."""
    ids = np.asarray(values)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{field} must be a 1-d array of ints, got dtype {ids.dtype} and shape {ids.shape}.")
    ids = ids.astype(np.int64)
    low = -1 if allow_noise else 0
    if ids.size and (ids.min() < low or ids.max() >= k):
        raise ValueError(f"{field} must hold topic ids in [{low}, {k - 1}], got {ids.min()} .. {ids.max()}.")
    return ids


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    """Read a JSON object from ``folder/name``, raising :class:`InvalidTopicModelError` if it cannot."""
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidTopicModelError(str(folder), f"{name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidTopicModelError(str(folder), f"{name} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidTopicModelError(str(folder), f"{name} must hold a JSON object")
    return data


def _read_centroids(folder: Path) -> np.ndarray:
    """Read tensor ``"centroids"`` of ``centroids.safetensors``; refuse any other array format."""
    path = folder / CENTROIDS_FILENAME
    if not path.is_file():
        others = sorted(p.name for p in folder.glob("centroids.*"))
        if others:
            raise UnsafeFileError(str(folder / others[0]),
                                  f"topic centroids are only read from {CENTROIDS_FILENAME}")
        raise InvalidTopicModelError(str(folder), f"{CENTROIDS_FILENAME} is missing")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if "centroids" not in handle.keys():
                raise InvalidTopicModelError(str(folder), f"{CENTROIDS_FILENAME} has no tensor 'centroids'")
            return handle.get_tensor("centroids")
    except SafetensorError as err:
        reason = f"{CENTROIDS_FILENAME} is not a safetensors file: {err}"
        raise InvalidTopicModelError(str(folder), reason) from None
