"""N pushers racing on one registry: every acknowledged expert is in the index exactly once."""

from __future__ import annotations

import concurrent.futures

import pytest

from moin_hub import Registry, push_expert, remove_expert
from moin_hub.errors import ExpertNotFoundError
from tests import _helpers
from tests.conftest import BASE_REPO
from tests.reliability._tools import consistency_problems, race_pushes, subprocess_env


def _race(n, hub, registry_id, expert_dirs, tmp_path):
    folders = expert_dirs(n)
    repos = [f"test-org/race{n}-{registry_id[-8:]}-{i}" for i in range(n)]
    acknowledged, failures = race_pushes(folders, registry_id, repos, subprocess_env(hub.url, tmp_path / "home"))
    assert not failures, failures[0]
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert sorted(r.expert_id for r in registry) == sorted(a["expert_id"] for a in acknowledged)
    for ack in acknowledged:  # the row pins exactly the commit the pusher was told about
        assert registry.get(ack["expert_id"]).revision == ack["revision"]
    assert consistency_problems(registry_id, hub.url, tmp_path) == []


@pytest.mark.e2e
@pytest.mark.parametrize("n", [2, 8])
def test_racing_pushers_lose_nothing(n, hub, registry_id, expert_dirs, tmp_path):
    _race(n, hub, registry_id, expert_dirs, tmp_path)


@pytest.mark.slow
def test_thirty_two_racing_pushers_lose_nothing(hub, registry_id, expert_dirs, tmp_path):
    _race(32, hub, registry_id, expert_dirs, tmp_path)


@pytest.mark.slow
def test_thirty_two_racing_pushers_into_ten_thousand_experts_lose_nothing(hub, registry_id, expert_dirs, tmp_path):
    """Format v2 at size: each push writes one delta shard, so 412 retries stay cheap; no write is lost."""
    from moin_hub.hub.compaction import write_rows
    from tests._synthetic import clustered, synthetic_table

    write_rows(registry_id, synthetic_table(clustered(10_000, clusters=300, seed=7)), endpoint=hub.url)
    folders = expert_dirs(32)
    repos = [f"test-org/big-race-{registry_id[-8:]}-{i}" for i in range(32)]
    acknowledged, failures = race_pushes(folders, registry_id, repos, subprocess_env(hub.url, tmp_path / "home"))
    assert not failures, failures[0]
    assert len(acknowledged) == 32
    lazy = Registry.load(registry_id, endpoint=hub.url, lazy=True)
    assert len(lazy) == 10_032  # counted from the ids file and the delta shards
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert len(registry) == 10_032 and len({r.repo_id for r in registry}) == 10_032
    for ack in acknowledged:  # the row pins exactly the commit the pusher was told about
        assert registry.get(ack["expert_id"]).revision == ack["revision"]


def test_update_replaces_the_row_and_removal_is_conflict_safe(hub, registry_id, expert_dirs, tmp_path, tiny_base,
                                                              embedder):
    folders = expert_dirs(6)
    retrained = _helpers.write_expert(tmp_path / "e0-v2", tiny_base, embedder, "cooking", base_repo=BASE_REPO,
                                      expert_id="e0", seed=99)  # new weights for e0
    repos = [f"test-org/rm-{registry_id[-8:]}-{i}" for i in range(6)]
    for folder, repo in zip(folders[:3], repos[:3], strict=True):
        push_expert(folder, registry=registry_id, repo_id=repo, endpoint=hub.url)
    first = Registry.load(registry_id, endpoint=hub.url).get("e0").revision

    # at once, in threads: re-push e0 (an update), push e3..e5, remove e1 and e2
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(push_expert, retrained, registry=registry_id, repo_id=repos[0], endpoint=hub.url)]
        jobs += [pool.submit(push_expert, folders[i], registry=registry_id, repo_id=repos[i], endpoint=hub.url)
                 for i in (3, 4, 5)]
        jobs += [pool.submit(remove_expert, f"e{i}", registry=registry_id, endpoint=hub.url) for i in (1, 2)]
        results = [job.result(timeout=120) for job in jobs]
    registry = Registry.load(registry_id, endpoint=hub.url)
    assert sorted(r.expert_id for r in registry) == ["e0", "e3", "e4", "e5"]
    updated = registry.get("e0").revision
    assert updated != first and updated == results[0].revision  # the row was replaced, not duplicated

    with pytest.raises(ExpertNotFoundError):
        remove_expert("e1", registry=registry_id, endpoint=hub.url)
    removed = remove_expert(repos[3], registry=registry_id, delete_repo=True, endpoint=hub.url)
    assert removed.expert_id == "e3" and removed.n_experts == 3 and removed.repo_deleted
    assert not any(m.id == repos[3] for m in hub_models(hub))


def hub_models(hub):
    from huggingface_hub import HfApi

    return list(HfApi(endpoint=hub.url).list_models(author="test-org"))
