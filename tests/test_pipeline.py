"""The pipeline end to end through the CLI: cluster -> train -> evaluate -> push-all -> route.

The fast test runs on the tiny Llama and three small topics through the session's local Hub; the
`slow` one runs `moin-hub demo` on the real base model and a small Brown slice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moin_hub import Registry, Router
from moin_hub.errors import MoinHubError
from moin_hub.pipeline.report import check_targets, format_report, routing_scores
from moin_hub.pipeline.steps import load_corpus
from moin_hub.pipeline.workspace import Workspace
from tests._helpers import QUERIES
from tests._tiny import TOPIC_TEXTS
from tests.conftest import BASE_REPO, EMBEDDER_REPO
from tests.test_cli import invoke

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_corpus(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for topic, texts in TOPIC_TEXTS.items():
            for i, text in enumerate(texts):
                f.write(json.dumps({"id": f"{topic}-{i}", "text": text, "label": topic}) + "\n")
    return path


def run_json(*args: str) -> dict:
    code, out, err = invoke(*args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_cluster_train_evaluate_push_route(hub, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    work = tmp_path / "work"
    hubopts = ("--endpoint", hub.url)
    clustered = run_json("cluster", str(work), "--corpus", str(corpus), "--k", "3", "--base-model", BASE_REPO,
                         "--embedder", EMBEDDER_REPO, "--heldout-fraction", "0.3", *hubopts)
    assert clustered["k"] == 3 and sum(clustered["sizes"]) == clustered["train_documents"]
    assert clustered["metrics"]["purity"] == 1.0  # three clearly different topics, found exactly
    workspace = Workspace.load(work)
    assert workspace.base_model.repo_id == BASE_REPO and len(workspace.base_model.revision) == 40
    assert workspace.embedder.dim == 384

    train_args = ("train", str(work), "--seq-len", "16", "--batch-size", "2", "--tokens-per-expert", "512",
                  "--rank", "4", "--lr", "5e-3", "--dense", *hubopts)
    trained = run_json(*train_args)
    assert sorted(trained["experts"]) == ["topic-00", "topic-01", "topic-02"]
    assert sorted(trained["trained"]) == sorted(trained["experts"]) and trained["dense"]
    assert trained["seed"] and trained["budget"]["seed_fraction"] == 0.75  # branch-train is the default
    again = run_json(*train_args)  # resumable: nothing is retrained
    assert again["trained"] == []

    report = run_json("evaluate", str(work), "--seq-len", "16", *hubopts)
    topics = report["perplexity"]["topics"]
    assert set(topics) <= {"topic-00", "topic-01", "topic-02"} and topics
    for scores in topics.values():
        assert scores["oracle_ppl"] < scores["base_ppl"]  # each expert learned its topic
        assert scores["dense_ppl"] is not None and scores["routed_ppl"] is not None
    labels = report["routing"]["topic_labels"]
    assert sorted(labels.values()) == sorted(TOPIC_TEXTS)  # one topic per label
    assert report["targets"]["measured"]["routed_vs_base"] < 1
    assert set(report["training"]) == {"topic-00", "topic-01", "topic-02", "dense", "seed"}
    assert all(t["seconds"] > 0 and t["tokens"] > 0 for t in report["training"].values())
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((work / "report.json").read_text()) == report
    modes = report["perplexity"]["overall"]["modes"]
    assert list(modes) == ["top1", "topk", "adaptive", "arrow", "base", "oracle", "dense", "seed"]
    assert report["perplexity"]["mixing"]["k"] == 3
    assert len({m["tokens"] for m in modes.values()}) == 1  # every mode scores the same tokens
    assert modes["top1"]["mean_experts"] == 1 and modes["topk"]["mean_experts"] >= modes["adaptive"]["mean_experts"]
    assert 1 <= modes["adaptive"]["mean_experts"] <= 3 and all(m["tokens"] > 0 for m in modes.values())
    assert all(list(s["modes"]) == list(modes) for s in topics.values())
    text = format_report(report).splitlines()
    assert [line.split()[1] for line in text if line.startswith("Mode ")] == list(modes)
    calibration = report["calibration"]  # not given: calibrated on the training documents' queries
    assert report["perplexity"]["mixing"]["temperature"] == calibration["temperature"] > 0
    assert calibration["queries"] == clustered["train_documents"]
    assert 0 < modes["arrow"]["experts_per_token"] <= 3 and modes["arrow"]["mean_experts"] == 3
    assert all(modes[row]["ppl"] < modes["base"]["ppl"] for row in ("oracle", "dense", "seed"))
    assert report["targets"]["measured"]["top1_vs_dense"] == pytest.approx(modes["top1"]["ppl"] / modes["dense"]["ppl"],
                                                                          abs=1e-4)
    for scores in topics.values():  # each topic says whether its routed documents did worse than the base
        assert scores["worse_than_base"] == (scores["routed_ppl"] > scores["base_ppl"]
                                             or scores["modes"]["top1"]["ppl"] > scores["modes"]["base"]["ppl"])
    assert report["targets"]["topics_worse_than_base"] == sorted(t for t, v in topics.items() if v["worse_than_base"])
    only = run_json("evaluate", str(work), "--seq-len", "16", "--modes", "topk,top1", "-k", "1", "--no-plots",
                    *hubopts)["perplexity"]["overall"]["modes"]
    assert list(only) == ["topk", "top1", "base", "oracle", "dense", "seed"]
    assert only["topk"]["ppl"] == only["top1"]["ppl"] == modes["top1"]["ppl"]

    registry_id = "test-org/pipeline-registry"
    pushed = run_json("push-all", str(work), "--registry", registry_id, "--namespace", "test-org", *hubopts)
    assert len(pushed["experts"]) == 3
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert len(registry) == 3
    assert registry.manifest.base_model == workspace.base_model
    assert all(row.perplexity is not None and row.base_perplexity is not None for row in registry.experts)
    from huggingface_hub import HfApi

    files = HfApi(endpoint=hub.url).list_repo_files(registry_id, repo_type="dataset")
    assert {"plots/perplexity_per_expert.png", "plots/topic_map.png"} <= set(files)  # the card shows the plots

    # trained experts carry their topic's similarity statistics, so routes report a calibrated score
    assert all(row.sim_mean is not None and row.sim_std > 0 for row in registry.experts)
    router = Router(registry)
    by_label = {label: expert for expert, label in labels.items()}
    for topic, query in QUERIES.items():
        best = router.route(query).best
        assert best.expert.expert_id == by_label[topic]
        assert best.score == pytest.approx((best.similarity - best.expert.sim_mean) / best.expert.sim_std)

    # a later registry write (here a removal) keeps the plots in the re-rendered card
    from huggingface_hub import hf_hub_download

    from moin_hub import remove_expert

    remove_expert("topic-02", registry=registry_id, endpoint=hub.url)
    card = Path(hf_hub_download(registry_id, "README.md", repo_type="dataset", endpoint=hub.url)).read_text()
    assert "plots/topic_map.png" in card and "topic-02" not in card.split("## ")[1]


def test_branch_train_through_the_cli(hub, tmp_path):
    """train --seed-fraction: a seed, experts branched from it, seed + experts = dense in tokens; a rerun with
    another fraction is refused in one line; evaluate scores the seed beside the modes on the same tokens."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    work = tmp_path / "work"
    hubopts = ("--endpoint", hub.url)
    run_json("cluster", str(work), "--corpus", str(corpus), "--k", "3", "--base-model", BASE_REPO,
             "--embedder", EMBEDDER_REPO, "--heldout-fraction", "0.3", *hubopts)
    common = ("train", str(work), "--seq-len", "16", "--batch-size", "2", "--tokens-per-expert", "256",
              "--rank", "4", "--lr", "5e-3", "--dense", *hubopts)
    trained = run_json(*common, "--seed-fraction", "0.5")
    budget = trained["budget"]
    assert budget == {"topics": 3, "tokens_per_step": 32, "seed_steps": 12, "expert_steps": 4, "dense_steps": 24,
                      "seed_tokens": 384, "expert_tokens": 128, "dense_tokens": 768, "seed_fraction": 0.5}
    records = {name: json.loads((Path(folder) / "training.json").read_text())
               for name, folder in [*trained["experts"].items(), ("seed", trained["seed"]), ("dense", trained["dense"])]}
    assert sum(r["tokens"] for name, r in records.items() if name != "dense") == records["dense"]["tokens"] == 768
    seed_sha = records["topic-00"]["seed"]["sha256"]
    assert all(records[e]["seed"]["sha256"] == seed_sha for e in trained["experts"])
    code, out, err = invoke(*common, "--seed-fraction", "0.25")
    assert code == 1 and "seed_fraction: 0.5 -> 0.25" in err and "Traceback" not in err
    message, hint, debug = err.strip().splitlines()  # the error, what to do, where the traceback is
    assert message.startswith("Error: ") and "Remove " in hint and debug == "(set MOIN_DEBUG=1 for the traceback)"
    report = run_json("evaluate", str(work), "--seq-len", "16", "--modes", "top1", "--no-plots", *hubopts)
    modes = report["perplexity"]["overall"]["modes"]
    assert list(modes) == ["top1", "base", "oracle", "dense", "seed"]
    assert len({m["tokens"] for m in modes.values()}) == 1
    assert set(report["training"]) == {"topic-00", "topic-01", "topic-02", "dense", "seed"}


def test_workspace_errors_are_clear(tmp_path):
    with pytest.raises(MoinHubError, match="not a moin-hub workspace"):
        Workspace.load(tmp_path)
    code, _, err = invoke("evaluate", str(tmp_path))
    assert code == 1 and "not a moin-hub workspace" in err and "moin-hub cluster" in err
    assert "Traceback" not in err


def test_corpus_split_keeps_sources_apart(tmp_path):
    train, heldout, info = load_corpus(str(write_corpus(tmp_path / "c.jsonl")), heldout_fraction=0.3)
    assert train and heldout and not {d.doc_id for d in train} & {d.doc_id for d in heldout}
    assert info["split_by"] in ("source", "document")
    assert load_corpus(str(tmp_path / "c.jsonl"), heldout_fraction=0.3)[1] == heldout  # deterministic
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_corpus(str(tmp_path / "c.jsonl"), heldout_fraction=1.0)


def test_routing_scores_and_targets():
    train = [{"topic": 0, "label": "a"}, {"topic": 0, "label": "a"}, {"topic": 1, "label": "b"}]
    held = [{"topic": 0, "routed": 0, "label": "a"}, {"topic": 1, "routed": 0, "label": "b"},
            {"topic": 1, "routed": 1, "label": "a"}]
    scores = routing_scores(train, held)
    assert scores["topic_accuracy"] == pytest.approx(2 / 3)
    assert scores["label_accuracy"] == pytest.approx(1 / 3)  # only the first lands on a topic of its label
    assert scores["topic_labels"] == {"topic-00": "a", "topic-01": "b"}
    report = {"perplexity": {"overall": {"base_ppl": 20.0, "routed_ppl": 17.0, "oracle_ppl": 16.9,
                                         "dense_ppl": None},
                             "topics": {"topic-00": {"worse_than_base": False}, "topic-01": {"worse_than_base": True}}},
              "routing": {"label_accuracy": 0.85}}
    targets = check_targets(report)
    assert targets["measured"]["routed_vs_base"] == 0.85 and targets["met"]["routed_vs_base"] is True
    assert targets["met"]["routed_vs_oracle"] is True and targets["met"]["routed_vs_dense"] is None
    assert targets["met"]["top1_vs_dense"] is None and targets["met"]["label_accuracy"] is True
    assert targets["topics_worse_than_base"] == ["topic-01"]
    report["perplexity"]["overall"].update(dense_ppl=16.0, modes={"top1": {"ppl": 15.0}, "dense": {"ppl": 16.0}})
    targets = check_targets(report)
    assert targets["measured"]["routed_vs_dense"] == 1.0625 and targets["met"]["routed_vs_dense"] is False
    assert targets["measured"]["top1_vs_dense"] == 0.9375 and targets["met"]["top1_vs_dense"] is True


@pytest.mark.slow
def test_demo_runs_the_real_pipeline_on_brown(tmp_path):
    """`moin-hub demo` on a small Brown slice with the real SmolLM2 base and MiniLM embedder."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moin_hub", "demo", "--out", str(tmp_path / "demo"), "--max-files", "16",
         "--k", "2", "--tokens-per-expert", "2048", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    report = json.loads(Path(summary["report"]).read_text())
    overall = report["perplexity"]["overall"]
    assert overall["routed_ppl"] < overall["base_ppl"]  # even 2k tokens of training helps on held-out files
    assert len(summary["answers"]) == 3
    for answer in summary["answers"]:
        assert answer["route"]["expert"]["expert_id"] in ("topic-00", "topic-01")
        assert answer["perplexity"] < answer["base_perplexity"]
        assert len(answer["verified_files"]) == 4
