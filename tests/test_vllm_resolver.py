"""The vLLM resolver plugin's verification, without vLLM: its resolve function against the local Hub.

The real vLLM server with the plugin is in ``tests/test_vllm_e2e.py`` (slow, e2e).
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path

import pytest

from moin_hub import Registry, push_expert
from moin_hub.errors import BaseModelMismatchError, HubUnavailableError, IntegrityError
from moin_hub.hub.client import sha256_file
from moin_hub.hub.config import ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME
from moin_hub.serving import vllm_resolver
from moin_hub.serving.vllm_resolver import MoinRegistryResolver, register, resolver_from_env
from tests.reliability.test_integrity import _register_by_hand
from tests.test_registry import run_python

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_experts(hub, registry_id, make_expert) -> str:
    """A registry with two experts: cooking and football."""
    for topic in ("cooking", "football"):
        push_expert(make_expert(topic), registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-{topic}",
                    endpoint=hub.url)
    return registry_id


def test_resolves_an_expert_by_id_and_by_repo_id_to_its_verified_pinned_folder(hub, two_experts):
    resolver = MoinRegistryResolver(two_experts, endpoint=hub.url)
    record = Registry.load(two_experts, endpoint=hub.url).get("football")
    by_id = resolver.resolve("football")
    by_repo = resolver.resolve(record.repo_id)
    assert by_id.expert == by_repo.expert == record
    assert by_id.path == by_repo.path and record.revision in str(by_id.path)  # the pinned commit's snapshot
    for digest in record.files:  # exactly the bytes the registry recorded
        assert sha256_file(by_id.path / digest.path) == digest.sha256
    assert by_id.name == "football" and by_repo.name == record.repo_id
    assert by_id.registry_id == two_experts and by_id.lora_int_id == by_repo.lora_int_id > 0


def test_a_name_the_registry_does_not_hold_is_left_to_other_resolvers(hub, two_experts):
    resolver = MoinRegistryResolver(two_experts, endpoint=hub.url)
    assert resolver.resolve("astronomy") is None
    assert resolver.lookup("test-org/no-such-repo") is None
    assert resolver.lookup("cooking").expert_id == "cooking"


def test_a_tampered_adapter_is_refused_before_any_path_is_returned(hub, two_experts):
    resolver = MoinRegistryResolver(two_experts, endpoint=hub.url)
    record = resolver.lookup("cooking")
    blob = Path(hub.blob_path(record.repo_id, record.revision, ADAPTER_WEIGHTS_FILENAME))
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-4] + b"evil")  # the Hub now serves other bytes for the pinned commit
        with pytest.raises(IntegrityError, match="Hash mismatch") as info:
            resolver.resolve("cooking")
        assert info.value.repo_id == record.repo_id and info.value.path == ADAPTER_WEIGHTS_FILENAME
        assert isinstance(info.value, ValueError)  # vLLM answers ValueErrors with 400 and their message
    finally:
        blob.write_bytes(original)
    assert resolver.resolve("cooking").expert == record  # the intact adapter resolves again


def test_an_adapter_made_for_another_base_model_is_refused(hub, two_experts, make_expert):
    folder = make_expert("astronomy", expert_id="foreign")
    config = json.loads((folder / ADAPTER_CONFIG_FILENAME).read_text())
    (folder / ADAPTER_CONFIG_FILENAME).write_text(json.dumps({**config, "base_model_name_or_path": "evil/base"}))
    _register_by_hand(hub, two_experts, folder, f"test-org/{two_experts[-8:]}-foreign")
    resolver = MoinRegistryResolver(two_experts, endpoint=hub.url)
    with pytest.raises(BaseModelMismatchError, match="evil/base"):
        resolver.resolve("foreign")


def test_a_pinned_registry_revision_is_kept_and_the_head_is_followed_otherwise(hub, two_experts, make_expert):
    pinned_at = Registry.load(two_experts, endpoint=hub.url).revision
    pinned = MoinRegistryResolver(two_experts, revision=pinned_at, endpoint=hub.url)
    following = MoinRegistryResolver(two_experts, endpoint=hub.url)
    assert pinned.lookup("cooking") and following.lookup("cooking")
    push_expert(make_expert("astronomy"), registry=two_experts, repo_id=f"test-org/{two_experts[-8:]}-astronomy",
                endpoint=hub.url)
    assert pinned.resolve("astronomy") is None and pinned.registry().revision == pinned_at
    assert following.resolve("astronomy").expert.expert_id == "astronomy"


def test_a_hub_outage_keeps_the_registry_read_last(hub, two_experts, monkeypatch):
    import moin_hub.hub.retry as retry

    monkeypatch.setenv("MOIN_HUB_ATTEMPTS", "2")
    monkeypatch.setattr(retry, "backoff", lambda attempt, **_: 0.01)
    resolver = MoinRegistryResolver(two_experts, endpoint=hub.url)
    first = resolver.resolve("cooking")
    fault = hub.inject_fault("GET", f"/api/datasets/{two_experts}", status=503, times=None)
    try:
        again = resolver.resolve("cooking")  # the head is unreadable: the registry read last, the cached files
        assert fault.hits >= 2 and again.expert == first.expert and again.path == first.path
        with pytest.raises(HubUnavailableError):  # a resolver that never read the registry has nothing to keep
            MoinRegistryResolver(two_experts, endpoint=hub.url).resolve("cooking")
    finally:
        hub.clear_faults()


def test_configuration_comes_from_the_environment():
    assert resolver_from_env({}) is None and resolver_from_env({"MOIN_REGISTRY": "  "}) is None
    resolver = resolver_from_env({"MOIN_REGISTRY": "acme/reg", "MOIN_REGISTRY_REVISION": "v1"})
    assert (resolver.registry_id, resolver.revision) == ("acme/reg", "v1")
    assert resolver_from_env({"MOIN_REGISTRY": "acme/reg", "MOIN_REGISTRY_REVISION": ""}).revision is None
    with pytest.raises(ValueError, match="MOIN_REGISTRY"):
        resolver_from_env({"MOIN_REGISTRY": "not a repo id"})


def test_register_does_nothing_without_moin_registry(monkeypatch):
    monkeypatch.delenv("MOIN_REGISTRY", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # any vLLM import would raise ImportError
    assert register() is None


def _fake_vllm(monkeypatch) -> dict:
    """vLLM's two modules the plugin uses, recording what it registers (for tests without vLLM)."""
    registered: dict = {}

    class LoRARequest:  # the fields the plugin sets, as vllm.lora.request.LoRARequest has them
        def __init__(self, lora_name: str, lora_int_id: int, lora_path: str = ""):
            assert lora_int_id > 0 and lora_path
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class LoRAResolver:
        @classmethod
        def register(cls, subclass):
            registered["abc"] = subclass

    class Registry:
        @staticmethod
        def register_resolver(name, resolver):
            registered[name] = resolver

    modules = {"vllm": types.ModuleType("vllm"), "vllm.lora": types.ModuleType("vllm.lora"),
               "vllm.lora.request": types.ModuleType("vllm.lora.request"),
               "vllm.lora.resolver": types.ModuleType("vllm.lora.resolver")}
    modules["vllm.lora.request"].LoRARequest = LoRARequest
    modules["vllm.lora.resolver"].LoRAResolver = LoRAResolver
    modules["vllm.lora.resolver"].LoRAResolverRegistry = Registry
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return registered


def test_register_and_resolve_lora_speak_vllms_interface(hub, two_experts, monkeypatch):
    registered = _fake_vllm(monkeypatch)
    monkeypatch.setenv("MOIN_REGISTRY", two_experts)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    register()
    resolver = registered[vllm_resolver.RESOLVER_NAME]
    assert registered["abc"] is MoinRegistryResolver and resolver.registry_id == two_experts
    request = asyncio.run(resolver.resolve_lora("/models/base", "cooking"))
    assert request.lora_name == "cooking" and (Path(request.lora_path) / ADAPTER_WEIGHTS_FILENAME).is_file()
    assert asyncio.run(resolver.resolve_lora("/models/base", "no-such-expert")) is None


def test_importing_and_resolving_loads_no_model_library(hub, two_experts, tmp_path):
    proc = run_python(f"""
        import json, sys
        import moin_hub.serving.vllm_resolver as plugin
        after_import = sorted(sys.modules)
        resolved = plugin.MoinRegistryResolver({two_experts!r}).resolve("cooking")
        heavy = ("torch", "faiss", "sentence_transformers", "transformers", "peft", "vllm")
        print(json.dumps({{"import": [m for m in (*heavy, "pyarrow", "moin_hub.hub.pull") if m in after_import],
                           "resolve": [m for m in heavy if m in sys.modules],
                           "ok": (resolved.path / "adapter_model.safetensors").is_file()}}))
    """, hub.url, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # importing (what vLLM does in every process) loads not even the Hub modules; resolving loads no model library
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"import": [], "resolve": [], "ok": True}


def test_the_entry_point_is_declared_for_vllms_general_plugins():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {"moin_hub": "moin_hub.serving.vllm_resolver:register"}
