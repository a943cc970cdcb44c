"""Topic discovery: k-means / HDBSCAN on synthetic blobs, c-TF-IDF, scores, persistence, real embedder."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
from safetensors import safe_open

from moin_hub.errors import EmbedderMismatchError, InvalidTopicModelError, MoinHubError, UnsafeFileError
from moin_hub.pipeline.cluster import (
    _topic_model,
    cluster_documents,
    cluster_embeddings,
    ctfidf_keywords,
    embed_texts,
    nearest_centroid,
    project_2d,
    score_against_labels,
)
from moin_hub.pipeline.topics import TopicModel

TOPIC_SENTENCES = {
    "cooking": [
        "Knead the bread dough for ten minutes and let it rise in a warm kitchen.",
        "Simmer the tomato sauce with garlic, basil and olive oil for an hour.",
        "Preheat the oven before baking the chocolate cake.",
        "Season the roast chicken with salt, pepper and fresh rosemary.",
        "Whisk the eggs and sugar until the batter turns pale and fluffy.",
        "Chop the onions finely and fry them in butter until golden.",
        "This soup recipe needs carrots, celery, lentils and a bay leaf.",
        "Slice the vegetables thinly for a quick stir fry in the wok.",
        "Let the pastry rest in the fridge before rolling it out.",
        "Grill the salmon fillets and serve them with lemon and dill.",
    ],
    "football": [
        "The striker scored a stunning goal in the final minute of the match.",
        "The goalkeeper saved a penalty kick to keep his team in the cup.",
        "The referee showed a red card after a dangerous tackle.",
        "Both teams fought hard in midfield, but the game ended goalless.",
        "The coach changed his formation at half time and the team won the league.",
        "Fans sang in the stadium as their club lifted the championship trophy.",
        "The winger crossed the ball and the defender headed it clear.",
        "The transfer window closed with the club signing a new centre back.",
        "An offside flag ruled out the equaliser in the derby.",
        "The national squad trained on the pitch before the World Cup qualifier.",
    ],
    "astronomy": [
        "The telescope captured a distant spiral galaxy billions of light years away.",
        "Jupiter's moons orbit the giant planet in a few days each.",
        "A supernova explosion can briefly outshine an entire galaxy.",
        "Astronomers discovered an exoplanet orbiting in its star's habitable zone.",
        "The comet's tail always points away from the Sun.",
        "Black holes bend light so strongly that nothing escapes their horizon.",
        "The Andromeda galaxy is on a collision course with the Milky Way.",
        "Saturn's rings are made of ice and rock particles.",
        "A solar eclipse happens when the Moon passes between the Earth and the Sun.",
        "Neutron stars spin hundreds of times per second and emit radio pulses.",
    ],
}


def make_blobs(k: int = 4, per_blob: int = 40, dim: int = 32, spread: float = 0.05,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated gaussian blobs on the unit sphere: ``(unit rows, true labels)``."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), per_blob)
    points = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    points = np.random.default_rng(seed).normal(size=(n, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


class FakeEncoder:
    """An embedder stand-in: a vector from each text's length and vowels; records every batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def encode(self, texts, batch_size=32, show_progress_bar=None):  # noqa: ANN001, ANN201
        self.batches.append(list(texts))
        return np.array([[len(t), sum(c in "aeiou" for c in t), 1.0] for t in texts]) * 3.0


# ---------------------------------------------------------------------------------------- k-means


def test_kmeans_recovers_blobs():
    vectors, truth = make_blobs()
    topics = cluster_embeddings(vectors, k=4, seed=0)
    scores = score_against_labels(topics.assignments, truth)
    assert scores == pytest.approx({"purity": 1.0, "nmi": 1.0, "adjusted_rand": 1.0})
    assert topics.num_topics == 4 and topics.dim == 32 and topics.method == "kmeans"
    assert topics.sizes == [40, 40, 40, 40] and topics.assignments.dtype == np.int64
    assert topics.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(topics.centroids, axis=1), 1.0, rtol=1e-5)
    assert topics.metrics == {"noise_fraction": 0.0, "routing_agreement": 1.0}
    assert topics.params == {"n_docs": 160, "dim": 32, "k": 4, "seed": 0, "niter": 25, "nredo": 10}
    np.testing.assert_array_equal(topics.training_assignments, topics.assignments)
    ids, sims = nearest_centroid(vectors, topics.centroids)
    np.testing.assert_array_equal(ids, topics.assignments)
    assert sims.min() > 0.8


def test_kmeans_is_deterministic_for_a_seed():
    vectors, _ = make_blobs(k=6, per_blob=15, spread=0.3, seed=1)  # overlapping: the seed matters
    first = cluster_embeddings(vectors, k=6, seed=7)
    again = cluster_embeddings(vectors, k=6, seed=7)
    np.testing.assert_array_equal(first.assignments, again.assignments)
    np.testing.assert_array_equal(first.centroids, again.centroids)


def test_topics_are_numbered_by_size_and_empty_ids_dropped():
    vectors = random_unit(7, 8, seed=0)
    topics = _topic_model(vectors, np.array([5, 5, 2, 2, 2, 9, 5]), method="kmeans", params={})
    # ids 0, 1, 3, 4, 6, 7, 8 are empty; 5 and 2 tie at 3 members (first id wins), 9 has one.
    np.testing.assert_array_equal(topics.assignments, [1, 1, 0, 0, 0, 2, 1])
    assert topics.sizes == [3, 3, 1]
    expected = vectors[[2, 3, 4]].mean(axis=0)
    np.testing.assert_allclose(topics.centroids[0], expected / np.linalg.norm(expected), rtol=1e-5)


def test_kmeans_drops_topics_left_empty_by_duplicates():
    vectors = np.repeat(np.eye(3, 8, dtype=np.float32), [6, 4, 2], axis=0)  # 3 distinct points, 12 rows
    topics = cluster_embeddings(vectors, k=6, seed=0)
    assert topics.num_topics == 3 and topics.sizes == [6, 4, 2]
    np.testing.assert_array_equal(topics.assignments, np.repeat([0, 1, 2], [6, 4, 2]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0}, "k must be a positive integer"),
    ({"k": -2}, "k must be a positive integer"),
    ({"k": 2.5}, "k must be a positive integer"),
    ({"k": 11}, "k=11 is more than the 10 documents"),
    ({"method": "spectral"}, "method must be one of"),
    ({"niter": 0}, "niter"),
    ({"nredo": 0}, "nredo"),
    ({"method": "hdbscan", "min_cluster_size": 1}, "min_cluster_size must be at least 2"),
    ({"method": "hdbscan", "reducer": "tsne"}, "reducer must be one of"),
])
def test_bad_arguments_are_clear_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster_embeddings(random_unit(10, 4, seed=0), **{"k": 2, **kwargs})


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        cluster_embeddings(np.zeros((0, 4)), k=1)
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        cluster_embeddings(np.array([[1.0, 0.0], [np.nan, 1.0]]), k=1)
    with pytest.raises(ValueError, match="row 0 is all zeros"):
        cluster_embeddings(np.array([[0.0, 0.0], [1.0, 1.0]]), k=1)


# ---------------------------------------------------------------------------------------- HDBSCAN


def test_hdbscan_finds_blobs_and_reports_noise():
    vectors, truth = make_blobs(k=3, per_blob=40, spread=0.03)
    outliers = random_unit(6, 32, seed=5)
    topics = cluster_embeddings(np.vstack([vectors, outliers]), k=3, method="hdbscan", reducer="pca")
    assert topics.num_topics == 3
    assert (topics.params["reduction"], topics.params["reduced_dim"]) == ("pca", 10)
    assert topics.params["min_cluster_size"] == 10
    core = topics.assignments[:120]
    assert score_against_labels(core[core >= 0], truth[core >= 0])["purity"] == 1.0
    noise = topics.noise_mask
    assert noise[120:].sum() >= 4 and noise.sum() <= 10  # most outliers are noise, few blob points
    assert topics.metrics["noise_fraction"] == pytest.approx(noise.mean())
    assert (topics.training_assignments >= 0).all() and sum(topics.sizes) == 126
    ids, _ = nearest_centroid(np.vstack([vectors, outliers])[noise], topics.centroids)
    np.testing.assert_array_equal(topics.training_assignments[noise], ids)
    assert topics.sizes == sorted(topics.sizes, reverse=True)


def test_hdbscan_reduces_with_pca_by_default_and_needs_no_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` fails: nothing may need it
    vectors, truth = make_blobs(k=2, per_blob=20)
    topics = cluster_embeddings(vectors, k=2, method="hdbscan", seed=3)
    assert topics.params["reduction"] == "pca" and topics.params["reduced_dim"] == 10
    assert topics.num_topics == 2
    assert score_against_labels(topics.assignments, truth)["purity"] == 1.0
    with pytest.raises(ValueError, match="reducer must be one of"):
        cluster_embeddings(vectors, method="hdbscan", reducer="umap")


def test_hdbscan_all_noise_is_an_error():
    with pytest.raises(ValueError, match="every document in noise.*min_cluster_size"):
        cluster_embeddings(random_unit(8, 16, seed=0), method="hdbscan", reducer="pca", min_cluster_size=5)
    with pytest.raises(ValueError, match="min_cluster_size=9 is more than the 8 documents"):
        cluster_embeddings(random_unit(8, 16, seed=0), k=1, method="hdbscan", min_cluster_size=9)


# --------------------------------------------------------------------------------------- keywords


def test_ctfidf_ranks_topic_words_first_and_never_stop_words():
    texts = [
        "The cat and the kitten sat on the mat with another cat.",
        "A cat is a small animal; the kitten is a young cat.",
        "The rocket and the booster launched the rocket into orbit at 9am.",
        "Our rocket reached orbit; the booster landed on the ship.",
        "This document is noise about nothing in particular.",
    ]
    keywords = ctfidf_keywords(texts, [0, 0, 1, 1, -1], top_n=4)
    assert [words[0] for words in keywords] == ["cat", "rocket"]
    assert set(keywords[0][:2]) == {"cat", "kitten"} and set(keywords[1][1:3]) == {"booster", "orbit"}
    every = {word for words in ctfidf_keywords(texts, [0, 0, 1, 1, 0], top_n=50) for word in words}
    stop_words = {"the", "and", "is", "on", "with", "this", "about", "our", "into", "another", "nothing"}
    assert not every & stop_words
    assert all(len(word) >= 3 and word.isalpha() and word.islower() for word in every)
    assert "document" in every and "noise" not in {w for ws in keywords for w in ws}


def test_ctfidf_edge_cases():
    assert ctfidf_keywords(["the and of", "is it"], [0, 1]) == [[], []]
    # topic 1 has no document; rarer words win, ties go alphabetically ("bread" is in both topics).
    assert ctfidf_keywords(["bake bread", "oven bread", "goal scored"], [0, 2, 2], top_n=2) == [
        ["bake", "bread"], [], ["goal", "oven"]]
    with pytest.raises(ValueError, match="assignments"):
        ctfidf_keywords(["a", "b"], [0])
    with pytest.raises(ValueError, match="top_n"):
        ctfidf_keywords(["a"], [0], top_n=0)


# ------------------------------------------------------------------------------------ scores etc.


def test_score_against_labels():
    assert score_against_labels([0, 0, 1, 1], ["a", "b", "b", "b"])["purity"] == 0.75
    perfect = score_against_labels([2, 2, 0, 0, 1], ["x", "x", "y", "y", "z"])
    assert perfect == pytest.approx({"purity": 1.0, "nmi": 1.0, "adjusted_rand": 1.0})
    with pytest.raises(ValueError, match="same non-zero length"):
        score_against_labels([0, 1], ["a"])


def test_nearest_centroid_is_cosine_and_checks_dimensions():
    centroids = np.array([[1.0, 0.0], [0.0, 2.0]])
    ids, sims = nearest_centroid(np.array([[3.0, 1.0], [0.1, 5.0]]), centroids)
    np.testing.assert_array_equal(ids, [0, 1])
    np.testing.assert_allclose(sims, [3 / np.sqrt(10), 5 / np.sqrt(25.01)], rtol=1e-6)
    assert nearest_centroid(np.array([0.0, 1.0]), centroids)[0].tolist() == [1]
    with pytest.raises(EmbedderMismatchError):
        nearest_centroid(np.ones((2, 3)), centroids)


def test_project_2d():
    vectors, _ = make_blobs(k=3, per_blob=10)
    topics = cluster_embeddings(vectors, k=3)
    doc_xy, centroid_xy = project_2d(vectors, topics.centroids)
    assert doc_xy.shape == (30, 2) and centroid_xy.shape == (3, 2) and doc_xy.dtype == np.float32
    with pytest.raises(ValueError, match="at least 2 documents"):
        project_2d(vectors[:1], topics.centroids)


def test_embed_texts_batches_longest_first_and_keeps_order():
    model = FakeEncoder()
    texts = ["aa", "aeiou aeiou", "b", "ccc eee", "d"]
    vectors = embed_texts(model, texts, batch_size=2, show_progress=False)
    assert [len(batch) for batch in model.batches] == [2, 2, 1]
    assert model.batches[0] == ["aeiou aeiou", "ccc eee"]
    assert vectors.dtype == np.float32 and vectors.shape == (5, 3)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    expected = np.array([[2, 2, 1], [11, 10, 1], [1, 0, 1], [7, 3, 1], [1, 0, 1]], dtype=float)
    np.testing.assert_allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6)
    for bad, match in [("one string", "sequence of strings"), ([], "empty"), (["ok", 3], r"texts\[1\]")]:
        with pytest.raises(ValueError, match=match):
            embed_texts(model, bad, show_progress=False)


# ------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    vectors, truth = make_blobs(k=3, per_blob=20, spread=0.03)
    topics = cluster_embeddings(np.vstack([vectors, random_unit(4, 32, seed=9)]), k=3, method="hdbscan",
                                reducer="pca")
    topics = replace(topics, keywords=[["a"], ["b", "c"], []], metrics={"purity": 0.5})
    folder = topics.save(tmp_path / "topics")
    loaded = TopicModel.load(folder)
    for name in ("assignments", "training_assignments", "centroids"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(topics, name))
    assert (loaded.sizes, loaded.keywords, loaded.method, loaded.params, loaded.metrics) == (
        topics.sizes, topics.keywords, topics.method, topics.params, topics.metrics)
    manifest = json.loads((folder / "topics.json").read_text())
    assert manifest["moin_hub_version"] and manifest["created_by"].startswith("moin-hub ")
    with safe_open(str(folder / "centroids.safetensors"), framework="numpy") as handle:
        assert list(handle.keys()) == ["centroids"]


def test_load_refuses_other_array_formats_and_bad_files(tmp_path):
    topics = cluster_embeddings(make_blobs(k=2, per_blob=5)[0], k=2)
    folder = topics.save(tmp_path / "t")
    (folder / "centroids.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(InvalidTopicModelError, match="not a safetensors file"):
        TopicModel.load(folder)
    (folder / "centroids.safetensors").unlink()
    np.save(folder / "centroids.npy", topics.centroids)
    with pytest.raises(UnsafeFileError, match="centroids.npy"):
        TopicModel.load(folder)
    folder = topics.save(tmp_path / "u")
    (folder / "assignments.json").write_text(json.dumps({"assignments": [0, 1]}))
    with pytest.raises(InvalidTopicModelError, match=r"sizes=\[5, 5\] do not count") as err:
        TopicModel.load(folder)
    assert isinstance(err.value, MoinHubError) and isinstance(err.value, ValueError)
    with pytest.raises(FileNotFoundError):
        TopicModel.load(tmp_path / "missing")


# ---------------------------------------------------------------------------------- real embedder


def test_real_embedder_separates_three_topics(embedder):
    texts = [text for sentences in TOPIC_SENTENCES.values() for text in sentences]
    labels = [topic for topic, sentences in TOPIC_SENTENCES.items() for _ in sentences]
    topics = cluster_documents(texts, embedder, k=3, labels=labels, top_n=5, show_progress=False)
    assert topics.num_topics == 3 and topics.metrics["purity"] >= 0.9
    assert topics.metrics["routing_agreement"] == 1.0 and all(len(words) == 5 for words in topics.keywords)
