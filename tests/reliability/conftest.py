"""Fixtures of the reliability suite: faults cleared after every test, few retries, expert folders."""

from __future__ import annotations

import pytest

from tests import _helpers
from tests.conftest import BASE_REPO


@pytest.fixture(autouse=True)
def no_leftover_faults(hub):
    """Faults injected by a test never leak into the next one."""
    yield
    hub.clear_faults()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Three attempts per Hub operation (the default is 6), so that persistent faults fail fast."""
    monkeypatch.setenv("MOIN_HUB_ATTEMPTS", "3")
    import moin_hub.hub.retry as retry

    monkeypatch.setattr(retry, "backoff", lambda attempt, **_: 0.05 * (attempt + 1))


@pytest.fixture
def expert_dirs(tmp_path, tiny_base, embedder):
    """Factory: ``expert_dirs(n, topic="cooking")`` writes ``n`` distinct expert folders ``e0 .. e{n-1}``."""

    def factory(n: int, topic: str = "cooking", prefix: str = "e") -> list:
        return [_helpers.write_expert(tmp_path / "experts" / f"{prefix}{i}", tiny_base, embedder, topic,
                                      base_repo=BASE_REPO, expert_id=f"{prefix}{i}", seed=i) for i in range(n)]

    return factory
