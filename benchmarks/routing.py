"""Routing at scale: exact vs calibrated IVF index at 5,000 and 100,000 experts, and routing vs generation.

Stated configuration: synthetic registries of 384-d unit centroids made like real topic centroids
(``--clusters`` random cluster centres, each expert = a centre plus Gaussian noise, cosine ~0.82 to its
centre), held as real ``Registry`` rows (``ExpertRecord`` per expert) at a fixed commit sha, routed through
the public ``Router`` (``Router.route_vector``: validation, normalisation, search, route records).

- Route latency EXCLUDES the query embedding: the wall time of ``route_vector(vector, k=3)`` over
  ``--queries`` queries, each an expert's centroid plus noise at a random level (cosine ~0.3 to ~0.9 to
  that expert: on-topic queries). p50 target < 1 ms for the index ``"auto"`` chooses.
- Recall@1 of each approximate index = share of queries whose best route is the exact best (faiss
  exhaustive search), target >= 0.99 on on-topic queries. Off-topic queries (random directions, which
  match no expert well) are reported too, without a target.
- Routing including the embedding (``Router.route`` with the real all-MiniLM-L6-v2, a short query) vs
  generating 32 tokens (greedy, ``min_new_tokens=32``) with the bundled SmolLM2-135M base loaded in fp32
  on CPU; target ratio < 5%.

Prints one table; exit code 1 if a target is missed (after printing). ``--json FILE`` also writes the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import exit_code, met  # noqa: E402

DIM = 384
QUERY = "How long should bread dough rise before baking?"
REVISION = "5" * 40


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (noise 0.7: cosine ~0.82 to the centre)."""
    centres = unit(rng.standard_normal((clusters, DIM)))
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (0.7 / np.sqrt(DIM))
    return unit(centres[rng.integers(0, clusters, n)] + noise)


def make_registry(vectors: np.ndarray, name: str):  # noqa: ANN201 - moin_hub.Registry
    from moin_hub import Registry
    from moin_hub.hub.config import EmbedderSpec, ExpertRecord, PinnedModel, RegistryManifest

    manifest = RegistryManifest(base_model=PinnedModel("bench/base", "b" * 40),
                                embedder=EmbedderSpec("bench/embedder", "e" * 40, dim=DIM))
    records = [ExpertRecord(expert_id=f"e{i:06d}", repo_id=f"bench/expert-{i:06d}", revision="c" * 40,
                            centroid=vector) for i, vector in enumerate(vectors)]
    return Registry(f"bench/{name}", REVISION, manifest, records, endpoint="http://127.0.0.1:9")


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000, q))


def measure_index(registry, vectors: np.ndarray, kind: str, queries: np.ndarray,  # noqa: ANN001
                  off_topic: np.ndarray) -> dict[str, object]:
    """Build a router with ``kind``, time routes and compare its best routes with exact search."""
    import faiss

    from moin_hub.hub.router import Router

    start = time.perf_counter()
    router = Router(registry, index=kind)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    again = Router(registry, index=kind)
    cached_ms = (time.perf_counter() - start) * 1000
    assert again.index is router.index, "the index was not reused for the same registry commit"
    row = {expert.expert_id: i for i, expert in enumerate(registry.experts)}

    def best_rows(batch: np.ndarray, timings: list[float] | None = None) -> np.ndarray:
        out = []
        for vector in batch:
            start = time.perf_counter()
            result = router.route_vector(vector, k=3)
            if timings is not None:
                timings.append(time.perf_counter() - start)
            out.append(row[result.best.expert.expert_id])
        return np.asarray(out)

    best_rows(queries[:50])  # warm-up
    timings: list[float] = []
    found = best_rows(queries, timings)
    _, exact = faiss.knn(queries, vectors, 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, exact_off = faiss.knn(off_topic, vectors, 1, metric=faiss.METRIC_INNER_PRODUCT)
    index = router.index
    return {
        "experts": len(registry), "requested": kind, "kind": index.kind, "nlist": index.nlist,
        "nprobe": index.nprobe, "build_s": index.build_seconds, "router_cold_s": cold_s,
        "router_cached_ms": cached_ms,
        "p50_ms": percentile_ms(timings, 50), "p99_ms": percentile_ms(timings, 99),
        "recall": float(np.mean(found == exact[:, 0])),
        "recall_off_topic": float(np.mean(best_rows(off_topic) == exact_off[:, 0])),
        "_router": router,
    }


def time_generation(runs: int) -> float:
    """Median seconds to generate 32 new tokens with the bundled base model in fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moin_hub.hub.assets import default_base_model_dir

    folder = default_base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer(QUERY, return_tensors="pt")
    seconds = []
    with torch.no_grad():
        for attempt in range(runs + 1):
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            if attempt:  # the first run is a warm-up
                seconds.append(time.perf_counter() - start)
            assert out.shape[1] - inputs["input_ids"].shape[1] == 32
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 100_000], help="Registry sizes.")
    parser.add_argument("--clusters", type=int, default=300, help="Cluster centres of the centroids.")
    parser.add_argument("--queries", type=int, default=1000, help="On-topic queries per index (timed).")
    parser.add_argument("--off-topic", type=int, default=200, help="Random-direction queries per index.")
    parser.add_argument("--embed-runs", type=int, default=50, help="Routes with the real embedder timed.")
    parser.add_argument("--generate-runs", type=int, default=3, help="32-token generations timed.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and faiss threads (default: their own default, one per core).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from moin_hub.hub.embed import Embedder, embedding_dimension, load_sentence_transformer
    from moin_hub.hub.router import Router, resolve_index_kind

    if args.threads:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    rows = []
    largest = None
    for n in args.sizes:
        vectors = clustered(n, args.clusters, rng)
        start = time.perf_counter()
        registry = make_registry(vectors, f"synthetic-{n}")
        rows_s = time.perf_counter() - start
        own = rng.integers(0, n, args.queries)
        scale = rng.uniform(0.5, 3.0, (args.queries, 1)).astype(np.float32)
        queries = unit(vectors[own] + scale * rng.standard_normal((args.queries, DIM)).astype(np.float32)
                       / np.sqrt(DIM))
        off_topic = unit(rng.standard_normal((args.off_topic, DIM)))
        auto_kind = resolve_index_kind("auto", n)
        other = "ivf" if auto_kind == "flat" else "flat"
        for kind in ("auto", other):
            result = measure_index(registry, vectors, kind, queries, off_topic)
            result["registry_rows_s"] = rows_s
            rows.append(result)
            if kind == "auto" and (largest is None or n >= largest["experts"]):
                largest = result
        del registry

    model = load_sentence_transformer(_embedder_dir())
    # the same registry commit again: the router reuses the cached index
    router = Router(largest["_router"].registry, Embedder(model, embedding_dimension(model)))
    for _ in range(5):
        router.route(QUERY)  # warm-up
    totals, embeds = [], []
    for _ in range(args.embed_runs):
        start = time.perf_counter()
        result = router.route(QUERY, k=3)
        totals.append(time.perf_counter() - start)
        embeds.append(result.embed_ms)
    route_total_ms = percentile_ms(totals, 50)
    embed_ms = float(np.median(embeds))
    generation_s = time_generation(args.generate_runs)
    ratio = route_total_ms / 1000 / generation_s

    checks = []
    lines = []
    for r in rows:
        what = f"{r['kind']} ({'auto' if r['requested'] == 'auto' else 'forced'}"
        what += f"; nlist {r['nlist']}, nprobe {r['nprobe']})" if r["kind"] == "ivf" else ")"
        targets = []
        if r["requested"] == "auto":
            ok = r["p50_ms"] < 1.0
            checks.append(ok)
            targets.append(f"p50 < 1 ms: {met(ok)}")
        if r["kind"] == "ivf":
            ok = r["recall"] >= 0.99
            checks.append(ok)
            targets.append(f"recall >= 0.99: {met(ok)}")
        lines.append([f"{r['experts']:,}", what, f"{r['build_s']:.2f}",
                      f"{r['router_cold_s']:.2f} s / {r['router_cached_ms']:.2f} ms", f"{r['p50_ms']:.3f}",
                      f"{r['p99_ms']:.3f}", f"{r['recall']:.4f}", f"{r['recall_off_topic']:.3f}",
                      "; ".join(targets) or "(baseline)"])
    ok = ratio < 0.05
    checks.append(ok)
    header = ["experts", "index", "build s", "Router cold / cached", "route p50 ms", "route p99 ms",
              "recall@1 on-topic", "recall@1 off-topic", "targets"]
    import torch

    print(f"routing at scale ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} "
          "torch threads; route = Router.route_vector, k=3, embedding excluded)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(line) + " |")
    blank = [""] * 6
    including = f"p50 {route_total_ms:.2f} ms (embedding p50 {embed_ms:.2f} ms)"
    print("| " + " | ".join([f"route incl. embedding ({largest['experts']:,}, {largest['kind']})", including,
                              *blank]) + " |")
    print("| " + " | ".join(["generate 32 tokens (SmolLM2-135M, fp32 CPU)", f"{generation_s:.2f} s (median)",
                              *blank]) + " |")
    print("| " + " | ".join(["routing / generation", f"{ratio:.2%}", *blank[:-1],
                              f"< 5%: {met(ok)}"]) + " |")
    print(f"(total benchmark wall time {time.perf_counter() - started:.0f} s)")

    if args.json:
        data = {"rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                "route_incl_embedding_ms": route_total_ms, "embed_ms": embed_ms, "generation_s": generation_s,
                "ratio": ratio, "all_targets_met": all(checks)}
        args.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return exit_code(checks)


def _embedder_dir() -> Path:
    from moin_hub.hub.assets import default_embedder_dir

    return default_embedder_dir()


if __name__ == "__main__":
    sys.exit(main())
