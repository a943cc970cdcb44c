"""Ablation at equal total training tokens: topics k x seed fraction x LoRA targets, on the Brown Corpus.

Every configuration spends the same total budget T (training tokens, the seed's included):

- k = 1 is the dense LoRA: one adapter on all the training documents, T tokens;
- k > 1: k-means into k topics; with seed fraction f, one seed LoRA on all documents takes f*T, then each
  expert branches from it and takes (1-f)*T/k on its topic alone (f = 0: MoIN, experts from scratch).

Stated configuration (the defaults; ``--quick`` shrinks it to a CI-sized check): base SmolLM2-135M-Instruct
(dequantized Q4_1), embedder all-MiniLM-L6-v2, Brown: ``--max-files`` files balanced over the 8 genre
groups, 200-word documents, 20% of each group's files held out; LoRA r=8, alpha 16, lr 1e-3, 2 x 256-token
blocks per step (warmup 5%, cosine decay; a seed keeps a constant rate and its branches decay),
targets q_proj,v_proj or all-linear; T = ``--total-tokens``. Each configuration is scored on the same
``--eval-docs`` held-out documents (evenly spaced over the held-out files), each alone on its first
``--eval-seq-len`` tokens, under: top1 (MoIN), topk and adaptive (k=3, temperature calibrated on the training
documents' queries, mass 0.8), arrow (per-token mixing of all experts, top-3), oracle (each document's own
topic), and the references base, dense and the seed alone. Routing accuracy: a document's first 32 words
routed to its own topic.

A seed or a dense LoRA does not depend on k (it is trained on all documents in an order independent of the
clustering), so each is trained once per (targets, f) and shared by every k.

Prints one table and writes a plot (``--plot``: held-out perplexity vs k, a line per seed fraction, dense
and base marked). Targets checked (exit 1 if missed): every configuration spends exactly T tokens, and every
configuration's top1 is below the base model. How experts compare with the dense LoRA is what the ablation
measures, not a target; ``benchmarks/quality.py`` holds that target at the README's quality configuration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import exit_code, met

FULL = {"max_files": 100, "total_tokens": 16_384, "seq_len": 128, "eval_docs": 32, "eval_seq_len": 128,
        "ks": "1,2,4,8,16", "fractions": "0,0.25,0.5", "targets": "q_proj+v_proj,all-linear"}
QUICK = {"max_files": 24, "total_tokens": 8_192, "seq_len": 256, "eval_docs": 16, "eval_seq_len": 128, "ks": "1,2,4",
         "fractions": "0,0.75", "targets": "q_proj+v_proj"}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"A CI-sized grid: {QUICK}.")
    for name, default in FULL.items():
        kind = str if isinstance(default, str) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"Full grid: {default}.")
    parser.add_argument("--json", type=Path, default=None, help="Write every figure to this file.")
    parser.add_argument("--plot", type=Path, default=None, help="Write the plot (PNG) here.")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the workspaces in this folder.")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def eval_sets(work: Path, picks: list[int], experts: dict) -> tuple[dict, dict, dict, float]:
    """The picked held-out documents grouped by their topic in this workspace, their ranked experts and the
    router's choice; and the topic-level routing accuracy over them."""
    from moin_hub.pipeline.report import ranked_experts
    from moin_hub.pipeline.workspace import _read_jsonl, topic_expert_id

    heldout = _read_jsonl(work / "documents" / "heldout.jsonl")
    ranked_all = ranked_experts(work, experts, len(heldout), k=3)
    texts, ranked, routed, right = {}, {}, {}, 0
    for i in picks:
        topic = topic_expert_id(heldout[i]["topic"])
        texts.setdefault(topic, []).append(heldout[i]["text"])
        ranked.setdefault(topic, []).append(ranked_all[i])
        routed.setdefault(topic, []).append(ranked_all[i][0][0])
        right += ranked_all[i][0][0] == topic
    return texts, ranked, routed, right / len(picks)


def score_adapter(model_dir: str, folder: Path | None, texts: list[str], seq_len: int) -> float:
    """Perplexity of the base model (``folder`` None) or one adapter on ``texts``, each text alone."""
    import math

    from moin_hub.hub.loading import load_base
    from moin_hub.pipeline.evaluate import load_with_adapter
    from moin_hub.pipeline.scoring import texts_nll

    model, tokenizer = load_base(model_dir)
    if folder is not None:
        model = load_with_adapter(model, folder)
    nll, n = texts_nll(model, tokenizer, texts, seq_len=seq_len)
    return math.exp(nll / n)


def main() -> int:
    args = parse()
    from huggingface_hub import HfApi

    from moin_hub.hub.assets import publish_default_assets
    from moin_hub.hub.loading import load_base
    from moin_hub.local_hub.server import LocalHub
    from moin_hub.pipeline.evaluate import evaluate_experts
    from moin_hub.pipeline.jobs import TrainConfig, plan_budget
    from moin_hub.pipeline.report import calibrate_routing
    from moin_hub.pipeline.steps import (
        base_model_dir,
        cluster,
        expert_dirs,
        load_corpus,
        make_jobs,
        resolve_models,
    )
    from moin_hub.pipeline.steps import train as train_step
    from moin_hub.pipeline.train import TRAINING_FILENAME, train_dense
    from moin_hub.pipeline.workspace import SEED_ID, Workspace

    ks = [int(k) for k in args.ks.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    target_sets = [tuple(t.split("+")) for t in args.targets.split(",")]
    tokens_per_step = 2 * args.seq_len
    if args.total_tokens % (tokens_per_step * max(ks) * 4):
        raise SystemExit(f"--total-tokens must be a multiple of {tokens_per_step * max(ks) * 4} so that every k "
                         "splits it into whole steps (and quarter seeds).")
    root = Path(args.keep or tempfile.mkdtemp(prefix="moin-ablation-"))
    hub = LocalHub(root / "hub").start()
    rows, refs, checks, started = [], {}, {}, time.perf_counter()
    try:
        assets = publish_default_assets(HfApi(endpoint=hub.url))
        base, embedder = resolve_models(assets["base_model"][0], assets["embedder"][0], endpoint=hub.url)
        train_docs, heldout, info = load_corpus("brown", max_files=args.max_files)
        step = max(1, len(heldout) // args.eval_docs)
        picks = list(range(0, len(heldout), step))[: args.eval_docs]
        works, cluster_s = {}, {}
        for k in [k for k in ks if k > 1]:
            t0 = time.perf_counter()
            works[k] = root / f"k{k:02d}"
            if not (works[k] / "moin_workspace.json").is_file():
                cluster(works[k], train_docs, heldout, base_model=base, embedder=embedder, k=k, corpus_info=info,
                        endpoint=hub.url, progress=False)
            cluster_s[k] = time.perf_counter() - t0
        first = works[min(works)]
        model_dir = str(base_model_dir(Workspace.load(first), endpoint=hub.url))
        all_picked = [heldout[i].text for i in picks]
        refs["base"] = score_adapter(model_dir, None, all_picked, args.eval_seq_len)
        kw = {"base_model_id": base.repo_id, "base_revision": base.revision, "progress": False}
        for targets in target_sets:
            label = "+".join(targets)
            common = {"rank": 8, "alpha": 16.0, "learning_rate": 1e-3, "batch_size": 2, "seq_len": args.seq_len,
                      "eval_max_tokens": args.seq_len, "target_modules": targets}  # cards' figure: one block
            # k = 1: the dense LoRA, T tokens on every training document
            t0 = time.perf_counter()
            jobs = make_jobs(first)  # the dense LoRA trains len(jobs) x tokens_per_expert = T on all of them
            dense_config = TrainConfig(tokens_per_expert=args.total_tokens // len(jobs), seed_fraction=0.0, **common)
            dense = train_dense(model_dir, jobs, root / f"dense-{label}", dense_config, **kw)
            dense_s = time.perf_counter() - t0
            tokens = json.loads((dense / TRAINING_FILENAME).read_text())["tokens"]
            refs[f"dense {label}"] = score_adapter(model_dir, dense, all_picked, args.eval_seq_len)
            rows.append({"targets": label, "k": 1, "f": None, "top1": refs[f"dense {label}"], "tokens": tokens,
                         "train_s": dense_s})
            checks[f"tokens {label} k=1"] = tokens == args.total_tokens
            seeds: dict[float, Path] = {}
            for k in [k for k in ks if k > 1]:
                for f in fractions:
                    config = TrainConfig(tokens_per_expert=args.total_tokens // k, seed_fraction=f, **common)
                    run = root / f"k{k:02d}-f{f:g}-{label}"
                    if not run.exists():
                        shutil.copytree(works[k], run, ignore=shutil.ignore_patterns("experts", "seed", "baselines"))
                    if f in seeds and not (run / SEED_ID).exists():  # the same seed as for the other k
                        shutil.copytree(seeds[f], run / SEED_ID)
                    t0 = time.perf_counter()
                    result = train_step(run, config, endpoint=hub.url, progress=False)
                    train_s = time.perf_counter() - t0
                    if f > 0:
                        seeds.setdefault(f, run / SEED_ID)
                    budget = plan_budget(config, k)
                    spent = sum(json.loads((Path(d) / TRAINING_FILENAME).read_text())["tokens"]
                                for d in [*result["experts"].values(), *([result["seed"]] if result["seed"] else [])])
                    checks[f"tokens {label} k={k} f={f:g}"] = spent == budget.dense_tokens == args.total_tokens
                    if f > 0 and f"seed {label} f={f:g}" not in refs:
                        refs[f"seed {label} f={f:g}"] = score_adapter(model_dir, run / SEED_ID, all_picked,
                                                                      args.eval_seq_len)
                    experts = expert_dirs(run)
                    texts, ranked, routed, accuracy = eval_sets(run, picks, experts)
                    calibration = calibrate_routing(run, experts)
                    t0 = time.perf_counter()
                    model, tokenizer = load_base(model_dir)
                    scores = evaluate_experts(model, tokenizer, experts, texts, routed=routed, ranked=ranked,
                                              modes=("top1", "topk", "adaptive", "arrow"),
                                              temperature=calibration["temperature"], seq_len=args.eval_seq_len)
                    modes = scores["overall"]["modes"]
                    rows.append({"targets": label, "k": k, "f": f, "tokens": spent, "train_s": train_s,
                                 "eval_s": time.perf_counter() - t0, "routing_accuracy": accuracy,
                                 "temperature": calibration["temperature"],
                                 "seed_fraction_actual": budget.seed_fraction,
                                 **{m: modes[m]["ppl"] for m in ("top1", "topk", "adaptive", "arrow", "oracle", "base")},
                                 "arrow_experts_per_token": modes["arrow"]["experts_per_token"]})
                    checks[f"top1 below base {label} k={k} f={f:g}"] = modes["top1"]["ppl"] < modes["base"]["ppl"]
                    if args.json:  # what is measured so far survives an interrupted run
                        args.json.write_text(json.dumps({"partial": True, "rows": rows, "references": refs,
                                                         "checks": checks}, indent=2))
                    print(f"[{time.perf_counter() - started:6.0f} s] {label} k={k} f={f:g}: top1 "
                          f"{modes['top1']['ppl']:.2f} dense {refs[f'dense {label}']:.2f}", file=sys.stderr, flush=True)
    finally:
        hub.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started
    print_rows(args, rows, refs, checks, wall)
    if args.plot:
        plot(args.plot, rows, refs, target_sets, fractions)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "references": refs, "checks": checks, "cluster_seconds": cluster_s,
                                         "wall_seconds": wall}, indent=2))
    for name, ok in checks.items():
        if not ok:
            print(f"check {name}: {met(ok)}")
    return exit_code(checks.values())


def print_rows(args: argparse.Namespace, rows: list[dict], refs: dict, checks: dict, wall: float) -> None:
    def f2(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    print(f"ablation (Brown, {args.max_files} files; T = {args.total_tokens} training tokens per configuration "
          f"in steps of 2 x {args.seq_len} tokens; "
          f"{args.eval_docs} held-out documents x {args.eval_seq_len} tokens; base {refs['base']:.2f})")
    head = ["targets", "k", "seed f", "top1", "topk", "adaptive", "arrow", "oracle", "best/dense", "route acc",
            "temp", "train s"]
    print("  ".join(f"{h:>10}" for h in head))
    for r in rows:
        dense = refs[f"dense {r['targets']}"]
        best = min(r.get(m) or float("inf") for m in ("top1", "topk", "adaptive", "arrow"))
        cells = [r["targets"][:10], r["k"], "-" if r["f"] is None else f"{r['f']:g}", f2(r.get("top1")),
                 f2(r.get("topk")), f2(r.get("adaptive")), f2(r.get("arrow")), f2(r.get("oracle")),
                 f"x{best / dense:.3f}", f2(r.get("routing_accuracy")), f2(r.get("temperature")),
                 f"{r['train_s']:.0f}"]
        print("  ".join(f"{c!s:>10}" for c in cells))
    for name, value in refs.items():
        print(f"reference {name}: {value:.2f}")
    print(f"checks: {sum(ok is True for ok in checks.values())}/{len(checks)} met; wall {wall / 60:.1f} min")


def plot(path: Path, rows: list[dict], refs: dict, target_sets: list[tuple], fractions: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(target_sets), figsize=(6 * len(target_sets), 4.2), squeeze=False)
    for ax, targets in zip(axes[0], target_sets, strict=True):
        label = "+".join(targets)
        for f in fractions:
            pts = sorted((r["k"], r["top1"], r.get("topk")) for r in rows if r["targets"] == label and r["f"] == f)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"seed {f:g}, top1")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", linestyle=":", alpha=0.7,
                    label=f"seed {f:g}, topk")
        dense = refs[f"dense {label}"]
        ax.axhline(dense, color="black", linestyle="--", label=f"dense LoRA (k=1) {dense:.2f}")
        ax.scatter([1], [dense], color="black", zorder=3)
        ax.axhline(refs["base"], color="grey", linestyle=":", label=f"base {refs['base']:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("topics k (equal total training tokens)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"LoRA on {label}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
