"""Bring your own adapter: `moin-hub register` a LoRA repo of the Hub, pinned at its commit, checked as a push."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd

from moin_hub import Registry, Router, errors, pull
from moin_hub.cli import cli
from moin_hub.pipeline.register import read_examples, register_adapter
from tests import _helpers
from tests.conftest import BASE_REPO


def _upload_adapter(api, folder, repo_id: str, **extra: bytes) -> str:  # noqa: ANN001
    api.create_repo(repo_id, exist_ok=True)
    operations = [CommitOperationAdd(name, str(folder / name))
                  for name in ("adapter_config.json", "adapter_model.safetensors")]
    operations += [CommitOperationAdd(name, data) for name, data in extra.items()]
    return api.create_commit(repo_id, operations, commit_message="someone's LoRA").oid


def test_register_a_lora_from_the_hub(hub, api, registry_id, make_expert, tmp_path):
    folder = make_expert("astronomy", expert_id="astro-src", seed=3)
    sha = _upload_adapter(api, folder, "someone-else/lora-astronomy")
    texts = _helpers.TOPIC_TEXTS["astronomy"] * 2
    examples = tmp_path / "astronomy.jsonl"
    examples.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = CliRunner().invoke(cli, ["register", "someone-else/lora-astronomy", "--registry", registry_id,
                                   "--examples", str(examples), "--seq-len", "16", "--endpoint", hub.url,
                                   "--format", "json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["revision"] == sha and result["expert_id"] == "lora-astronomy" and result["lora_rank"] > 0
    assert result["perplexity"] > 0 and result["base_perplexity"] > 0 and result["n_heldout"] >= 2
    row = Registry.load(registry_id, endpoint=hub.url).get("lora-astronomy")
    assert row.revision == sha and row.sim_mean is not None and set(row.digests) == {
        "adapter_config.json", "adapter_model.safetensors"}
    router = Router.from_registry(registry_id, endpoint=hub.url)
    assert router.route(_helpers.QUERIES["astronomy"]).best.expert.expert_id == "lora-astronomy"
    pulled = pull(registry=registry_id, expert="lora-astronomy", endpoint=hub.url, local_dir=tmp_path / "pulled")
    assert pulled.expert.revision == sha and (pulled.path / "adapter_model.safetensors").exists()


def test_register_refuses_what_a_push_refuses(hub, api, registry_id, make_expert, tmp_path, tiny_base, embedder):
    examples = tmp_path / "cooking.txt"
    examples.write_text("\n".join(_helpers.TOPIC_TEXTS["cooking"]) + "\n")
    folder = make_expert("cooking", expert_id="cook-src")
    _upload_adapter(api, folder, "someone-else/lora-pickled", **{"training_args.bin": b"pickle"})
    with pytest.raises(errors.UnsafeFileError):
        register_adapter("someone-else/lora-pickled", registry=registry_id, examples=read_examples(examples),
                         endpoint=hub.url)
    other = _helpers.write_expert(tmp_path / "other", tiny_base, embedder, "cooking",
                                  base_repo="someone/another-base", expert_id="other")
    _upload_adapter(api, other, "someone-else/lora-other-base")
    with pytest.raises(errors.BaseModelMismatchError):
        register_adapter("someone-else/lora-other-base", registry=registry_id, examples=read_examples(examples),
                         endpoint=hub.url)
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert len(registry) == 0 and registry.manifest.base_model.repo_id == BASE_REPO
