"""Faults injected by the local Hub: push and pull either complete or fail clearly, never leaving a row that
points at a missing or half-written expert; a killed push leaves a consistent registry and can be rerun."""

from __future__ import annotations

import re
import signal
import time

import pytest

from moin_hub import Registry, pull, push_expert
from moin_hub.errors import HubUnavailableError, RegistryConflictError
from tests.reliability._tools import consistency_problems, start_push, subprocess_env

#: (kind, options) of the transient faults; each strikes twice, then the Hub behaves again.
TRANSIENT = {
    "503": ("status", {"status": 503}),
    "500": ("status", {"status": 500}),
    "429": ("status", {"status": 429}),
    "drop": ("drop", {}),
    "drop_after": ("drop_after", {}),
    "slow": ("delay", {"seconds": 0.3}),
}


def targets(registry_id: str, repo_id: str) -> dict[str, tuple[str, str]]:
    """(method, path regex) of the requests a push makes."""
    reg, repo = re.escape(registry_id), re.escape(repo_id)
    return {
        "expert-commit": ("POST", rf"^/api/models/{repo}/commit/"),
        "expert-preupload": ("POST", rf"^/api/models/{repo}/preupload/"),
        "registry-read": ("GET", rf"^/datasets/{reg}/resolve/"),
        "registry-commit": ("POST", rf"^/api/datasets/{reg}/commit/"),
    }


def repo_for(registry_id: str, name: str) -> str:
    return f"test-org/f-{registry_id[-8:]}-{name}"


@pytest.mark.parametrize("fault", sorted(TRANSIENT))
@pytest.mark.parametrize("target", ["expert-commit", "expert-preupload", "registry-read", "registry-commit"])
def test_push_survives_transient_faults(fault, target, hub, registry_id, expert_dirs, tmp_path):
    folder = expert_dirs(1)[0]
    repo = repo_for(registry_id, "x")
    kind, options = TRANSIENT[fault]
    method, path = targets(registry_id, repo)[target]
    injected = hub.inject_fault(method, path, kind, times=2, **options)
    result = push_expert(folder, registry=registry_id, repo_id=repo, endpoint=hub.url)
    # the fault really struck. A slow answer is waited for, not retried; after a lost answer the commit had
    # landed, so the retry needs no second commit
    if fault == "slow":
        assert injected.hits >= 1
    else:
        assert injected.hits == (1 if fault == "drop_after" and target.endswith("commit") else 2)
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert [r.expert_id for r in registry] == ["e0"] and registry.get("e0").revision == result.revision
    assert consistency_problems(registry_id, hub.url, tmp_path) == []


@pytest.mark.parametrize("fault", ["503", "drop"])
@pytest.mark.parametrize("target", ["expert-commit", "registry-commit"])
def test_push_under_a_persistent_fault_fails_clearly_and_can_be_rerun(fault, target, hub, registry_id, expert_dirs,
                                                                       tmp_path):
    folder = expert_dirs(1)[0]
    repo = repo_for(registry_id, "y")
    kind, options = TRANSIENT[fault]
    before = Registry.load(registry_id, endpoint=hub.url).revision
    hub.inject_fault(*targets(registry_id, repo)[target], kind, times=None, **options)
    with pytest.raises(HubUnavailableError, match="The Hub failed 3 time") as caught:
        push_expert(folder, registry=registry_id, repo_id=repo, endpoint=hub.url)
    assert caught.value.attempts == 3 and caught.value.hint
    hub.clear_faults()
    assert Registry.load(registry_id, endpoint=hub.url).revision == before  # no row was written
    assert consistency_problems(registry_id, hub.url, tmp_path) == []
    result = push_expert(folder, registry=registry_id, repo_id=repo, endpoint=hub.url)  # rerun: completes
    assert Registry.load(registry_id, endpoint=hub.url).get("e0").revision == result.revision


def test_a_412_storm_is_retried_or_fails_without_writing(hub, registry_id, expert_dirs, tmp_path):
    first, second = expert_dirs(2)
    commit = targets(registry_id, "")["registry-commit"]
    storm = hub.inject_fault(*commit, "status", status=412, times=5)
    push_expert(first, registry=registry_id, repo_id=repo_for(registry_id, "a"), endpoint=hub.url)
    assert storm.hits == 5
    before = Registry.load(registry_id, endpoint=hub.url).revision
    hub.inject_fault(*commit, "status", status=412, times=None)
    with pytest.raises(RegistryConflictError):
        push_expert(second, registry=registry_id, repo_id=repo_for(registry_id, "b"), endpoint=hub.url,
                    max_retries=4)
    hub.clear_faults()
    assert Registry.load(registry_id, endpoint=hub.url).revision == before
    assert consistency_problems(registry_id, hub.url, tmp_path) == []


@pytest.fixture
def pushed(hub, registry_id, expert_dirs) -> str:
    push_expert(expert_dirs(1)[0], registry=registry_id, repo_id=repo_for(registry_id, "p"), endpoint=hub.url)
    return registry_id


@pytest.mark.parametrize("fault", ["503", "429", "drop", "slow"])
def test_pull_retries_transient_faults(fault, hub, pushed, tmp_path):
    kind, options = TRANSIENT[fault]
    injected = hub.inject_fault("GET", r"/resolve/[0-9a-f]{40}/adapter_model\.safetensors", kind, times=2,
                                **options)
    result = pull(expert="e0", registry=pushed, endpoint=hub.url, local_dir=tmp_path / "pulled")
    assert injected.hits == (1 if fault == "slow" else 2) and (result.path / "adapter_model.safetensors").is_file()


def test_pull_under_a_persistent_fault_fails_clearly_then_succeeds(hub, pushed, tmp_path):
    hub.inject_fault("GET", r"/resolve/[0-9a-f]{40}/adapter_model\.safetensors", "status", status=503, times=None)
    with pytest.raises(HubUnavailableError, match="adapter_model.safetensors"):
        pull(expert="e0", registry=pushed, endpoint=hub.url, local_dir=tmp_path / "pulled")
    hub.clear_faults()
    result = pull(expert="e0", registry=pushed, endpoint=hub.url, local_dir=tmp_path / "pulled")
    assert (result.path / "adapter_model.safetensors").is_file()


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["expert-commit", "registry-commit"])
def test_a_push_killed_mid_way_leaves_a_consistent_registry(target, hub, registry_id, expert_dirs, tmp_path):
    folder = expert_dirs(1)[0]
    repo = repo_for(registry_id, "k")
    stall = hub.inject_fault(*targets(registry_id, repo)[target], "delay", seconds=3.0, times=1)
    proc = start_push(folder, registry_id, repo, subprocess_env(hub.url, tmp_path / "home"))
    deadline = time.monotonic() + 120
    while stall.hits == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stall.hits == 1, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)  # killed while its request is in flight
    proc.wait(timeout=30)
    time.sleep(3.5)  # the stalled request finishes on the server side (or not): both must be consistent
    assert consistency_problems(registry_id, hub.url, tmp_path) == []
    rows = [r.repo_id for r in Registry.load(registry_id, endpoint=hub.url)]
    assert rows in ([], [repo])  # never half: either registered completely or not at all
    result = push_expert(folder, registry=registry_id, repo_id=repo, endpoint=hub.url)  # the rerun completes
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert [r.repo_id for r in registry] == [repo] and registry.get("e0").revision == result.revision
    assert consistency_problems(registry_id, hub.url, tmp_path) == []


def test_pull_survives_a_client_timeout(hub, pushed, tmp_path, monkeypatch):
    """A response slower than the client's timeout (1 s here) is abandoned and retried."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    stall = hub.inject_fault("GET", r"/resolve/[0-9a-f]{40}/adapter_model\.safetensors", "delay", seconds=2.5,
                             times=1)
    start = time.monotonic()
    result = pull(expert="e0", registry=pushed, endpoint=hub.url, local_dir=tmp_path / "pulled")
    assert stall.hits == 1 and (result.path / "adapter_model.safetensors").is_file()
    assert time.monotonic() - start < 2.4  # it did not wait for the stalled answer
