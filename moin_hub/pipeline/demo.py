"""`moin-hub demo`: the whole MoIN job end to end, offline, on the bundled defaults.

A local Hub server is started; the bundled base model (SmolLM2-135M-Instruct, dequantized from the
packaged GGUF) and embedder (all-MiniLM-L6-v2) are published to it, so every later load goes through
the Hub client at a pinned commit, exactly as against huggingface.co. Then a slice of the Brown Corpus
is clustered into topics, one LoRA expert is trained per topic (in parallel), the experts are scored on
held-out files and pushed into a registry, and example queries are routed and pulled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jobs import TrainConfig

DEMO_QUERIES = (
    "The senator told reporters that the committee would vote on the new tax bill next week.",
    "The church teaches that faith in God and daily prayer bring salvation to the soul.",
    "She stared out of the window for a long time, then turned and smiled at him.",
)
DEMO_NAMESPACE = "moin-demo"
DEMO_REGISTRY = f"{DEMO_NAMESPACE}/brown-experts"


@dataclass
class DemoConfig:
    """Sizes of the demo, chosen to finish in about 15 minutes on 2 CPU cores (883 s measured on 2026-12-02).

    Training on CPU runs at roughly 180-300 tokens/s on 2 cores for the 135M base, so the defaults give
    each topic 20k tokens, 75% of them spent on the shared seed; ``make bench`` runs the larger quality
    configuration.
    """

    max_files: int = field(default=60, metadata={"help": "Brown files used (balanced over genre groups)."})
    k: int = field(default=6, metadata={"help": "Topics, hence experts."})
    tokens_per_expert: int = field(default=20_480, metadata={"help": "Training tokens per topic (seed share included)."})
    seed_fraction: float = field(default=TrainConfig.seed_fraction,
                                 metadata={"help": "Share of all tokens for the shared seed (branch-train)."})
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=2, metadata={"help": "Blocks of 256 tokens per step."})
    workers: int = field(default=2, metadata={"help": "Experts trained at once."})
    dense: bool = field(default=False, metadata={"help": "Also train and score the dense baseline."})
    eval_docs_per_topic: int = field(default=10, metadata={"help": "Held-out documents scored per topic."})
    queries: Sequence[str] = field(default=DEMO_QUERIES, metadata={"help": "Queries routed and pulled at the end."})
    port: int = field(default=0, metadata={"help": "Port of the local Hub (0: any free port)."})

    def train_config(self) -> TrainConfig:
        return TrainConfig(rank=self.rank, alpha=2.0 * self.rank, learning_rate=self.learning_rate,
                           batch_size=self.batch_size, tokens_per_expert=self.tokens_per_expert,
                           seed_fraction=self.seed_fraction, eval_max_tokens=4096, bf16="auto")


def run_demo(out: str | Path, config: DemoConfig | None = None, *, echo: Callable[[str], None] = print,
             progress: bool = True, keep_hub: bool = False) -> dict[str, Any]:
    """Run the demo into ``out`` and return what it measured (also written to ``out/work/report.json``).

    ``out/hub`` holds the local Hub's data (reused by a later run); ``out/work`` the workspace. A rerun
    skips the experts already trained. With ``keep_hub`` the returned dict holds the running
    ``LocalHub`` under ``"hub"`` (the caller stops it).
    """
    from huggingface_hub import HfApi

    from ..hub.assets import publish_default_assets
    from ..local_hub.server import LocalHub
    from .report import evaluate
    from .steps import cluster, load_corpus, push_all, resolve_models, train

    config = config or DemoConfig()
    out = Path(out)
    work = out / "work"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def step(name: str, message: str) -> Callable[[], None]:
        echo(f"\n== {message}")
        t0 = time.perf_counter()

        def done() -> None:
            timings[name] = round(time.perf_counter() - t0, 1)
            echo(f"   ({timings[name]:.0f} s)")
        return done

    hub = LocalHub(out / "hub", port=config.port)
    hub.start()
    try:
        done = step("assets", f"Local Hub at {hub.url}; publishing the bundled base model and embedder to it")
        assets = publish_default_assets(HfApi(endpoint=hub.url))
        base, embedder = resolve_models(assets["base_model"][0], assets["embedder"][0], endpoint=hub.url)
        echo(f"   base model {base.repo_id}@{base.revision[:12]}\n   embedder   {embedder.repo_id}"
             f"@{embedder.revision[:12]} ({embedder.dim}-d)")
        done()

        done = step("cluster", f"Clustering {config.max_files} Brown files into {config.k} topics")
        corpus_train, heldout, info = load_corpus("brown", max_files=config.max_files)
        workspace = cluster(work, corpus_train, heldout, base_model=base, embedder=embedder, k=config.k,
                            corpus_info=info, endpoint=hub.url, progress=progress)
        from .steps import topic_model

        topics = topic_model(work)
        for i, size in enumerate(topics.sizes):
            echo(f"   topic-{i:02d}  {size:4d} docs  {', '.join(topics.keywords[i][:6])}")
        metrics = workspace.clustering["metrics"]
        echo(f"   purity {metrics.get('purity', 0):.3f}, NMI {metrics.get('nmi', 0):.3f} against the genre groups; "
             f"{len(corpus_train)} training / {len(heldout)} held-out documents")
        done()

        done = step("train", f"Training {config.k} experts ({config.tokens_per_expert} tokens per topic, "
                             + (f"{config.seed_fraction:.0%} of all of them first on one shared seed, "
                                if config.seed_fraction else "")
                             + f"{config.workers} workers)" + (" and the dense baseline" if config.dense else ""))
        trained = train(work, config.train_config(), workers=config.workers, dense=config.dense,
                        endpoint=hub.url, progress=progress)
        done()

        done = step("evaluate", "Scoring on held-out Brown files: base vs routed vs oracle"
                                + (" vs dense" if config.dense else ""))
        report = evaluate(work, endpoint=hub.url, max_docs_per_topic=config.eval_docs_per_topic)
        from .report import format_report

        echo("\n".join("   " + line for line in format_report(report).splitlines()))
        done()

        done = step("push", f"Pushing the experts into the registry {DEMO_REGISTRY}")
        pushed = push_all(work, registry=DEMO_REGISTRY, namespace=DEMO_NAMESPACE,
                          description="Topic experts of SmolLM2-135M-Instruct on the Brown Corpus (moin-hub demo).",
                          endpoint=hub.url, progress=progress)
        for result in pushed:
            echo(f"   {result.expert_id}: {result.url} @ {result.revision[:12]}")
        done()

        done = step("pull", "Routing queries: pull only the chosen expert, verified, and load it with PEFT")
        answers = [_answer(query, hub.url, echo) for query in config.queries]
        done()
    finally:
        if not keep_hub:
            hub.stop()
    timings["total"] = round(time.perf_counter() - started, 1)
    echo(f"\nDone in {timings['total']:.0f} s. Workspace: {work}  (report.json, plots/)")
    echo(f"Browse it again: moin-hub local-hub --data {out / 'hub'} --port 8080, then\n"
         f"  HF_ENDPOINT=http://127.0.0.1:8080 moin-hub pull --registry {DEMO_REGISTRY} --query '...'")
    echo(f"Open the Space (route, generate, browse): moin-hub local-hub --data {out / 'hub'} --port 8080 &\n"
         f"  HF_ENDPOINT=http://127.0.0.1:8080 moin-hub space --registry {DEMO_REGISTRY}   "
         "# then browse http://127.0.0.1:7860")
    echo(f"Serve it (OpenAI-compatible, routed per request): with the local Hub running,\n"
         f"  HF_ENDPOINT=http://127.0.0.1:8080 moin-hub serve --registry {DEMO_REGISTRY} --port 8000   "
         "# then POST /v1/completions with model moin:auto")
    summary = {"timings": timings, "report": str(work / "report.json"), "registry": DEMO_REGISTRY,
               "trained": trained, "answers": answers, "targets": report["targets"]}
    if keep_hub:
        summary["hub"] = hub
    return summary


def _answer(query: str, endpoint: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """Route and pull one query; print the route and the perplexity of base vs expert on held-out text."""
    from ..hub.loading import load_expert
    from ..hub.pull import pull

    pulled = pull(query, registry=DEMO_REGISTRY, endpoint=endpoint, k=3)
    route = pulled.route
    best = route.best
    record = pulled.expert
    runner_ups = ", ".join(f"{r.expert.expert_id} ({r.similarity:.3f})" for r in route.routes[1:])
    model = load_expert(pulled)
    model_name = type(model).__name__
    del model
    echo(f"   query: {query!r}\n"
         f"   -> {record.expert_id} [{', '.join(record.keywords[:5])}] similarity {best.similarity:.3f}; "
         f"runner-ups: {runner_ups}\n"
         f"      held-out perplexity: base {record.base_perplexity:.2f} -> expert {record.perplexity:.2f} "
         f"({100 * (record.perplexity / record.base_perplexity - 1):+.1f}%)\n"
         f"      verified {len(record.files)} files at {record.revision[:12]} in {pulled.path}; "
         f"loaded as {model_name} (route {route.embed_ms + route.search_ms:.1f} ms)")
    return {"query": query, **pulled.to_dict(), "perplexity": record.perplexity,
            "base_perplexity": record.base_perplexity}
