"""Split a corpus into semantic topics: embed, cluster, name the topics, score them.

This is the first step of MoIN (Mixture of Introvert Experts, arXiv 2410.09687): every document is
embedded, the embeddings are split into topics, one LoRA expert is later trained per topic, and a
query is routed to the expert whose topic centroid is nearest by cosine similarity.

Two ways to split, as in the paper:

- ``method="kmeans"`` (MoIN-5k): spherical k-means from faiss, ``k`` topics, deterministic for a seed.
- ``method="hdbscan"`` (MoIN-500): a reduction to a few dimensions (UMAP if ``umap-learn`` is
  installed, else PCA), then scikit-learn's HDBSCAN, which picks the number of topics itself.

HDBSCAN leaves some documents unclustered ("noise", label ``-1``). An expert must still be trained on
every document, so each noise document is *also* given the topic of its nearest centroid:
:attr:`TopicModel.assignments` keeps the ``-1`` (what the clusterer found),
:attr:`TopicModel.training_assignments` holds the topic each document trains (never ``-1``), and
``metrics["noise_fraction"]`` reports how many documents were reassigned. Centroids are computed from
the clustered documents only, so noise does not pull them.

Example:
    >>> from sentence_transformers import SentenceTransformer  # doctest: +SKIP
    >>> topics = cluster_documents(texts, SentenceTransformer(path), k=8)  # doctest: +SKIP
    >>> topics.save("topics/")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from scipy import sparse
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm

from .._validators import validate_positive_int
from .._version import __version__
from ..errors import EmbedderMismatchError, InvalidTopicModelError, UnsafeFileError
from .io import write_json

METHODS = ("kmeans", "hdbscan")
REDUCERS = ("auto", "umap", "pca", "none")
TOPICS_FILENAME = "topics.json"
CENTROIDS_FILENAME = "centroids.safetensors"
ASSIGNMENTS_FILENAME = "assignments.json"
TOPICS_FORMAT_NAME = "moin-topics"
TOPICS_FORMAT_VERSION = 1
#: Dimensions HDBSCAN sees after reduction: BERTopic's UMAP default, and about 10 for linear PCA.
UMAP_DIM = 5
PCA_DIM = 10
#: HDBSCAN's default smallest topic: BERTopic's ``min_topic_size``.
DEFAULT_MIN_CLUSTER_SIZE = 10
#: Tokens c-TF-IDF keeps: 3 or more letters (no digits, no underscores), lowercased.
TOKEN_PATTERN = r"(?u)\b[^\W\d_]{3,}\b"


# --------------------------------------------------------------------------------------------- topics


@dataclass
class TopicModel:
    """Topics found in a corpus: who belongs where, the centroids to route by, and their names.

    Topics are numbered ``0 .. k-1`` by descending size. Construct one with :func:`cluster_embeddings`
    or :func:`cluster_documents`; persist it with :meth:`save` / :meth:`load`.

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


# ------------------------------------------------------------------------------------------- embedding


def embed_texts(model: Any, texts: Sequence[str], *, batch_size: int = 64,
                show_progress: bool = True) -> np.ndarray:
    """Embed ``texts`` into L2-normalised float32 rows, with a progress bar.

    Texts are encoded longest first, so each batch pads little, and returned in their original order.

    Args:
        model: a ``SentenceTransformer``, or any object with ``encode(list[str]) -> array``; keyword
            arguments ``batch_size``, ``show_progress_bar`` and ``convert_to_numpy`` are passed when its
            ``encode`` accepts them.
        texts: the documents, a sequence of strings (not one string).
        batch_size: texts per ``encode`` call.
        show_progress: show a tqdm bar counting texts.

    Returns:
        ``float32[len(texts), dim]`` with unit-length rows.

    Raises:
        ValueError: ``texts`` is empty, a single string, or holds a non-string; ``batch_size`` < 1; an
            embedding is not finite or is all zeros.

    Example:
        >>> vectors = embed_texts(SentenceTransformer(path), ["a cake recipe", "a goal"])  # doctest: +SKIP
        >>> vectors.shape, vectors.dtype  # doctest: +SKIP
        ((2, 384), dtype('float32'))
    """
    texts = _check_texts(texts)
    validate_positive_int(batch_size, field="batch_size")
    order = np.argsort([-len(text) for text in texts], kind="stable")
    kwargs = _encode_kwargs(model.encode, batch_size)
    chunks = []
    with tqdm(total=len(texts), desc="Embedding", unit="text", disable=not show_progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            chunks.append(_encode_batch(model, batch, kwargs))
            bar.update(len(batch))
    vectors = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
    vectors[order] = np.concatenate(chunks)
    return _unit_rows(vectors, field="embeddings")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a sequence of strings, got {type(texts).__name__}.")
    if len(texts) == 0:
        raise ValueError("texts is empty: give at least one document.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}.")
    return list(texts)


def _encode_kwargs(encode: Any, batch_size: int) -> dict[str, Any]:
    """The keyword arguments among batch size / no inner progress bar / numpy output that ``encode`` takes."""
    wanted = {"batch_size": batch_size, "show_progress_bar": False, "convert_to_numpy": True}
    try:
        accepted = inspect.signature(encode).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it plainly
        return {}
    return {name: value for name, value in wanted.items() if name in accepted}


def _encode_batch(model: Any, batch: list[str], kwargs: dict[str, Any]) -> np.ndarray:
    vectors = model.encode(batch, **kwargs)
    if hasattr(vectors, "detach"):  # a torch tensor
        vectors = vectors.detach().cpu().numpy()
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(batch):
        raise ValueError(f"model.encode returned shape {vectors.shape} for {len(batch)} texts; "
                         "expected (n_texts, dim).")
    return vectors


def _unit_rows(array: Any, *, field: str) -> np.ndarray:
    """``array`` as contiguous float32 ``(n, dim)`` rows of unit length.

    Raises:
        ValueError: naming ``field`` if it is not 2-d and non-empty, holds NaN/inf, or has an all-zero row.
    """
    rows = np.asarray(array, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{field} must be a non-empty (n, dim) array, got shape {rows.shape}.")
    if not np.all(np.isfinite(rows)):
        bad = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise ValueError(f"{field} must be finite; row {bad} holds NaN or inf.")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if not np.all(norms > 0):
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"{field} row {bad} is all zeros: it has no direction.")
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


# ------------------------------------------------------------------------------------------ clustering


def cluster_embeddings(embeddings: np.ndarray, *, k: int = 8, method: str = "kmeans", seed: int = 0,
                       min_cluster_size: int | None = None, niter: int = 25, nredo: int = 10,
                       reducer: str = "auto") -> TopicModel:
    """Split document embeddings into topics.

    ``"kmeans"``: faiss spherical k-means (cosine) with ``niter`` Lloyd iterations, restarted ``nredo``
    times from ``k`` randomly drawn documents (the run with the best k-means objective wins),
    deterministic for a ``seed``; every document then goes to its nearest centroid. Topics left empty
    are dropped, so fewer than ``k`` may come back (only with duplicate or degenerate embeddings).

    ``"hdbscan"``: the embeddings are reduced (``reducer``: ``"umap"`` to 5-d, ``"pca"`` to 10-d,
    ``"none"``, or ``"auto"`` = UMAP if ``umap-learn`` is installed, else PCA), then clustered by
    scikit-learn's HDBSCAN, which picks the number of topics itself: ``k`` is ignored. Noise documents
    keep ``-1`` in ``assignments`` and go to their nearest centroid in ``training_assignments`` (see the
    module doc).

    In both cases centroids are the re-normalised means of the member embeddings, topics are renumbered
    by descending size, and ``metrics`` holds ``noise_fraction`` and ``routing_agreement`` (the share of
    documents whose nearest centroid is their own topic, i.e. where a router would send them).

    Args:
        embeddings: ``(n_docs, dim)`` document embeddings; rows are L2-normalised here.
        k: the number of k-means topics, 1 .. n_docs.
        method: ``"kmeans"`` (MoIN-5k) or ``"hdbscan"`` (MoIN-500).
        seed: random seed of k-means and of the reduction.
        min_cluster_size: HDBSCAN's smallest topic, 2 .. n_docs; default 10 (BERTopic's
            ``min_topic_size``). Ignored by k-means.
        niter: k-means iterations per run.
        nredo: k-means runs; the time grows with it, so lower it for very large ``k * n_docs``.
        reducer: the reduction before HDBSCAN; ignored by k-means.

    Returns:
        A :class:`TopicModel` without keywords (see :func:`cluster_documents`).

    Raises:
        ValueError: bad ``k`` (< 1 or more than the documents), ``method``, ``reducer``, ``niter``,
            ``nredo`` or ``min_cluster_size``; embeddings not finite or with an all-zero row; HDBSCAN
            found no topic.

    Example:
        >>> topics = cluster_embeddings(vectors, k=8, seed=0)  # doctest: +SKIP
        >>> topics.num_topics, topics.metrics["noise_fraction"]  # doctest: +SKIP
        (8, 0.0)
    """
    vectors = _unit_rows(embeddings, field="embeddings")
    seed = int(seed)
    if method == "kmeans":
        labels, params = _kmeans_labels(vectors, k=k, seed=seed, niter=niter, nredo=nredo)
    elif method == "hdbscan":
        labels, params = _hdbscan_labels(vectors, seed=seed, min_cluster_size=min_cluster_size,
                                         reducer=reducer)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    params = {"n_docs": len(vectors), "dim": int(vectors.shape[1]), **params}
    return _topic_model(vectors, labels, method=method, params=params)


def _kmeans_labels(vectors: np.ndarray, *, k: int, seed: int, niter: int,
                   nredo: int) -> tuple[np.ndarray, dict[str, Any]]:
    validate_positive_int(k, field="k")
    if k > len(vectors):
        raise ValueError(f"k={k} is more than the {len(vectors)} documents: give at most that many topics.")
    validate_positive_int(niter, field="niter")
    validate_positive_int(nredo, field="nredo")
    # min_points_per_centroid=1: k <= n_docs is checked above, and faiss's "too few points" warning is noise.
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1)
    kmeans.train(vectors)
    labels, _ = _search(vectors, _unit_rows(kmeans.centroids, field="k-means centroids"))
    return labels, {"k": k, "seed": seed, "niter": niter, "nredo": nredo}


def _hdbscan_labels(vectors: np.ndarray, *, seed: int, min_cluster_size: int | None,
                    reducer: str) -> tuple[np.ndarray, dict[str, Any]]:
    if min_cluster_size is None:
        min_cluster_size = DEFAULT_MIN_CLUSTER_SIZE
    if validate_positive_int(min_cluster_size, field="min_cluster_size") < 2:
        raise ValueError(f"min_cluster_size must be at least 2, got {min_cluster_size}.")
    if min_cluster_size > len(vectors):
        raise ValueError(f"min_cluster_size={min_cluster_size} is more than the {len(vectors)} documents.")
    reduced, reduction = _reduce(vectors, seed=seed, reducer=reducer)
    labels = HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(reduced)
    params = {"seed": seed, "min_cluster_size": min_cluster_size, "reduction": reduction,
              "reduced_dim": int(reduced.shape[1])}
    return labels.astype(np.int64), params


def _reduce(vectors: np.ndarray, *, seed: int, reducer: str) -> tuple[np.ndarray, str]:
    """Reduce embeddings for HDBSCAN; returns the reduced rows and the reducer actually used."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}.")
    if reducer == "auto":
        reducer = "umap" if importlib.util.find_spec("umap") is not None else "pca"
    n_docs, dim = vectors.shape
    target = min(UMAP_DIM if reducer == "umap" else PCA_DIM, n_docs - 1)
    if reducer == "none" or target < 1 or target >= dim:
        return vectors, "none"
    if reducer == "umap":
        import umap  # optional dependency: pip install umap-learn

        model = umap.UMAP(n_components=target, n_neighbors=min(15, n_docs - 1), min_dist=0.0, metric="cosine",
                          random_state=seed)
    else:
        model = PCA(n_components=target, random_state=seed)
    return np.ascontiguousarray(model.fit_transform(vectors), dtype=np.float32), reducer


def _topic_model(vectors: np.ndarray, labels: np.ndarray, *, method: str,
                 params: dict[str, Any]) -> TopicModel:
    """Turn raw cluster labels (gaps allowed, -1 = noise) into a :class:`TopicModel` numbered by size."""
    labels = _drop_empty(labels)
    k = int(labels.max()) + 1
    if k == 0:
        raise ValueError(f"{method} put every document in noise; lower min_cluster_size "
                         f"(was {params.get('min_cluster_size')}) or use method='kmeans'.")
    centroids = _member_means(vectors, labels, k)
    noise = labels < 0
    training = labels.copy()
    if noise.any():
        training[noise] = _search(vectors[noise], centroids)[0]
    sizes = np.bincount(training, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    new_id = np.empty(k, dtype=np.int64)
    new_id[order] = np.arange(k)
    training = new_id[training]
    centroids = centroids[order]
    routed, _ = _search(vectors, centroids)
    metrics = {"noise_fraction": float(noise.mean()), "routing_agreement": float(np.mean(routed == training))}
    return TopicModel(assignments=np.where(noise, -1, new_id[np.maximum(labels, 0)]), centroids=centroids,
                      sizes=sizes[order].tolist(), method=method, params=params, metrics=metrics,
                      training_assignments=training)


def _drop_empty(labels: np.ndarray) -> np.ndarray:
    """Renumber the used topic ids to ``0 .. m-1`` in their order; ``-1`` stays ``-1``."""
    labels = np.asarray(labels, dtype=np.int64)
    used = np.unique(labels[labels >= 0])
    compact = np.full(labels.shape, -1, dtype=np.int64)
    member = labels >= 0
    compact[member] = np.searchsorted(used, labels[member])
    return compact


def _member_means(vectors: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Re-normalised mean of each topic's member rows (noise rows excluded)."""
    member = labels >= 0
    sums = np.zeros((k, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, labels[member], vectors[member])
    return _unit_rows(sums, field="centroids")


def _search(queries: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product of already-normalised float32 rows."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    sims, ids = index.search(queries, 1)
    return ids[:, 0].astype(np.int64), sims[:, 0]


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Route embeddings to their nearest centroid by cosine similarity (faiss ``IndexFlatIP``).

    Args:
        embeddings: ``(n, dim)`` rows, or one ``(dim,)`` vector; normalised here.
        centroids: ``(k, dim)`` topic centroids; normalised here.

    Returns:
        ``(ids, sims)``: ``int64[n]`` the nearest topic of each row, ``float32[n]`` its cosine similarity.

    Raises:
        EmbedderMismatchError: the two dimensions differ.
        ValueError: an input is empty, not finite, or has an all-zero row.

    Example:
        >>> ids, sims = nearest_centroid(embed_texts(model, ["a query"]), topics.centroids)  # doctest: +SKIP
        >>> (ids == topics.training_assignments).mean()  # routing accuracy on documents  # doctest: +SKIP
    """
    queries = _unit_rows(np.atleast_2d(embeddings), field="embeddings")
    centers = _unit_rows(centroids, field="centroids")
    if queries.shape[1] != centers.shape[1]:
        raise EmbedderMismatchError(expected=centers.shape[1], actual=queries.shape[1], what="embedding")
    return _search(queries, centers)


# -------------------------------------------------------------------------------------------- keywords


def ctfidf_keywords(texts: Sequence[str], assignments: Sequence[int] | np.ndarray, *,
                    top_n: int = 10) -> list[list[str]]:
    """Name each topic by its class-based TF-IDF keywords, as BERTopic does.

    The documents of a topic form one class document. ``tf`` is a term's count in the class divided by
    the class's word count; ``idf = log(1 + A / f)`` where ``A`` is the average word count per class and
    ``f`` the term's count over all classes. Tokens are lowercased words of 3+ letters; scikit-learn's
    English stop words are removed. Documents labelled ``-1`` (noise) are left out.

    Args:
        texts: the documents.
        assignments: the topic id of each document (``0 .. k-1``, or ``-1``).
        top_n: keywords per topic.

    Returns:
        One list per topic ``0 .. max(assignments)``, best first (ties alphabetical); a topic with no
        usable word gets ``[]``.

    Raises:
        ValueError: lengths differ, ids below -1, or ``top_n`` < 1.

    Example:
        >>> ctfidf_keywords(["bake bread", "oven bread", "goal scored"], [0, 0, 1], top_n=2)
        [['bread', 'bake'], ['goal', 'scored']]
    """
    texts = _check_texts(texts)
    labels = np.asarray(assignments, dtype=np.int64)
    if labels.shape != (len(texts),) or (labels.size and labels.min() < -1):
        raise ValueError(f"assignments must be {len(texts)} topic ids >= -1, got shape {labels.shape}.")
    validate_positive_int(top_n, field="top_n")
    k = int(labels.max()) + 1
    counts, vocabulary = _class_term_counts(texts, labels, k)
    if counts is None:
        return [[] for _ in range(k)]
    scores = _ctfidf(counts)
    return [_top_terms(scores[topic], vocabulary, top_n) for topic in range(k)]


def _class_term_counts(texts: list[str], labels: np.ndarray,
                       k: int) -> tuple[sparse.csr_matrix | None, np.ndarray]:
    """``(k, vocabulary)`` term counts per topic (noise excluded), or ``None`` if no word survives."""
    member = np.flatnonzero(labels >= 0)
    vectorizer = CountVectorizer(lowercase=True, stop_words="english", token_pattern=TOKEN_PATTERN)
    try:
        doc_terms = vectorizer.fit_transform([texts[i] for i in member])
    except ValueError:  # empty vocabulary: only stop words, short tokens or no member documents
        return None, np.empty(0, dtype=object)
    membership = sparse.csr_matrix((np.ones(len(member)), (labels[member], np.arange(len(member)))),
                                   shape=(k, len(member)))
    return (membership @ doc_terms).tocsr(), vectorizer.get_feature_names_out()


def _ctfidf(counts: sparse.csr_matrix) -> sparse.csr_matrix:
    """c-TF-IDF weights of ``(classes, terms)`` counts (BERTopic's ``ClassTfidfTransformer``)."""
    counts = counts.astype(np.float64)
    term_totals = np.asarray(counts.sum(axis=0)).ravel()
    average_words = counts.sum() / counts.shape[0]
    idf = np.log1p(average_words / term_totals)
    return (normalize(counts, norm="l1", axis=1) @ sparse.diags(idf)).tocsr()


def _top_terms(row: sparse.csr_matrix, vocabulary: np.ndarray, top_n: int) -> list[str]:
    terms = vocabulary[row.indices]
    best = np.lexsort((terms, -row.data))[:top_n]
    return [str(term) for term in terms[best]]


# ----------------------------------------------------------------------------------------- evaluation


def score_against_labels(assignments: Sequence[int] | np.ndarray, labels: Sequence[Any]) -> dict[str, float]:
    """Compare topics with known labels (genres, sources ...).

    Args:
        assignments: the topic of each document (``-1`` counts as one more cluster).
        labels: the true label of each document (ints or strings).

    Returns:
        ``{"purity", "nmi", "adjusted_rand"}``: purity is the share of documents whose topic's majority
        label is their own; NMI is scikit-learn's ``normalized_mutual_info_score``; ARI its
        ``adjusted_rand_score``.

    Raises:
        ValueError: the two are empty or differ in length.

    Example:
        >>> score_against_labels([0, 0, 1, 1], ["a", "b", "b", "b"])["purity"]
        0.75
    """
    predicted = np.asarray(assignments)
    truth = np.asarray(labels)
    if predicted.ndim != 1 or predicted.shape != truth.shape or predicted.size == 0:
        raise ValueError(f"assignments and labels must be 1-d of the same non-zero length, got "
                         f"{predicted.shape} and {truth.shape}.")
    table = contingency_matrix(truth, predicted)
    return {
        "purity": float(table.max(axis=0).sum() / predicted.size),
        "nmi": float(normalized_mutual_info_score(truth, predicted)),
        "adjusted_rand": float(adjusted_rand_score(truth, predicted)),
    }


def project_2d(embeddings: np.ndarray, centroids: np.ndarray, *,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project documents and centroids to 2-d by PCA fitted on the documents, for a plot.

    Args:
        embeddings: ``(n_docs, dim)`` document embeddings, n_docs >= 2 and dim >= 2; normalised here.
        centroids: ``(k, dim)`` topic centroids; normalised here.
        seed: PCA's random state (used by its randomised solver on large inputs).

    Returns:
        ``(doc_xy, centroid_xy)``: ``float32[n_docs, 2]`` and ``float32[k, 2]`` in the same plane.

    Raises:
        EmbedderMismatchError: the two dimensions differ.
        ValueError: fewer than 2 documents or dimensions.

    Example:
        >>> doc_xy, centroid_xy = project_2d(vectors, topics.centroids)  # doctest: +SKIP
    """
    docs = _unit_rows(embeddings, field="embeddings")
    centers = _unit_rows(centroids, field="centroids")
    if docs.shape[1] != centers.shape[1]:
        raise EmbedderMismatchError(expected=docs.shape[1], actual=centers.shape[1], what="centroid")
    if min(docs.shape) < 2:
        raise ValueError(f"project_2d needs at least 2 documents of at least 2 dimensions, got {docs.shape}.")
    pca = PCA(n_components=2, random_state=seed).fit(docs)
    return pca.transform(docs).astype(np.float32), pca.transform(centers).astype(np.float32)


# ------------------------------------------------------------------------------------------ end to end


def cluster_documents(texts: Sequence[str], model: Any, *, k: int = 8, method: str = "kmeans", seed: int = 0,
                      labels: Sequence[Any] | None = None, top_n: int = 10, batch_size: int = 64,
                      min_cluster_size: int | None = None, show_progress: bool = True,
                      embeddings: np.ndarray | None = None) -> TopicModel:
    """Embed documents, split them into topics, name the topics, and score them against labels.

    Args:
        texts: the documents.
        model: the embedder (see :func:`embed_texts`).
        k, method, seed, min_cluster_size: as in :func:`cluster_embeddings`.
        labels: optional true label per document; adds purity / nmi / adjusted_rand to ``metrics``
            (computed on ``training_assignments``, so HDBSCAN noise counts in the topic it trains).
        top_n: c-TF-IDF keywords per topic.
        batch_size, show_progress: as in :func:`embed_texts`.
        embeddings: the texts' embeddings if already computed (``model`` is then not used).

    Returns:
        A :class:`TopicModel` with keywords (and label metrics if ``labels`` was given).

    Raises:
        ValueError: as :func:`embed_texts` and :func:`cluster_embeddings`, or ``labels`` of another length
            (checked before embedding).

    Example:
        >>> topics = cluster_documents(texts, SentenceTransformer(path), k=3, labels=genres)  # doctest: +SKIP
        >>> topics.metrics["purity"], topics.keywords[0][:3]  # doctest: +SKIP
        (0.97, ['oven', 'bake', 'flour'])
    """
    texts = _check_texts(texts)
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"labels has {len(labels)} entries for {len(texts)} texts.")
    if embeddings is None:
        vectors = embed_texts(model, texts, batch_size=batch_size, show_progress=show_progress)
    else:
        vectors = _unit_rows(embeddings, field="embeddings")
        if len(vectors) != len(texts):
            raise ValueError(f"embeddings has {len(vectors)} rows for {len(texts)} texts.")
    topics = cluster_embeddings(vectors, k=k, method=method, seed=seed, min_cluster_size=min_cluster_size)
    keywords = ctfidf_keywords(texts, topics.training_assignments, top_n=top_n)
    metrics = dict(topics.metrics)
    if labels is not None:
        metrics.update(score_against_labels(topics.training_assignments, labels))
    return replace(topics, keywords=keywords, metrics=metrics)
