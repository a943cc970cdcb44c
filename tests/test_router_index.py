"""The router's index: exact below a size threshold, calibrated IVF above, cached per registry commit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from moin_hub import Registry, Router
from moin_hub.hub import router as router_mod
from moin_hub.hub.config import EmbedderSpec, ExpertRecord, PinnedModel, RegistryManifest
from moin_hub.hub.router import ExpertIndex, build_index, registry_index, resolve_index_kind, valid_hits

DIM = 32
ENDPOINT = "http://127.0.0.1:9"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, *, dim: int = DIM, clusters: int = 60, spread: float = 0.7,
              seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, like topic centroids of related subjects."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, dim)))
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return unit(centres[rng.integers(0, clusters, n)] + noise)


def make_registry(vectors: np.ndarray, *, revision: str = "a" * 40,
                  registry_id: str = "test-org/index") -> Registry:
    manifest = RegistryManifest(base_model=PinnedModel("org/base", "b" * 40),
                                embedder=EmbedderSpec("org/emb", "c" * 40, dim=vectors.shape[1]))
    records = [ExpertRecord(expert_id=f"e{i:05d}", repo_id=f"test-org/e{i:05d}", revision="d" * 40,
                            centroid=v) for i, v in enumerate(vectors)]
    return Registry(registry_id, revision, manifest, records, endpoint=ENDPOINT)


@pytest.fixture(autouse=True)
def fresh_cache():
    router_mod.clear_index_cache()
    yield
    router_mod.clear_index_cache()


def test_auto_is_exact_below_the_threshold_and_approximate_from_it_on():
    vectors = clustered(400)
    assert build_index(vectors[:399], threshold=400).kind == "flat"
    approx = build_index(vectors, threshold=400)
    assert approx.kind == "ivf" and not approx.exact
    assert 1 <= approx.nprobe <= approx.nlist and approx.calibration_recall >= 0.99
    assert build_index(vectors, kind="flat", threshold=10).kind == "flat"
    assert build_index(vectors[:50], kind="ivf").kind == "ivf"
    assert Router(make_registry(vectors), index_threshold=400).index.kind == "ivf"
    assert Router(make_registry(vectors[:399], revision="e" * 40), index_threshold=400).index.kind == "flat"
    assert Router(make_registry(vectors[:10], revision="f" * 40)).index.kind == "flat"  # default threshold


def test_approximate_recall_at_1_against_exact_search():
    vectors = clustered(3000, dim=64, clusters=100)
    index = build_index(vectors, kind="ivf", seed=0)
    rng = np.random.default_rng(1)
    own = rng.integers(0, len(vectors), 500)
    scale = rng.uniform(0.5, 3.0, (500, 1)).astype(np.float32)  # query-to-expert cosine ~0.3 to ~0.9
    queries = unit(vectors[own] + scale * rng.standard_normal((500, 64)).astype(np.float32) / 8)
    exact = np.argmax(queries @ vectors.T, axis=1)
    approx = np.array([index.search(q, 1)[0][0] for q in queries])
    assert index.nprobe < index.nlist  # really approximate
    assert float(np.mean(approx == exact)) >= 0.99


def test_flat_search_is_exact_and_sorted():
    vectors = clustered(200)
    index = build_index(vectors)
    query = unit(np.random.default_rng(3).standard_normal((1, DIM)))[0]
    hits = index.search(query, 5)
    expected = np.argsort(-(vectors @ query))[:5]
    assert [row for row, _ in hits] == expected.tolist()
    assert [sim for _, sim in hits] == sorted((sim for _, sim in hits), reverse=True)


def test_index_is_reused_for_the_same_commit_and_rebuilt_for_a_new_one(monkeypatch):
    vectors = clustered(50)
    first = Router(make_registry(vectors))
    again = Router(make_registry(vectors))  # a fresh Registry object at the same commit
    assert again.index is first.index
    assert Router(make_registry(vectors), index="flat").index is first.index  # "auto" resolved to flat
    assert Router(make_registry(vectors), index="ivf").index is not first.index
    moved = Router(make_registry(vectors[:40], revision="9" * 40))
    assert moved.index is not first.index and moved.index.size == 40
    other = Router(make_registry(vectors, registry_id="test-org/other"))
    assert other.index is not first.index
    not_pinned = make_registry(vectors, revision="main")  # not a commit sha: never cached
    assert registry_index(not_pinned) is not registry_index(not_pinned)


def test_cache_is_a_bounded_lru(monkeypatch):
    monkeypatch.setattr(router_mod, "INDEX_CACHE_SIZE", 2)
    vectors = clustered(20)
    a, b, c = (make_registry(vectors, revision=ch * 40) for ch in "abc")
    index_a = registry_index(a)
    registry_index(b)
    assert registry_index(a) is index_a  # a is now the most recently used
    registry_index(c)  # evicts b
    assert registry_index(a) is index_a
    assert len(router_mod._INDEX_CACHE) == 2


def test_concurrent_routers_build_one_index(monkeypatch):
    calls = []
    real = router_mod.build_index

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(router_mod, "build_index", counting)
    registry = make_registry(clustered(300))
    barrier = threading.Barrier(8)
    found = []

    def worker():
        barrier.wait()
        found.append(registry_index(registry, kind="ivf"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(index) for index in found}) == 1


def test_minus_one_ids_are_dropped():
    assert valid_hits(np.array([0.9, 0.4, -3.4e38], dtype=np.float32), np.array([7, 2, -1])) == [
        (7, pytest.approx(0.9)), (2, pytest.approx(0.4))]
    vectors = clustered(500)
    index = build_index(vectors, kind="ivf")
    index.index.nprobe = 1  # one cell holds far fewer than 100 vectors: faiss pads with -1
    sims, ids = index.index.search(vectors[:1], 100)
    assert (ids == -1).any()
    hits = index.search(vectors[0], 100)  # dropped, then searched again over every cell
    rows = [row for row, _ in hits]
    assert len(rows) == 100 == len(set(rows)) and min(rows) >= 0 and rows[0] == 0


def test_router_drops_minus_one_ids_and_numbers_ranks_densely():
    registry = make_registry(clustered(5))

    class Padded:
        def search(self, query, k):  # a faiss-like index that pads its answer with -1
            return np.array([[0.9, -3.4e38, 0.5]], dtype=np.float32), np.array([[3, -1, 1]])

    router = Router(registry)
    object.__setattr__(router.index, "index", Padded())  # swap the faiss object in place
    result = router.route_vector(registry.experts[3].centroid, k=3)
    assert [(r.expert.expert_id, r.rank) for r in result.routes] == [("e00003", 0), ("e00001", 1)]


def test_k_larger_than_the_number_of_experts():
    vectors = clustered(5)
    registry = make_registry(vectors)
    for kind in ("flat", "ivf"):
        router_mod.clear_index_cache()
        result = Router(registry, index=kind).route_vector(vectors[2], k=50)
        assert len(result.routes) == 5 and result.best.expert.expert_id == "e00002"
        assert [r.rank for r in result.routes] == list(range(5))
        assert result.best.similarity == pytest.approx(1.0, abs=1e-5)


def test_bad_index_settings_are_refused():
    vectors = clustered(10)
    with pytest.raises(ValueError, match="index kind must be one of auto, flat, ivf, got 'hnsw'"):
        Router(make_registry(vectors), index="hnsw")
    with pytest.raises(ValueError, match="threshold must be a positive integer"):
        resolve_index_kind("auto", 10, threshold=0)
    with pytest.raises(ValueError, match="non-empty"):
        build_index(np.zeros((0, DIM), dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        build_index(np.full((3, DIM), np.nan, dtype=np.float32))
    assert isinstance(build_index(vectors), ExpertIndex)
