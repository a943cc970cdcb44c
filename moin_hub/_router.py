"""Route a whole query to the nearest expert centroid (cosine similarity, faiss inner product).

This is the MoIN router: one embedding per query, one nearest-centroid search, no learned gate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ._config import ExpertRecord
from ._embed import Embedder, load_embedder
from ._registry import Registry
from ._validators import validate_positive_int, validate_query, validate_vector
from .errors import ExpertNotFoundError


@dataclass(frozen=True)
class Route:
    """One candidate expert for a query."""

    expert: ExpertRecord
    similarity: float
    rank: int

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "expert_id": self.expert.expert_id,
            "repo_id": self.expert.repo_id,
            "revision": self.expert.revision,
            "similarity": round(self.similarity, 6),
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


def build_index(centroids: np.ndarray):  # noqa: ANN201 - faiss.Index
    """An exact inner-product faiss index over L2-normalised centroids."""
    import faiss

    vectors = np.ascontiguousarray(centroids, dtype=np.float32).copy()
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


class Router:
    """Nearest-centroid router over a registry.

    Args:
        registry: the loaded registry (its commit pins experts and centroids).
        embedder: the query embedder; loaded from the registry's pinned embedder when omitted.

    Example:
        >>> router = Router(Registry.load("acme/moin-registry"))  # doctest: +SKIP
        >>> router.route("How do I proof bread dough?").best.expert.expert_id  # doctest: +SKIP
        'topic-02'
    """

    def __init__(self, registry: Registry, embedder: Embedder | None = None):
        self.registry = registry
        self._embedder = embedder
        self._index = build_index(registry.centroids()) if len(registry) else None

    @classmethod
    def from_registry(cls, registry_id: str, *, revision: str | None = None, endpoint: str | None = None,
                      token: str | bool | None = None) -> Router:
        """Load a registry and build its router."""
        return cls(Registry.load(registry_id, revision=revision, endpoint=endpoint, token=token))

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
        """Route an already embedded query vector (normalised here)."""
        validate_positive_int(k, field="k")
        self._require_experts()
        query = validate_vector(vector, dim=self.registry.manifest.embedder.dim, field="query vector")
        query = (query / np.linalg.norm(query)).reshape(1, -1)
        start = time.perf_counter()
        sims, ids = self._index.search(query, min(k, len(self.registry)))
        search_ms = (time.perf_counter() - start) * 1000
        routes = tuple(
            Route(self.registry.experts[int(i)], float(s), rank)
            for rank, (i, s) in enumerate(zip(ids[0], sims[0], strict=True)) if i >= 0
        )
        return RouteResult("", routes, 0.0, search_ms, self.registry.revision)

    def _require_experts(self) -> None:
        if self._index is None:
            raise ExpertNotFoundError("any expert", registry_id=self.registry.registry_id,
                                      reason="the registry is empty; push an expert first")
