"""Split a corpus into semantic topics: embed, cluster, name the topics, score them.

This is the first step of MoIN (Mixture of Introvert Experts, arXiv 2410.09687): every document is
embedded, the embeddings are split into topics, one LoRA expert is later trained per topic, and a
query is routed to the expert whose topic centroid is nearest by cosine similarity.

Two ways to split, as in the paper:

- ``method="kmeans"`` (MoIN-5k): spherical k-means from faiss, ``k`` topics, deterministic for a seed.
- ``method="hdbscan"`` (MoIN-500): a linear PCA to 10 dimensions, then scikit-learn's HDBSCAN, which
  picks the number of topics itself. (The paper and BERTopic reduce with UMAP; moin-hub uses PCA, which
  scikit-learn already ships, so there is no extra dependency and no untested path.)

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

import inspect
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import faiss
import numpy as np
from scipy import sparse
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm

from .._validators import validate_positive_int
from ..errors import EmbedderMismatchError
from .topics import METHODS, TopicModel

REDUCERS = ("pca", "none")
#: Dimensions HDBSCAN sees after the PCA reduction.
PCA_DIM = 10
#: HDBSCAN's default smallest topic: BERTopic's ``min_topic_size``.
DEFAULT_MIN_CLUSTER_SIZE = 10
#: Tokens c-TF-IDF keeps: 3 or more letters (no digits, no underscores), lowercased.
TOKEN_PATTERN = r"(?u)\b[^\W\d_]{3,}\b"


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
                       reducer: str = "pca") -> TopicModel:
    """Split document embeddings into topics.

    ``"kmeans"``: faiss spherical k-means (cosine) with ``niter`` Lloyd iterations, restarted ``nredo``
    times from ``k`` randomly drawn documents (the run with the best k-means objective wins),
    deterministic for a ``seed``; every document then goes to its nearest centroid. Topics left empty
    are dropped, so fewer than ``k`` may come back (only with duplicate or degenerate embeddings).

    ``"hdbscan"``: the embeddings are reduced (``reducer``: ``"pca"`` to 10-d, or ``"none"``), then clustered by
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
        reducer: the reduction before HDBSCAN, ``"pca"`` or ``"none"``; ignored by k-means.

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
    n_docs, dim = vectors.shape
    target = min(PCA_DIM, n_docs - 1)
    if reducer == "none" or target < 1 or target >= dim:
        return vectors, "none"
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
