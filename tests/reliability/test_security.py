"""Only safetensors, never remote code, tokens never shown, and no one writes where they don't belong."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from moin_hub import Registry, init_registry, pull, push_expert
from tests.conftest import BASE_REPO, EMBEDDER_REPO
from tests.test_cli import invoke

PACKAGE = Path(__file__).resolve().parents[2] / "moin_hub"


def test_no_remote_code_and_no_pickle_loading_anywhere_in_the_package():
    source = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    assert not re.search(r"trust_remote_code\s*=\s*True", source)
    assert not re.search(r"\btorch\.load\(|\bpickle\.loads?\(|allow_pickle\s*=\s*True", source)
    assert "use_safetensors=True" in source


@pytest.fixture
def locked(hub):
    """A namespace writable only with its token, holding a registry."""
    namespace = f"locked{uuid.uuid4().hex[:6]}"
    secret = f"hf_{uuid.uuid4().hex}"
    hub.add_token(namespace, secret)
    registry_id = f"{namespace}/registry"
    init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url, token=secret)
    return namespace, secret, registry_id


def test_pushing_without_the_namespace_token_is_refused_and_changes_nothing(hub, locked, expert_dirs, tmp_path):
    namespace, secret, registry_id = locked
    folder = expert_dirs(1)[0]
    before = Registry.load(registry_id, endpoint=hub.url).revision
    for token in (None, "hf_wrong"):
        with pytest.raises(HfHubHTTPError) as refused:  # the registry row cannot be written
            push_expert(folder, registry=registry_id, repo_id=f"test-org/sec-{namespace}", endpoint=hub.url,
                        token=token)
        assert refused.value.response.status_code in (401, 403)
        with pytest.raises(HfHubHTTPError):  # nor an expert repo in the locked namespace
            push_expert(folder, registry=registry_id, repo_id=f"{namespace}/expert", endpoint=hub.url, token=token)
    assert Registry.load(registry_id, endpoint=hub.url).revision == before
    assert not HfApi(endpoint=hub.url).repo_exists(f"{namespace}/expert")
    # the owner can
    push_expert(folder, registry=registry_id, repo_id=f"{namespace}/expert", endpoint=hub.url, token=secret)
    assert len(Registry.load(registry_id, endpoint=hub.url)) == 1


def test_tokens_never_appear_in_output_errors_or_cards(hub, locked, expert_dirs, tmp_path, caplog):
    namespace, secret, registry_id = locked
    folder = expert_dirs(1)[0]
    outputs = []
    code, out, err = invoke("push-expert", str(folder), "--registry", registry_id, "--repo-id", f"{namespace}/e",
                            "--endpoint", hub.url, "--token", secret, "--format", "json")
    assert code == 0, err
    outputs += [out, err]
    for args in (["push-expert", str(folder), "--registry", registry_id, "--repo-id", f"{namespace}/f"],
                 ["pull", "--registry", f"{namespace}/nope", "--query", "bread"],
                 ["route", "--registry", registry_id, "--query", ""]):
        code, out, err = invoke(*args, "--endpoint", hub.url, "--token", secret[:-1] + "x")
        assert code == 1 and err.startswith("Error:")  # a wrong token: refused with one clear line
        outputs += [out, err]
        code, out, err = invoke(*args, "--endpoint", hub.url, "--token", secret)
        outputs += [out, err]
    registry = Registry.load(registry_id, endpoint=hub.url, token=secret)
    card = HfApi(endpoint=hub.url).hf_hub_download(f"{namespace}/e", "README.md", revision=registry.get("e0").revision)
    pulled = pull(expert="e0", registry=registry, token=secret, local_dir=tmp_path / "p")
    texts = [*outputs, Path(card).read_text(), caplog.text, repr(registry), repr(pulled),
             *(p.read_text(errors="replace") for p in pulled.path.iterdir() if p.suffix in (".json", ".md"))]
    assert all(secret not in text and secret[3:20] not in text for text in texts)
