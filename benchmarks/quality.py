"""Quality of MoIN experts on the Brown Corpus: base vs routed vs oracle vs dense, in one run.

Stated configuration (the defaults below; change them with the flags):
    base SmolLM2-135M-Instruct (dequantized Q4_1, bf16 autocast where the CPU is fast at it), embedder
    all-MiniLM-L6-v2, Brown Corpus: --max-files balanced over the 8 genre groups, 200-word documents, 20% of
    the files of each group held out; k-means into --k topics; LoRA r=8 (--target-modules, default q_proj,
    v_proj), alpha 16, lr 1e-3, 256-token blocks, batch 2, --tokens-per-expert per topic. Branch-train:
    --seed-fraction (default: moin-hub's, 0.75) of the total goes to one shared seed LoRA, each expert
    continues from it on its topic. The dense baseline is one LoRA on all topics with exactly the same total
    tokens (k x --tokens-per-expert). Routing is scored with the first 32 words of each held-out document as
    the query, in each routing mode (top1, topk and adaptive with k=3, the temperature calibrated on the
    training documents' queries, mass 0.8; arrow: per-token mixing, top-3).

Targets (moin_hub.pipeline.report.TARGETS; printed as met / NOT met, exit 1 when one is missed): routed
<= 0.90 x base, routed <= 1.02 x oracle, routed <= 1.00 x dense (blocks of the held-out files), top1 <= 1.00 x
dense (each document alone), genre-group routing accuracy > 0.80.

It also measures the parallel-training speed-up: the same --ratio-experts small experts trained with
``--workers 1`` and with ``--workers 2`` (model loading included, as a user sees it).

Everything runs against a local Hub server in a temporary folder, exactly as the demo does.
Prints one table; ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import exit_code, met, print_table


def _mode_rows(overall: dict) -> list[tuple[str, str]]:
    """One row per routing mode and reference the evaluation scored, each document alone on the same tokens."""
    rows = []
    modes = overall.get("modes", {})
    base = (modes.get("base") or {}).get("ppl")  # each document alone, its first seq_len tokens, as the modes
    for mode, m in modes.items():
        if m["ppl"] is None or mode == "base":
            continue
        per_token = (f", {m['experts_per_token']:.2f} experts per token and layer"
                     if m.get("experts_per_token") is not None else "")
        rows.append((f"{mode} perplexity (documents alone)",
                     f"{m['ppl']:.3f}  (x{m['ppl'] / base:.3f} of base {base:.3f} on the same tokens; "
                     f"{m['mean_experts']:.2f} experts per document{per_token})"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-files", type=int, default=100)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--tokens-per-expert", type=int, default=24_576,
                        help="Tokens per topic; the dense baseline gets k x this, as the seed and experts together.")
    parser.add_argument("--seed-fraction", type=float, default=None,
                        help="Share of the total for the shared seed (default: moin-hub's train default; 0: MoIN).")
    parser.add_argument("--target-modules", default="q_proj,v_proj", help="LoRA targets, or 'all-linear'.")
    parser.add_argument("--modes", default="top1,topk,adaptive,arrow", help="Routing modes scored.")
    parser.add_argument("--eval-docs-per-topic", type=int, default=20)
    parser.add_argument("--ratio-experts", type=int, default=4)
    parser.add_argument("--ratio-tokens", type=int, default=8_192)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None,
                        help="Keep the workspace (DIR/work) and the local Hub's data (DIR/hub) in this folder; a rerun "
                             "with the same DIR reuses them: no new clustering, finished training is not redone.")
    parser.add_argument("--no-speedup", action="store_true", help="Skip the workers 2 vs 1 speed-up runs.")
    parser.add_argument("--threads-per-expert", type=int, default=None,
                        help="Fix torch threads per expert in the speed-up runs (default: cores // workers).")
    parser.add_argument("--only-speedup", action="store_true",
                        help="Measure only the workers 2 vs 1 speed-up (on a 24-file slice).")
    args = parser.parse_args()

    from huggingface_hub import HfApi

    from moin_hub.hub.assets import publish_default_assets
    from moin_hub.local_hub.server import LocalHub
    from moin_hub.pipeline.jobs import TrainConfig
    from moin_hub.pipeline.report import check_targets, evaluate
    from moin_hub.pipeline.steps import (
        base_model_dir,
        cluster,
        load_corpus,
        make_jobs,
        resolve_models,
        train,
    )
    from moin_hub.pipeline.train import TRAINING_FILENAME, train_experts
    from moin_hub.pipeline.workspace import Workspace

    root = args.keep or Path(tempfile.mkdtemp(prefix="moin-bench-"))
    work = root / "work"
    hub = LocalHub(root / "hub").start()
    try:
        assets = publish_default_assets(HfApi(endpoint=hub.url))
        base, embedder = resolve_models(assets["base_model"][0], assets["embedder"][0], endpoint=hub.url)
        if args.only_speedup:
            args.max_files, args.k = 24, max(args.k, args.ratio_experts)
        train_docs, heldout, info = load_corpus("brown", max_files=args.max_files)
        t0 = time.perf_counter()
        if (work / "moin_workspace.json").is_file():  # --keep DIR of an earlier run
            workspace = Workspace.load(work)
        else:
            workspace = cluster(work, train_docs, heldout, base_model=base, embedder=embedder, k=args.k,
                                corpus_info=info, endpoint=hub.url, progress=False)
        cluster_s = time.perf_counter() - t0
        report = trained = None
        if not args.only_speedup:
            seed = {} if args.seed_fraction is None else {"seed_fraction": args.seed_fraction}
            config = TrainConfig(rank=8, alpha=16, learning_rate=1e-3, batch_size=2,
                                 target_modules=tuple(args.target_modules.split(",")),
                                 tokens_per_expert=args.tokens_per_expert, eval_max_tokens=4096, **seed)
            trained = train(work, config, workers=2, dense=True, endpoint=hub.url, progress=False)
            report = evaluate(work, endpoint=hub.url, max_docs_per_topic=args.eval_docs_per_topic, plots=False,
                              modes=tuple(args.modes.split(",")))

        seconds, per_expert = {}, {}
        # the parallel-training speed-up: the same small experts (no held-out scoring), 1 vs 2 workers
        jobs = [type(j)(j.expert_id, texts=j.texts, centroid=j.centroid) for j in make_jobs(work)[: args.ratio_experts]]
        small = TrainConfig(rank=8, alpha=16, learning_rate=1e-3, batch_size=2, tokens_per_expert=args.ratio_tokens,
                            torch_threads=args.threads_per_expert)
        kw = {"base_model_dir_or_loader": str(base_model_dir(workspace, endpoint=hub.url)),
              "base_model_id": base.repo_id, "base_revision": base.revision, "progress": False}
        for workers in () if args.no_speedup else (1, 2):
            shutil.rmtree(root / f"ratio-{workers}", ignore_errors=True)  # measured afresh, also under --keep
            t0 = time.perf_counter()
            folders = train_experts(jobs, root / f"ratio-{workers}", small, workers=workers, **kw)
            seconds[workers] = time.perf_counter() - t0
            per_expert[workers] = [json.loads((f / TRAINING_FILENAME).read_text())["seconds"] for f in folders]
    finally:
        hub.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    speedup = [] if not seconds else [
        ("workers 2 vs 1 speed-up", f"x{seconds[1] / seconds[2]:.2f}  ({args.ratio_experts} experts x {args.ratio_tokens} "
                                    f"tokens, loading included: {seconds[1]:.0f} s vs {seconds[2]:.0f} s)"),
        ("training seconds per expert", f"{sum(per_expert[1]) / len(per_expert[1]):.1f} s with 1 worker, "
                                        f"{sum(per_expert[2]) / len(per_expert[2]):.1f} s with 2 workers "
                                        f"(threads per expert: {args.threads_per_expert or 'cores // workers'})"),
    ]
    rows, targets = [], None
    if report is not None:
        overall = report["perplexity"]["overall"]
        routing = report["routing"]
        metrics = workspace.clustering["metrics"]
        training = report["training"]
        per_expert_q = [t["seconds"] for i, t in training.items() if i not in ("dense", "seed")]
        targets = check_targets(report)
        ratio = targets["measured"]
        ok = {name: "not measured" if v is None else met(v) for name, v in targets["met"].items()}
        budget = trained["budget"]
        calibration = report.get("calibration") or {}
        rows = [
            ("configuration", f"{args.max_files} Brown files, k={args.k}, {args.tokens_per_expert} tokens/topic, "
                              f"LoRA r=8 {args.target_modules}, lr 1e-3, batch 2x256; seed {budget['seed_tokens']} + "
                              f"{budget['topics']} x {budget['expert_tokens']} = dense {budget['dense_tokens']} tokens"),
            ("held-out tokens scored", f"{overall['base_tokens']} (from {routing['documents']} held-out documents)"),
            ("base perplexity", f"{overall['base_ppl']:.3f}"),
            ("routed-expert perplexity", f"{overall['routed_ppl']:.3f}  (x{ratio['routed_vs_base']:.3f} of base; "
                                         f"target <= 0.90: {ok['routed_vs_base']})"),
            ("oracle-expert perplexity", f"{overall['oracle_ppl']:.3f}  (routed/oracle x{ratio['routed_vs_oracle']:.3f}; "
                                         f"target <= 1.02: {ok['routed_vs_oracle']})"),
            ("dense-baseline perplexity", f"{overall['dense_ppl']:.3f}  (routed/dense x{ratio['routed_vs_dense']:.3f}; "
                                          f"target <= 1.00: {ok['routed_vs_dense']})"),
            *_mode_rows(overall),
            ("top1 / dense (documents alone)", f"x{ratio['top1_vs_dense'] or float('nan'):.3f}  (target <= 1.00: "
                                               f"{ok['top1_vs_dense']})"),
            ("mixing temperature", f"{calibration.get('temperature', float('nan')):.4g} (calibrated on "
                                   f"{calibration.get('queries', 0)} training queries)"),
            ("topics worse than base", ", ".join(targets["topics_worse_than_base"]) or "none"),
            ("routing accuracy, topic level", f"{routing['topic_accuracy']:.3f}"),
            ("routing accuracy, genre-group level", f"{routing['label_accuracy']:.3f}  (target > 0.80: "
                                                    f"{ok['label_accuracy']})"),
            ("cluster purity / NMI (genre groups)", f"{metrics.get('purity', float('nan')):.3f} / "
                                                    f"{metrics.get('nmi', float('nan')):.3f}"),
            ("training seconds (training.json)", f"{sum(per_expert_q) / max(1, len(per_expert_q)):.1f} s per expert "
                                                f"(2 workers), seed {training.get('seed', {}).get('seconds', 0):.0f} s, "
                                                f"dense {training.get('dense', {}).get('seconds', 0):.0f} s"),
        ]
    rows += speedup
    print_table("quality (Brown)", rows)
    if args.json:
        args.json.write_text(json.dumps({"report": report, "workers_seconds": seconds, "per_expert_seconds": per_expert,
                                         "cluster_seconds": cluster_s, "targets": targets}, indent=2, default=str))
    return exit_code(ok for ok in (targets["met"].values() if targets else ()) if ok is not None)


if __name__ == "__main__":
    sys.exit(main())
