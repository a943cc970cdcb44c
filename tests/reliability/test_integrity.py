"""What is pulled is exactly what was published for this registry's base model, or it is refused."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from moin_hub import Registry, load_expert, pull, push_expert
from moin_hub.errors import BaseModelMismatchError, MoinHubError, UnsafeFileError
from moin_hub.hub.push import _commit_expert
from moin_hub.hub.registry import file_digest, update_registry, upsert_expert
from tests.reliability._tools import consistency_problems


def _register_by_hand(hub, registry_id, folder, repo_id) -> str:
    """Commit an expert folder and register it WITHOUT push_expert's checks (a careless or hostile writer)."""
    api = HfApi(endpoint=hub.url)
    api.create_repo(repo_id, exist_ok=True)
    commit = _commit_expert(api, repo_id, folder, b"---\nlibrary_name: peft\n---\n", message="by hand",
                            max_retries=3)
    template = Registry.load(registry_id, endpoint=hub.url).experts[0]
    files = tuple(file_digest(folder / f.path, f.path) for f in template.files)
    record = type(template)(**{**template.to_dict(), "expert_id": folder.name, "repo_id": repo_id,
                               "revision": commit.oid, "files": files})
    update_registry(registry_id, upsert_expert(record), endpoint=hub.url, commit_message="by hand")
    return commit.oid


@pytest.fixture
def registry_with_one(hub, registry_id, expert_dirs):
    push_expert(expert_dirs(1, prefix="good")[0], registry=registry_id, repo_id=f"test-org/i-{registry_id[-8:]}-ok",
                endpoint=hub.url)
    return registry_id


def test_a_row_pointing_at_another_base_model_is_refused(hub, registry_with_one, expert_dirs):
    folder = expert_dirs(1, prefix="other")[0]
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "evil/base"}))
    _register_by_hand(hub, registry_with_one, folder, f"test-org/i-{registry_with_one[-8:]}-other")
    with pytest.raises(BaseModelMismatchError, match="evil/base"):
        pull(expert="other0", registry=registry_with_one, endpoint=hub.url)


def test_a_pickle_in_the_expert_repo_is_refused(hub, registry_with_one, expert_dirs, tmp_path):
    folder = expert_dirs(1, prefix="pkl")[0]
    repo = f"test-org/i-{registry_with_one[-8:]}-pkl"
    _register_by_hand(hub, registry_with_one, folder, repo)
    api = HfApi(endpoint=hub.url)
    commit = api.create_commit(repo, [CommitOperationAdd("pytorch_model.bin", b"\x80\x04\x95pickle")],
                               commit_message="a pickle appears")
    record = Registry.load(registry_with_one, endpoint=hub.url).get("pkl0")
    moved = type(record)(**{**record.to_dict(), "revision": commit.oid})  # hashes still match: only the pickle
    update_registry(registry_with_one, upsert_expert(moved), endpoint=hub.url, commit_message="pin it")
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
        pull(expert="pkl0", registry=registry_with_one, endpoint=hub.url, local_dir=tmp_path / "x")
    problems = consistency_problems(registry_with_one, hub.url, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("pkl0: UnsafeFileError")


def test_an_adapter_whose_weights_match_no_layer_is_refused(hub, registry_with_one, expert_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = expert_dirs(1, prefix="void")[0]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    # same tensors under names no module has: PEFT only warns and keeps its own initial LoRA values
    save_file({key.replace("self_attn", "no_such_block"): value for key, value in weights.items()},
              str(folder / "adapter_model.safetensors"))
    _register_by_hand(hub, registry_with_one, folder, f"test-org/i-{registry_with_one[-8:]}-void")
    pulled = pull(expert="void0", registry=registry_with_one, endpoint=hub.url, local_dir=tmp_path / "v")
    with pytest.raises(MoinHubError, match="none of its 8 LoRA tensors"):
        load_expert(pulled)
    good = pull(expert="good0", registry=registry_with_one, endpoint=hub.url, local_dir=tmp_path / "g")
    assert type(load_expert(good)).__name__ == "PeftModelForCausalLM"
