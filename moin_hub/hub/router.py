"""Route a whole query to the nearest expert centroid (cosine similarity, faiss inner product).

This is the MoIN router: one embedding per query, one nearest-centroid search, no learned gate.
Small registries are searched exactly (``IndexFlatIP``); from :data:`DEFAULT_APPROX_THRESHOLD` experts on,
an IVF index whose ``nprobe`` is calibrated to recall@1 >= 0.995 against exact search. Indexes are built
once per registry commit and kept in a small LRU (:func:`registry_index`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validators import is_commit_sha, validate_positive_int, validate_query, validate_vector
from ..errors import ExpertNotFoundError
from .cells import calibration_queries
from .config import ExpertRecord
from .embed import Embedder, load_embedder
from .registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One candidate expert for a query."""

    expert: ExpertRecord
    similarity: float
    rank: int

    @property
    def score(self) -> float | None:
        """The calibrated score: the similarity as a z-score against the expert's own documents
        (``(similarity - sim_mean) / sim_std``), or None when its row has no statistics."""
        return self.expert.calibrated(self.similarity)

    def clears(self, threshold: float | None) -> bool:
        """True when ``threshold`` is None or this route reaches it: its calibrated :attr:`score` where the
        expert's row has similarity statistics, else its cosine similarity."""
        if threshold is None:
            return True
        score = self.score
        return (self.similarity if score is None else score) >= threshold

    def to_dict(self) -> dict[str, object]:
        score = self.score
        return {
            "rank": self.rank,
            "expert_id": self.expert.expert_id,
            "repo_id": self.expert.repo_id,
            "revision": self.expert.revision,
            "similarity": round(self.similarity, 6),
            "score": None if score is None else round(score, 6),
            "keywords": list(self.expert.keywords),
        }


@dataclass(frozen=True)
class RouteResult:
    """The routes of a query, best first, and where the time went."""

    query: str
    routes: tuple[Route, ...]
    embed_ms: float = 0.0
    search_ms: float = 0.0
    registry_revision: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def best(self) -> Route:
        """The chosen expert (rank 0)."""
        return self.routes[0]

    def to_dict(self) -> dict[str, object]:
        return {
            "query": self.query,
            "expert": self.best.to_dict() if self.routes else None,
            "runner_ups": [route.to_dict() for route in self.routes[1:]],
            "embed_ms": round(self.embed_ms, 3),
            "search_ms": round(self.search_ms, 3),
            "registry_revision": self.registry_revision,
        }


#: Index kinds: ``"auto"`` picks ``"flat"`` (exact) below the threshold and ``"ivf"`` (approximate) above.
INDEX_KINDS = ("auto", "flat", "ivf")
#: Registries with at least this many experts get an approximate index under ``kind="auto"``.
DEFAULT_APPROX_THRESHOLD = 10_000
#: Recall@1 against exact search that the IVF ``nprobe`` is calibrated to reach when the index is built.
CALIBRATION_RECALL = 0.995
#: How many built indexes the module keeps (LRU), keyed by (endpoint, registry, commit, size, kind).
INDEX_CACHE_SIZE = 4

_CALIBRATION_QUERIES = 384
_MIN_NPROBE = 16


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a contiguous float32 copy with L2-normalised rows."""
    import faiss

    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(out)
    return out


def resolve_index_kind(kind: str, n_experts: int, *, threshold: int = DEFAULT_APPROX_THRESHOLD) -> str:
    """The concrete index kind (``"flat"`` or ``"ivf"``) for ``kind`` over ``n_experts`` centroids.

    Args:
        kind: one of :data:`INDEX_KINDS`.
        n_experts: how many centroids the index will hold.
        threshold: under ``"auto"``, registries of at least this many experts get ``"ivf"``.

    Raises:
        ValueError: an unknown ``kind`` or a non-positive ``threshold``.

    Example:
        >>> resolve_index_kind("auto", 500), resolve_index_kind("auto", 50_000)
        ('flat', 'ivf')
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {kind!r}.")
    validate_positive_int(threshold, field="threshold")
    if kind == "auto":
        return "ivf" if n_experts >= threshold else "flat"
    return kind


@dataclass(frozen=True)
class ExpertIndex:
    """A faiss inner-product index over L2-normalised expert centroids, and how it was built.

    Searching is thread-safe: the index is never changed after :func:`build_index` returns (the wider
    retry below passes its ``nprobe`` per call instead of setting it on the index).
    """

    index: Any = field(repr=False, metadata={"help": "The faiss index (IndexFlatIP or IndexIVFFlat)."})
    kind: str = field(metadata={"help": "'flat' (exact) or 'ivf' (approximate)."})
    size: int = field(metadata={"help": "Number of centroids (row i of the registry is id i)."})
    dim: int = field(metadata={"help": "Vector dimension."})
    nlist: int = field(default=0, metadata={"help": "IVF: number of inverted lists (k-means cells)."})
    nprobe: int = field(default=0, metadata={"help": "IVF: cells searched per query (calibrated)."})
    calibration_recall: float = field(default=1.0, metadata={"help": "IVF: recall@1 vs exact at build."})
    build_seconds: float = field(default=0.0, metadata={"help": "Wall time of the build."})

    @property
    def exact(self) -> bool:
        """True for an exact (flat) index."""
        return self.kind == "flat"

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``min(k, size)`` nearest centroids of one unit query as ``[(row, similarity)]``, best first.

        An approximate index can find fewer than ``k`` centroids in the cells it probes (faiss pads its
        answer with id -1); those are dropped, and if too few remain the query is searched again over
        every cell (exact for IVF-Flat).
        """
        k = min(k, self.size)
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        sims, ids = self.index.search(query, k)
        hits = valid_hits(sims[0], ids[0])
        if len(hits) < k and self.kind == "ivf":
            import faiss

            sims, ids = self.index.search(query, k, params=faiss.SearchParametersIVF(nprobe=self.nlist))
            hits = valid_hits(sims[0], ids[0])
        return hits


def valid_hits(sims: np.ndarray, ids: np.ndarray) -> list[tuple[int, float]]:
    """Pair faiss ids and similarities, dropping the -1 ids faiss pads a short answer with.

    Example:
        >>> valid_hits(np.array([0.9, 0.5, -3.4e38]), np.array([4, 1, -1]))
        [(4, 0.9), (1, 0.5)]
    """
    return [(int(i), float(s)) for i, s in zip(ids, sims, strict=True) if i >= 0]


def _ivf_nlist(n: int) -> int:
    """Cells for IVF over ``n`` vectors: about 4 sqrt(n), with at least 39 training points per cell."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _calibrate_nprobe(ivf: Any, vectors: np.ndarray, nlist: int, *, target: float,
                      seed: int) -> tuple[int, float]:
    """The smallest ``nprobe`` (16, 32, 64, ... up to ``nlist``) reaching recall@1 >= ``target`` vs exact.

    The ladder starts at 16 cells, not 1, as headroom over the calibration sample.

    A hit is an answer as similar as the exact best (ties between equal centroids count as hits).
    """
    import faiss

    queries = calibration_queries(vectors, seed=seed, count=_CALIBRATION_QUERIES)
    exact, _ = faiss.knn(queries, vectors, 1, metric=faiss.METRIC_INNER_PRODUCT)
    nprobe = min(_MIN_NPROBE, nlist)
    while True:
        ivf.nprobe = nprobe
        sims, _ = ivf.search(queries, 1)
        recall = float(np.mean(sims[:, 0] >= exact[:, 0] - 1e-5))
        if recall >= target or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, nlist)


def build_index(centroids: np.ndarray, *, kind: str = "auto", threshold: int = DEFAULT_APPROX_THRESHOLD,
                target_recall: float = CALIBRATION_RECALL, seed: int = 0) -> ExpertIndex:
    """A faiss inner-product index over the L2-normalised ``centroids`` (row i gets id i).

    ``"flat"`` is ``IndexFlatIP``: exact, no build cost, search time linear in the number of experts.
    ``"ivf"`` is ``IndexIVFFlat``: k-means into about 4 sqrt(n) cells, and each query searches the
    ``nprobe`` cells nearest to it. ``nprobe`` is calibrated at build time: the smallest of 16, 32, 64, ...
    whose recall@1 against exact search reaches ``target_recall`` on queries made from the registry's own
    centroids plus noise (cosine 0.3 to 0.7 to their centroid). The build is deterministic for a ``seed``.

    Args:
        centroids: ``(n_experts, dim)`` vectors (normalised here; the input is not changed).
        kind: ``"auto"`` (flat below ``threshold`` experts, ivf from it on), ``"flat"`` or ``"ivf"``.
        threshold: the ``"auto"`` switch-over size.
        target_recall: recall@1 the ivf calibration aims for.
        seed: seed of the calibration queries.

    Returns:
        An :class:`ExpertIndex`.

    Raises:
        ValueError: an unknown ``kind``, an empty or non-2-d ``centroids``, or non-finite values.

    Example:
        >>> index = build_index(np.eye(4, dtype=np.float32))
        >>> index.kind, index.search(np.array([0, 1, 0, 0], dtype=np.float32), k=2)[0]
        ('flat', (1, 1.0))
    """
    import faiss

    vectors = np.asarray(centroids, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise ValueError(f"centroids must be a non-empty (n_experts, dim) array, got shape {vectors.shape}.")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("centroids must be finite; found NaN or inf.")
    resolved = resolve_index_kind(kind, vectors.shape[0], threshold=threshold)
    start = time.perf_counter()
    vectors = _unit_rows(vectors)
    n, dim = vectors.shape
    if resolved == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return ExpertIndex(index, "flat", n, dim, build_seconds=time.perf_counter() - start)
    nlist = _ivf_nlist(n)
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.train(vectors)
    ivf.add(vectors)
    nprobe, recall = _calibrate_nprobe(ivf, vectors, nlist, target=target_recall, seed=seed)
    return ExpertIndex(ivf, "ivf", n, dim, nlist=nlist, nprobe=nprobe, calibration_recall=recall,
                       build_seconds=time.perf_counter() - start)


_INDEX_CACHE: OrderedDict[tuple[str, str, str, int, str], ExpertIndex] = OrderedDict()
_INDEX_BUILDING: dict[tuple[str, str, str, int, str], threading.Lock] = {}
_INDEX_LOCK = threading.Lock()


def registry_index(registry: Registry, *, kind: str = "auto",
                   threshold: int = DEFAULT_APPROX_THRESHOLD) -> ExpertIndex:
    """The index of ``registry``, built once per registry commit and kept in a small LRU.

    The cache key is (endpoint, registry id, commit sha, number of experts, resolved kind): a commit never
    changes, so a Router made again for the same commit (a Space refresh, another ``pull``) reuses the
    index, and a new commit builds a new one. A registry whose revision is not a full commit sha is never
    cached. Concurrent callers for the same key wait for one build.

    Raises:
        ValueError: an unknown ``kind`` or an empty registry.
    """
    resolved = resolve_index_kind(kind, len(registry), threshold=threshold)
    if not is_commit_sha(registry.revision):
        return build_index(registry.centroids(), kind=resolved)
    key = (registry.endpoint, registry.registry_id, registry.revision, len(registry), resolved)
    with _INDEX_LOCK:
        if key in _INDEX_CACHE:
            _INDEX_CACHE.move_to_end(key)
            return _INDEX_CACHE[key]
        build_lock = _INDEX_BUILDING.setdefault(key, threading.Lock())
    with build_lock:
        with _INDEX_LOCK:
            if key in _INDEX_CACHE:
                _INDEX_CACHE.move_to_end(key)
                return _INDEX_CACHE[key]
        try:
            index = build_index(registry.centroids(), kind=resolved)
        except BaseException:
            with _INDEX_LOCK:
                _INDEX_BUILDING.pop(key, None)
            raise
        with _INDEX_LOCK:
            _INDEX_CACHE[key] = index
            while len(_INDEX_CACHE) > INDEX_CACHE_SIZE:
                _INDEX_CACHE.popitem(last=False)
            _INDEX_BUILDING.pop(key, None)
    logger.info("Built a %s index over %d experts of %s@%s in %.2f s.", index.kind, index.size,
                registry.registry_id, registry.revision[:12], index.build_seconds)
    return index


def clear_index_cache() -> None:
    """Forget every cached index (they are rebuilt on next use)."""
    with _INDEX_LOCK:
        _INDEX_CACHE.clear()


class Router:
    """Nearest-centroid router over a registry.

    Args:
        registry: the loaded registry (its commit pins experts and centroids).
        embedder: the query embedder; loaded from the registry's pinned embedder when omitted.
        index: ``"auto"`` (exact below ``index_threshold`` experts, approximate IVF from it on), ``"flat"``
            (always exact) or ``"ivf"`` (always approximate). Built once per registry commit and cached.
            Under ``"auto"``, a compacted v2 registry of at least ``index_threshold`` experts loaded with
            ``lazy=True`` (as :meth:`from_registry` does) is searched through its cells instead
            (:class:`~moin_hub.hub.partial.PartialIndex`): only the coarse file and the probed cells are
            downloaded.
        index_threshold: the ``"auto"`` switch-over size.
        nprobe: cells searched per query by the partial index (default: the one calibrated at compaction).

    Raises:
        ValueError: an unknown ``index`` kind or a non-positive ``index_threshold``.

    Example:
        >>> router = Router(Registry.load("acme/moin-registry"))  # doctest: +SKIP
        >>> router.route("How do I proof bread dough?").best.expert.expert_id  # doctest: +SKIP
        'topic-02'
    """

    def __init__(self, registry: Registry, embedder: Embedder | None = None, *, index: str = "auto",
                 index_threshold: int = DEFAULT_APPROX_THRESHOLD, nprobe: int | None = None):
        from .partial import PartialIndex

        self.registry = registry
        self._embedder = embedder
        resolve_index_kind(index, len(registry), threshold=index_threshold)  # fail early on a bad kind
        self._partial = (PartialIndex.open(registry, nprobe=nprobe)
                         if index == "auto" and not registry.loaded and len(registry) >= index_threshold else None)
        self._index = (registry_index(registry, kind=index, threshold=index_threshold)
                       if self._partial is None and len(registry) else None)

    @classmethod
    def from_registry(cls, registry_id: str, *, revision: str | None = None, endpoint: str | None = None,
                      token: str | bool | None = None, index: str = "auto",
                      index_threshold: int = DEFAULT_APPROX_THRESHOLD, nprobe: int | None = None) -> Router:
        """Load a registry (lazily) and build its router (see :class:`Router` for the other arguments)."""
        return cls(Registry.load(registry_id, revision=revision, endpoint=endpoint, token=token, lazy=True),
                   index=index, index_threshold=index_threshold, nprobe=nprobe)

    @property
    def index(self) -> Any:
        """The search index: an :class:`ExpertIndex`, a partial (cells) index, or ``None`` when empty."""
        return self._partial if self._partial is not None else self._index

    @property
    def embedder(self) -> Embedder:
        """The registry's embedder (downloaded and loaded on first use)."""
        if self._embedder is None:
            self._embedder = load_embedder(self.registry.manifest.embedder, endpoint=self.registry.endpoint,
                                           token=self.registry.token)
        return self._embedder

    def route(self, query: str, *, k: int = 3) -> RouteResult:
        """Route ``query`` and return the ``k`` nearest experts, best first.

        Raises:
            EmptyQueryError: the query is empty.
            ExpertNotFoundError: the registry has no experts.
        """
        text = validate_query(query)
        self._require_experts()
        start = time.perf_counter()
        vector = self.embedder.encode([text])[0]
        embed_ms = (time.perf_counter() - start) * 1000
        result = self.route_vector(vector, k=k)
        return RouteResult(text, result.routes, embed_ms, result.search_ms, self.registry.revision)

    def route_vector(self, vector: np.ndarray, *, k: int = 3) -> RouteResult:
        """Route an already embedded query vector (normalised here) to its ``k`` nearest experts.

        At most ``len(registry)`` routes come back, whatever ``k`` is.

        Raises:
            ValueError: ``k`` is not a positive integer, or the vector is not finite or all zeros.
            EmbedderMismatchError: the vector's dimension is not the registry embedder's.
            ExpertNotFoundError: the registry has no experts.
        """
        validate_positive_int(k, field="k")
        self._require_experts()
        query = validate_vector(vector, dim=self.registry.manifest.embedder.dim, field="query vector")
        query = query / np.linalg.norm(query)
        start = time.perf_counter()
        if self._partial is not None:
            found = self._partial.search(query, k)
        else:
            found = [(self.registry.experts[row], sim) for row, sim in self._index.search(query, k)]
        search_ms = (time.perf_counter() - start) * 1000
        routes = tuple(Route(record, sim, rank) for rank, (record, sim) in enumerate(found))
        return RouteResult("", routes, 0.0, search_ms, self.registry.revision)

    def _require_experts(self) -> None:
        if self._index is None and self._partial is None:
            raise ExpertNotFoundError("any expert", registry_id=self.registry.registry_id,
                                      reason="the registry is empty; push an expert first")
