"""Routing, pulling, verifying and loading experts, with the real embedder and the local Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd

from moin_hub import Registry, Router, errors, load_expert, pull, push_expert
from moin_hub.hub.config import ADAPTER_WEIGHTS_FILENAME
from tests._helpers import QUERIES
from tests.test_registry import run_python

TOPICS = ("cooking", "football", "astronomy")


@pytest.fixture
def three_topics(hub, registry_id, make_expert) -> str:
    """A registry holding one expert per test topic."""
    for topic in TOPICS:
        push_expert(make_expert(topic), registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-{topic}",
                    endpoint=hub.url)
    return registry_id


def test_route_each_topic_to_its_expert(hub, three_topics):
    router = Router.from_registry(three_topics, endpoint=hub.url)
    for topic, query in QUERIES.items():
        result = router.route(query, k=3)
        assert result.best.expert.expert_id == topic, (query, result.to_dict())
        assert len(result.routes) == 3 and result.routes[0].similarity > result.routes[1].similarity
        assert result.registry_revision == router.registry.revision


def test_route_errors(hub, registry_id, three_topics):
    router = Router.from_registry(three_topics, endpoint=hub.url)
    with pytest.raises(errors.EmptyQueryError):
        router.route("  ")
    empty = Router.from_registry(_fresh_registry(hub), endpoint=hub.url)
    with pytest.raises(errors.ExpertNotFoundError, match="empty"):
        empty.route("anything")


def _fresh_registry(hub) -> str:
    from moin_hub import init_registry
    from tests.conftest import BASE_REPO, EMBEDDER_REPO

    init_registry("test-org/empty-registry", base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url,
                  exist_ok=True)
    return "test-org/empty-registry"


def test_pull_downloads_only_the_routed_expert_into_the_hf_cache(hub, three_topics, hf_home):
    result = pull(QUERIES["astronomy"], registry=three_topics, endpoint=hub.url)
    assert result.expert.expert_id == "astronomy"
    assert result.path.is_relative_to(hf_home) and (result.path / ADAPTER_WEIGHTS_FILENAME).is_file()
    assert result.expert.revision in str(result.path)  # the pinned snapshot
    cached = {p.name for p in (hf_home / "hub").iterdir()}
    expert_repos = {name for name in cached if name.startswith("models--test-org--")}
    assert expert_repos == {f"models--test-org--{three_topics[-8:]}-astronomy", "models--test-org--all-MiniLM-L6-v2"}


def test_pull_to_local_dir_and_by_expert_id(hub, three_topics, tmp_path):
    result = pull(registry=three_topics, expert="football", local_dir=tmp_path / "fb", endpoint=hub.url)
    assert result.path == tmp_path / "fb" and result.route is None
    assert sorted(p.name for p in result.path.iterdir() if p.is_file()) == sorted(result.expert.digests)


def test_pull_uses_the_pinned_commit_not_the_moving_branch(hub, api, three_topics):
    registry = Registry.load(three_topics, endpoint=hub.url)
    record = registry.get("cooking")
    api.create_commit(record.repo_id, [CommitOperationAdd(ADAPTER_WEIGHTS_FILENAME, b"moved branch")],
                      commit_message="someone pushes over the expert")
    result = pull(QUERIES["cooking"], registry=three_topics, endpoint=hub.url)
    assert result.expert.revision == record.revision
    assert (result.path / ADAPTER_WEIGHTS_FILENAME).read_bytes() != b"moved branch"


def test_tampered_adapter_is_refused_without_loading(hub, three_topics, tmp_path):
    registry = Registry.load(three_topics, endpoint=hub.url)
    record = registry.get("football")
    first = pull(registry=registry, expert="football", endpoint=hub.url)
    weights = first.path / ADAPTER_WEIGHTS_FILENAME
    # tamper with the file the Hub serves for the pinned commit (a compromised or broken server)
    blob = hub.blob_path(record.repo_id, record.revision, ADAPTER_WEIGHTS_FILENAME)
    original = Path(blob).read_bytes()
    try:
        Path(blob).write_bytes(original[:-4] + b"evil")
        cached_blob = weights.resolve()
        weights.unlink()  # drop the cached copy so that the client fetches it again
        cached_blob.unlink()
        with pytest.raises(errors.IntegrityError, match="Hash mismatch") as info:
            pull(registry=registry, expert="football", endpoint=hub.url)
        assert info.value.path == ADAPTER_WEIGHTS_FILENAME and info.value.repo_id == record.repo_id
    finally:
        Path(blob).write_bytes(original)


def test_corrupt_cache_is_healed_by_one_redownload(hub, three_topics):
    first = pull(registry=three_topics, expert="cooking", endpoint=hub.url)
    weights = (first.path / ADAPTER_WEIGHTS_FILENAME).resolve()
    weights.write_bytes(b"bit rot")
    again = pull(registry=three_topics, expert="cooking", endpoint=hub.url)
    assert (again.path / ADAPTER_WEIGHTS_FILENAME).read_bytes() != b"bit rot"


def test_expert_repo_gone(hub, api, three_topics):
    registry = Registry.load(three_topics, endpoint=hub.url)
    record = registry.get("astronomy")
    api.delete_repo(record.repo_id)
    with pytest.raises(errors.ExpertNotFoundError, match="gone"):
        pull(registry=registry, expert="astronomy", endpoint=hub.url)


def test_load_expert_applies_the_adapter(hub, three_topics):
    import torch

    result = pull(QUERIES["cooking"], registry=three_topics, endpoint=hub.url)
    model, tokenizer = load_expert(result, return_tokenizer=True)
    assert type(model).__name__.startswith("Peft") and model.active_adapter == "moin__cooking"
    inputs = tokenizer("Knead the dough", return_tensors="pt")
    with torch.no_grad():
        expert_logits = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
    assert not torch.allclose(expert_logits, base_logits)  # the adapter changes the output


@pytest.mark.e2e
def test_plain_peft_loads_a_pushed_expert_without_moin_hub(hub, three_topics, tmp_path):
    registry = Registry.load(three_topics, endpoint=hub.url)
    record = registry.get("astronomy")
    base = registry.manifest.base_model
    proc = run_python(f"""
        import json, sys
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        from huggingface_hub import ModelCard
        base = AutoModelForCausalLM.from_pretrained({base.repo_id!r}, revision={base.revision!r})
        model = PeftModel.from_pretrained(base, {record.repo_id!r}, revision={record.revision!r})
        card = ModelCard.load({record.repo_id!r})
        print(json.dumps({{"peft": type(model).__name__, "has_moin": "moin_hub" in sys.modules,
                           "metrics": [r.metric_type for r in card.data.eval_results]}}))
    """, hub.url, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"peft": "PeftModelForCausalLM", "has_moin": False, "metrics": ["perplexity", "perplexity"]}
