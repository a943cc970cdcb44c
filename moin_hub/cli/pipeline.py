"""`moin-hub cluster | train | evaluate | push-all`: make experts from a corpus, in one workspace folder."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import emit, examples, hub_options, registry_option

WORKDIR = click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))


# ------------------------------------------------------------------------------------------- cluster


@click.command("cluster", epilog=examples(
    "moin-hub cluster work --corpus brown --k 8 --endpoint http://127.0.0.1:8080 \\",
    "    --base-model moin-assets/SmolLM2-135M-Instruct-q4_1-dequant --embedder moin-assets/all-MiniLM-L6-v2",
    "moin-hub cluster work --corpus data/docs.jsonl --text-column body --method hdbscan",
))
@WORKDIR
@click.option("--corpus", default="brown", show_default=True,
              help="'brown' (bundled Brown Corpus), a JSONL/text file or folder, a saved dataset, or a Hub "
                   "dataset id.")
@click.option("--text-column", default="text", show_default=True, help="Column with the text (JSONL, datasets).")
@click.option("--split", default="train", show_default=True, help="Dataset split to read (datasets only).")
@click.option("--max-files", type=click.IntRange(2), default=None,
              help="Brown only: a balanced subset of this many files, for quick runs.")
@click.option("--words-per-doc", type=click.IntRange(20), default=200, show_default=True,
              help="Brown only: words per document.")
@click.option("--heldout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of sources (files) held out for evaluation.")
@click.option("--k", type=click.IntRange(1), default=8, show_default=True, help="Topics for k-means.")
@click.option("--method", type=click.Choice(["kmeans", "hdbscan"]), default="kmeans", show_default=True,
              help="faiss k-means (MoIN-5k style) or PCA (10-d) + HDBSCAN (MoIN-500 style, noise reassigned).")
@click.option("--min-cluster-size", type=click.IntRange(2), default=None, help="HDBSCAN only.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of split and clustering.")
@click.option("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct", show_default=True,
              help="Hub id of the frozen base model the experts will adapt.")
@click.option("--base-revision", default=None, help="Revision of the base model (pinned to its commit sha).")
@click.option("--embedder", default="sentence-transformers/all-MiniLM-L6-v2", show_default=True,
              help="Hub id of the sentence-transformers embedder.")
@click.option("--embedder-revision", default=None, help="Revision of the embedder (pinned to its commit sha).")
@click.option("--query-words", type=click.IntRange(1), default=32, show_default=True,
              help="Words of each held-out document routed as its query when routing is scored.")
@hub_options
def cluster_command(workdir: Path, corpus: str, text_column: str, split: str, max_files: int | None,
                    words_per_doc: int, heldout_fraction: float, k: int, method: str, min_cluster_size: int | None,
                    seed: int, base_model: str, base_revision: str | None, embedder: str,
                    embedder_revision: str | None, query_words: int, endpoint: str | None, token: str | None,
                    output_format: str) -> None:
    """Split a corpus into topics and start a workspace in WORKDIR.

    \b
    Embeds every training document (progress bar), clusters the embeddings, and writes per-topic
    assignments, centroids (mean of normalised member embeddings), sizes and c-TF-IDF keywords.
    Held-out documents (whole source files) are assigned to topics too. With labels (Brown genre
    groups), cluster purity and NMI are reported. The base model and embedder are pinned to commits.
    """
    from ..pipeline.steps import cluster, load_corpus, resolve_models

    base, emb = resolve_models(base_model, embedder, base_revision=base_revision,
                               embedder_revision=embedder_revision, endpoint=endpoint, token=token)
    train, heldout, info = load_corpus(corpus, text_column=text_column, split=split, max_files=max_files,
                                       heldout_fraction=heldout_fraction, seed=seed, words_per_doc=words_per_doc)
    workspace = cluster(workdir, train, heldout, base_model=base, embedder=emb, k=k, method=method, seed=seed,
                        min_cluster_size=min_cluster_size, corpus_info=info, query_words=query_words,
                        endpoint=endpoint, token=token, progress=output_format == "text")
    data = {"workspace": str(workdir), **workspace.clustering, "train_documents": len(train),
            "heldout_documents": len(heldout)}

    def text() -> str:
        from ..pipeline.steps import topic_model

        topics = topic_model(workdir)
        lines = [f"{len(train)} training / {len(heldout)} held-out documents -> {topics.num_topics} topics "
                 f"({method}) in {workdir}"]
        for i, size in enumerate(topics.sizes):
            words = ", ".join(topics.keywords[i][:6]) if topics.keywords else ""
            lines.append(f"  topic-{i:02d}  {size:5d} docs  {words}")
        metrics = workspace.clustering["metrics"]
        if "purity" in metrics:
            lines.append(f"Against the labels: purity {metrics['purity']:.3f}, NMI {metrics['nmi']:.3f}")
        return "\n".join(lines)

    emit(output_format, data, text)


# --------------------------------------------------------------------------------------------- train


@click.command("train", epilog=examples(
    "moin-hub train work --tokens-per-expert 200000 --workers 2",
    "moin-hub train work --dense                         # branch-train (seed 0.75) + the dense baseline",
    "moin-hub train work --seed-fraction 0               # plain MoIN: experts from scratch",
    "moin-hub train work --target-modules all-linear --rank 16 --executor ray",
))
@WORKDIR
@click.option("--rank", type=click.IntRange(1), default=8, show_default=True, help="LoRA rank (same for all).")
@click.option("--alpha", type=click.FloatRange(0, min_open=True), default=16.0, show_default=True,
              help="LoRA alpha.")
@click.option("--target-modules", default="q_proj,v_proj", show_default=True,
              help="Comma-separated module names that get LoRA (same for all experts, so they hot-swap), or "
                   "'all-linear' (every linear layer but the output head, as the MoIN paper).")
@click.option("--lr", "learning_rate", type=click.FloatRange(0, 1, min_open=True), default=5e-4,
              show_default=True, help="Peak learning rate (warmup + cosine decay).")
@click.option("--seq-len", type=click.IntRange(2), default=256, show_default=True, help="Tokens per block.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Blocks per step.")
@click.option("--tokens-per-expert", type=click.IntRange(1), default=200_000, show_default=True,
              help="Each topic's share of the run's token budget (total = topics x this, what the dense "
                   "baseline gets); with --seed-fraction part of it goes to the shared seed.")
@click.option("--seed-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True,
              help="Branch-train: spend this share of the total budget first on one seed LoRA over all topics "
                   "(WORKDIR/seed), then branch every expert from it on its topic alone. 0: plain MoIN "
                   "(experts from scratch, as the paper).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Cap on steps per expert.")
@click.option("--bf16", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="bf16 autocast; 'auto' uses it where the hardware is fast at it.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of LoRA init and order.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Experts trained at once (local processes; threads split between them).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="'ray' runs one Ray task per expert (pip install 'moin-hub[ray]').")
@click.option("--dense", is_flag=True, help="Also train the dense baseline (one LoRA, all topics, same total tokens).")
@hub_options
def train_command(workdir: Path, rank: int, alpha: float, target_modules: str, learning_rate: float, seq_len: int,
                  batch_size: int, tokens_per_expert: int, seed_fraction: float, max_steps: int | None, bf16: str,
                  seed: int, workers: int,
                  executor: str, dense: bool, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Train one LoRA expert per topic of WORKDIR on the frozen base model.

    \b
    Each expert is trained alone (no communication), written atomically, and never retrained once
    finished: rerun after a crash and only the missing experts train. A failure loses only that
    expert; the others are kept and the failures are listed.

    \b
    With --seed-fraction F (branch-train, as BTM / c-BTM): a shared seed LoRA is trained first on all
    topics with F of the total budget (warmup, constant learning rate), then each expert starts from
    it and spends the rest of its share on its topic alone (the learning-rate decay). Seed + experts
    use exactly the dense baseline's tokens; the output lists the accounting.
    """
    from ..pipeline.jobs import TrainConfig
    from ..pipeline.steps import train

    config = TrainConfig(rank=rank, alpha=alpha, target_modules=tuple(m.strip() for m in target_modules.split(",")
                                                                      if m.strip()),
                         learning_rate=learning_rate, seq_len=seq_len, batch_size=batch_size,
                         tokens_per_expert=tokens_per_expert, seed_fraction=seed_fraction, max_steps=max_steps,
                         bf16={"auto": "auto", "on": True, "off": False}[bf16], seed=seed)
    result = train(workdir, config, workers=workers, executor=executor, dense=dense, endpoint=endpoint,
                   token=token, progress=output_format == "text")
    budget = result["budget"]
    emit(output_format, result, lambda: "\n".join(
        [f"{len(result['experts'])} expert(s) in {workdir / 'experts'} "
         f"({len(result['trained'])} trained now in {result['seconds']:.0f} s with {workers} worker(s))"]
        + ([f"Shared seed: {result['seed']} ({budget['seed_tokens']} tokens, {budget['seed_fraction']:.0%} of the "
            f"total)"] if result["seed"] else [])
        + [f"Tokens: seed {budget['seed_tokens']} + {budget['topics']} experts x {budget['expert_tokens']} = "
           f"{budget['dense_tokens']} (the dense baseline's budget)"]
        + ([f"Dense baseline: {result['dense']}"] if result["dense"] else [])
    ))


# ------------------------------------------------------------------------------------------ evaluate


MODE_NAMES = ("top1", "topk", "adaptive", "arrow")  # pipeline.modes.EVAL_MODES, without importing torch for --help


def _parse_modes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    """``top1,topk`` -> ``("top1", "topk")``: known modes only, duplicates dropped, order kept."""
    modes = tuple(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise click.BadParameter(f"unknown mode(s) {', '.join(map(repr, unknown)) or repr(value)}; give a "
                                 f"comma-separated list of {', '.join(MODE_NAMES)}.", ctx=ctx, param=param)
    return modes


@click.command("evaluate", epilog=examples(
    "moin-hub evaluate work",
    "moin-hub evaluate work --modes top1,topk --top-k 2 --format json",
    "moin-hub evaluate work --modes adaptive --mass 0.9 --threshold 0.1",
    "moin-hub evaluate work --modes top1,arrow --arrow-top-k 2 --arrow-gap 0.5",
))
@WORKDIR
@click.option("--seq-len", type=click.IntRange(2), default=256, show_default=True, help="Tokens per scored block.")
@click.option("--max-docs-per-topic", type=click.IntRange(1), default=None, help="Cap held-out documents per topic.")
@click.option("--modes", default=",".join(MODE_NAMES), show_default=True, callback=_parse_modes,
              help="Routing modes to score, comma-separated: top1 = the nearest expert; topk = the k nearest, "
                   "softmax-weighted; adaptive = as few as carry --mass of the probability; arrow = every "
                   "expert mixed per token and layer (Arrow, no router training).")
@click.option("-k", "--top-k", "k", type=click.IntRange(1), default=3, show_default=True,
              help="The most experts a query mixes (topk, adaptive).")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=None,
              help="Softmax temperature over the similarities (topk, adaptive). Default: calibrated on the "
                   "training documents' queries (the report shows it).")
@click.option("--mass", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
              help="adaptive: probability mass the chosen experts must reach.")
@click.option("--threshold", type=float, default=None,
              help="Below this best similarity a query gets no expert: the base model scores it.")
@click.option("--arrow-top-k", type=click.IntRange(1), default=3, show_default=True,
              help="arrow: experts a token may take in each layer.")
@click.option("--arrow-temperature", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="arrow: softmax temperature over a token's prototype scores.")
@click.option("--arrow-gap", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="arrow, adaptive gating: a token takes more than its best expert only where the gap between "
                   "its two best weights is below this (unsure). Default: always --arrow-top-k.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@hub_options
def evaluate_command(workdir: Path, seq_len: int, max_docs_per_topic: int | None, modes: tuple[str, ...], k: int,
                     temperature: float | None, mass: float, threshold: float | None, arrow_top_k: int,
                     arrow_temperature: float, arrow_gap: float | None, no_plots: bool,
                     endpoint: str | None, token: str | None, output_format: str) -> None:
    """Score WORKDIR's experts on held-out text: base vs routed vs oracle vs dense, and each routing mode.

    \b
    Writes WORKDIR/report.json and plots (perplexity per expert, documents per topic, 2-D map).
    Routed = each held-out document routed by its first words, as a query; oracle = the topic of
    the whole document; dense = the baseline from `train --dense`, if trained.
    Each of --modes scores every document with the mixture its query gets (as `route --mode`),
    each document alone, so every mode and the rows base / oracle / dense / seed score exactly the
    same tokens: one line each with its perplexity and mean experts per document; json: "modes" in
    report["perplexity"]["overall"] and in each topic. Topics whose routed documents did worse than
    the base model are named; the targets state routed/dense.
    """
    from ..hub.arrow import ArrowSpec
    from ..pipeline.report import evaluate, format_report

    arrow = ArrowSpec(top_k=arrow_top_k, temperature=arrow_temperature, gap=arrow_gap)
    report = evaluate(workdir, endpoint=endpoint, token=token, seq_len=seq_len, max_docs_per_topic=max_docs_per_topic,
                      modes=modes, k=k, temperature=temperature, mass=mass, threshold=threshold, arrow=arrow,
                      plots=not no_plots, progress=output_format == "text")
    emit(output_format, report, lambda: format_report(report))


# ------------------------------------------------------------------------------------------ push-all


@click.command("push-all", epilog=examples(
    "moin-hub push-all work --registry acme/moin-registry --namespace acme",
))
@WORKDIR
@registry_option
@click.option("--namespace", required=True, metavar="ORG", help="Owner of the expert model repos.")
@click.option("--repo-prefix", default="moin-", show_default=True,
              help="Expert repos are ORG/<prefix><registry name>-<expert id>.")
@click.option("--no-create", is_flag=True, help="Fail if the registry does not exist instead of creating it.")
@click.option("--private", is_flag=True, help="Create private repos.")
@click.option("--fallback-seed", is_flag=True,
              help="Also push branch-train's seed (WORKDIR/seed) as the registry's fallback expert: queries below "
                   "the routing threshold get it instead of the bare base model.")
@hub_options
def push_all_command(workdir: Path, registry: str, namespace: str, repo_prefix: str, no_create: bool,
                     private: bool, fallback_seed: bool, endpoint: str | None, token: str | None,
                     output_format: str) -> None:
    """Push every trained expert of WORKDIR into a registry (one commit per expert, one bar).

    \b
    The registry is created if missing (pinned to the workspace's base model and embedder). Each
    expert's repo gets its adapter, centroid, keywords, samples and perplexities in its card.
    """
    from ..pipeline.steps import push_all

    results = push_all(workdir, registry=registry, namespace=namespace, repo_prefix=repo_prefix,
                       create_registry=not no_create, private=private, endpoint=endpoint, token=token,
                       progress=output_format == "text", fallback_seed=fallback_seed)
    emit(output_format, {"registry": registry, "experts": [r.to_dict() for r in results]}, lambda: "\n".join(
        [f"{r.expert_id:<12} {r.url}  (commit {r.revision[:12]})" for r in results]
        + [f"Registry {registry} holds {results[-1].n_experts} expert(s)."]))


COMMANDS = (cluster_command, train_command, evaluate_command, push_all_command)
