"""Registry and push-expert against the local Hub, with the real huggingface_hub client over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from moin_hub import Registry, errors, init_registry, push_expert
from moin_hub.hub.client import sha256_file
from moin_hub.hub.config import MANIFEST_FILENAME, VERIFIED_EXPERT_FILES
from tests.conftest import BASE_REPO, EMBEDDER_REPO

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, hub_url: str, tmp_path: Path, *, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with HF_ENDPOINT set before anything imports huggingface_hub."""
    env = {**os.environ, "HF_ENDPOINT": hub_url, "HF_HOME": str(tmp_path / "sub_hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}  # net guard kept
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_init_registry_pins_base_and_embedder(hub, api, registry_id):
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert len(registry) == 0
    assert registry.manifest.base_model.repo_id == BASE_REPO
    assert registry.manifest.base_model.revision == api.model_info(BASE_REPO).sha
    assert registry.manifest.embedder.revision == api.model_info(EMBEDDER_REPO).sha
    assert registry.manifest.embedder.dim == 384  # read from the embedder's config files
    files = set(api.list_repo_files(registry_id, repo_type="dataset"))
    assert {MANIFEST_FILENAME, "data/cell-00000.parquet", "index/ids.parquet", "README.md"} <= files  # format v2
    # exist_ok returns the same registry, without it the second init is refused
    again = init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url, exist_ok=True)
    assert again.revision == registry.revision
    with pytest.raises(errors.MoinHubError, match="already exists"):
        init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url)


def test_unknown_registry_and_base_model(hub):
    with pytest.raises(errors.RegistryNotFoundError):
        Registry.load("test-org/no-such-registry", endpoint=hub.url)
    with pytest.raises(errors.MoinHubError, match="base model"):
        init_registry("test-org/r-x", base_model="test-org/missing", embedder=EMBEDDER_REPO, endpoint=hub.url)


def test_push_expert_one_commit_card_and_row(hub, api, registry_id, make_expert):
    folder = make_expert("cooking")
    assert not api.repo_exists("test-org/expert-cooking")
    result = push_expert(folder, registry=registry_id, repo_id="test-org/expert-cooking", endpoint=hub.url)
    commits = api.list_repo_commits("test-org/expert-cooking")
    # the Hub's "initial commit" of a new repo, then exactly one commit with all files and the card
    assert [c.title for c in commits][1:] == ["initial commit"]
    assert len(commits) == 2 and commits[0].commit_id == result.revision
    files = set(api.list_repo_files("test-org/expert-cooking", revision=result.revision))
    assert files >= {*VERIFIED_EXPERT_FILES, "README.md"}

    registry = Registry.load(registry_id, endpoint=hub.url)
    assert registry.revision == result.registry_revision and len(registry) == 1
    row = registry.get("cooking")
    assert row.repo_id == "test-org/expert-cooking" and row.revision == result.revision
    assert row.digests["adapter_model.safetensors"] == sha256_file(folder / "adapter_model.safetensors")
    assert row.lora_rank == 4 and row.target_modules == ("q_proj", "v_proj")
    assert len(row.centroid) == 384 and row.perplexity == 10.5

    # ModelCard.load(repo_id) has no endpoint argument: fetch README.md with the Hub client, parse it as the Hub does
    readme = hf_hub_download("test-org/expert-cooking", "README.md", revision=result.revision, endpoint=hub.url)
    card = ModelCard.load(readme)
    assert card.data.base_model == BASE_REPO and card.data.library_name == "peft"
    assert "moin" in card.data.tags and f"moin-registry:{registry_id}" in card.data.tags
    metrics = card.data.eval_results
    assert {m.metric_name: m.metric_value for m in metrics} == {"Perplexity (expert)": 10.5,
                                                                "Perplexity (base model)": 14.25}
    text = str(card)
    assert "\n\n\n" not in text
    assert "PeftModel.from_pretrained" in text and "moin-hub pull" in text and "Knead the bread" in text

    # the expert is browsable on the Hub by registry tag
    found = [m.id for m in api.list_models(filter=f"moin-registry:{registry_id}")]
    assert found == ["test-org/expert-cooking"]


def test_push_update_replaces_row(hub, registry_id, make_expert):
    folder = make_expert("cooking")
    first = push_expert(folder, registry=registry_id, repo_id="test-org/cook-upd", endpoint=hub.url)
    meta = json.loads((folder / "moin_expert.json").read_text())
    (folder / "moin_expert.json").write_text(json.dumps({**meta, "perplexity": 9.0}))
    second = push_expert(folder, registry=registry_id, repo_id="test-org/cook-upd", endpoint=hub.url)
    commits = HfApi(endpoint=hub.url).list_repo_commits("test-org/cook-upd")
    assert [c.commit_id for c in commits[:2]] == [second.revision, first.revision]  # one commit per push
    assert len(commits) == 3  # initial commit + two pushes
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert len(registry) == 1 and second.revision != first.revision
    assert registry.get("cooking").revision == second.revision and registry.get("cooking").perplexity == 9.0


def test_push_refuses_bad_experts_without_writing(hub, api, registry_id, make_expert, tmp_path):
    head = api.dataset_info(registry_id).sha
    folder = make_expert("football")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "other/base"}))
    with pytest.raises(errors.BaseModelMismatchError, match="other/base"):
        push_expert(folder, registry=registry_id, repo_id="test-org/bad-1", endpoint=hub.url)

    wrong_dim = make_expert("astronomy")
    from moin_hub.hub.expert import write_centroid

    write_centroid(wrong_dim / "centroid.safetensors", [1.0] * 10)
    with pytest.raises(errors.EmbedderMismatchError, match="384"):
        push_expert(wrong_dim, registry=registry_id, repo_id="test-org/bad-2", endpoint=hub.url)

    pickled = make_expert("cooking")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(errors.UnsafeFileError, match="pickle"):
        push_expert(pickled, registry=registry_id, repo_id="test-org/bad-3", endpoint=hub.url)

    with pytest.raises(errors.InvalidExpertError, match="missing"):
        push_expert(tmp_path, registry=registry_id, repo_id="test-org/bad-4", endpoint=hub.url)
    assert api.dataset_info(registry_id).sha == head  # nothing half-written
    assert not api.repo_exists("test-org/bad-1")


def test_expert_id_collision_is_refused(hub, registry_id, make_expert):
    push_expert(make_expert("cooking"), registry=registry_id, repo_id="test-org/cook-a", endpoint=hub.url)
    with pytest.raises(errors.MoinHubError, match="already taken"):
        push_expert(make_expert("cooking"), registry=registry_id, repo_id="test-org/cook-b", endpoint=hub.url)


def test_registry_loads_with_plain_datasets_and_pandas(hub, registry_id, make_expert, tmp_path):
    for topic in ("cooking", "football"):
        push_expert(make_expert(topic), registry=registry_id, repo_id=f"test-org/ds-{topic}", endpoint=hub.url)
    proc = run_python(f"""
        import json
        import pandas as pd
        import datasets
        from datasets import load_dataset
        # datasets itself, not moin-hub, asks two more hosts (the net guard refuses them): the dataset viewer at
        # datasets-server.<endpoint host> (no setting turns it off) and a download counter on s3.amazonaws.com
        datasets.config.USE_PARQUET_EXPORT = False
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        ds = load_dataset({registry_id!r}, split="train")
        df = pd.read_parquet("hf://datasets/{registry_id}/data")  # format v2: every shard under data/
        print(json.dumps({{"n": len(ds), "ids": sorted(ds["expert_id"]), "dim": len(ds[0]["centroid"]),
                           "pandas": sorted(df["expert_id"])}}))
    """, hub.url, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"n": 2, "ids": ["cooking", "football"], "dim": 384, "pandas": ["cooking", "football"]}


@pytest.mark.e2e
def test_eight_processes_pushing_at_once_lose_no_row(hub, registry_id, make_expert, tmp_path):
    from tests.reliability._tools import race_pushes, subprocess_env

    folders = [make_expert("cooking", expert_id=f"e{i}", seed=i) for i in range(8)]
    results, failures = race_pushes(folders, registry_id, [f"test-org/race-{i}" for i in range(8)],
                                    subprocess_env(hub.url, tmp_path / "procs_hf_home"), timeout=300)
    assert not failures, failures[0]
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert sorted(r.expert_id for r in registry) == sorted(f"e{i}" for i in range(8))
    for result in results:
        assert registry.get(result["expert_id"]).revision == result["revision"]
