"""Registry format v2: sharded rows, pushes that write one delta shard, compaction, v1 migration, cells."""

from __future__ import annotations

import numpy as np
import pytest
from huggingface_hub import HfApi

from moin_hub import Registry, Router, init_registry
from moin_hub.cli import cli
from moin_hub.hub import shards
from moin_hub.hub.compaction import compact_registry, migrate_registry, write_rows
from moin_hub.hub.config import EXPERTS_FILENAME, ExpertRecord
from moin_hub.hub.registry import remove_expert_rows, update_registry, upsert_expert
from tests._synthetic import DIM, clustered, synthetic_table, unit
from tests.conftest import BASE_REPO, EMBEDDER_REPO


def record(expert_id: str, vector: np.ndarray, repo: str | None = None, revision: str = "d" * 40) -> ExpertRecord:
    return ExpertRecord(expert_id=expert_id, repo_id=repo or f"test-org/{expert_id}", revision=revision,
                        centroid=tuple(vector.tolist()))


def files_with_oids(api: HfApi, registry_id: str) -> dict[str, str]:
    return {e.path: e.blob_id for e in api.list_repo_tree(registry_id, repo_type="dataset", recursive=True)
            if hasattr(e, "blob_id")}


def test_pushes_into_a_big_registry_write_one_delta_shard(hub, api, registry_id, monkeypatch):
    monkeypatch.setattr(shards, "SMALL_REGISTRY_ROWS", 8)  # 40 rows count as "big" here
    vectors = clustered(44, seed=1)
    write_rows(registry_id, synthetic_table(vectors[:40]), endpoint=hub.url)
    before = files_with_oids(api, registry_id)

    # a new expert: one delta shard, nothing else changes (not the card, not the cells, not the ids file)
    added = update_registry(registry_id, upsert_expert(record("new-a", vectors[40])), commit_message="add",
                            endpoint=hub.url)
    after = files_with_oids(api, registry_id)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed == {shards.delta_path(record("new-a", vectors[40]))} and set(before) <= set(after)
    assert len(added) == 41 and not added.loaded  # counted from the ids file and the file list

    # update a compacted row: its cell is rewritten without it, a tombstone and a delta are added
    update_registry(registry_id, upsert_expert(record("s00003", vectors[41], repo="test-org/s00003",
                                                      revision="e" * 40)), commit_message="update", endpoint=hub.url)
    # a repo registered under another id is refused without reading every row
    with pytest.raises(Exception, match="already registered"):
        update_registry(registry_id, upsert_expert(record("other", vectors[42], repo="test-org/s00005")),
                        commit_message="dup", endpoint=hub.url)
    update_registry(registry_id, remove_expert_rows("new-a"), commit_message="rm delta", endpoint=hub.url)
    update_registry(registry_id, remove_expert_rows("test-org/s00007"), commit_message="rm cell", endpoint=hub.url)
    files = set(files_with_oids(api, registry_id))
    assert f"{shards.REMOVED_DIR}/s00003" in files and f"{shards.REMOVED_DIR}/s00007" in files
    assert not any("new-a" in f for f in files)

    registry = Registry.load(registry_id, endpoint=hub.url)
    ids = [r.expert_id for r in registry]
    assert len(ids) == 39 and "s00007" not in ids and "new-a" not in ids
    assert registry.get("s00003").revision == "e" * 40
    assert len(Registry.load(registry_id, endpoint=hub.url, lazy=True)) == 39

    result = compact_registry(registry_id, endpoint=hub.url)
    assert result.committed and result.n_experts == 39 and result.n_cells == 1
    files = set(files_with_oids(api, registry_id))
    assert not any(f.startswith((shards.DELTA_PREFIX, shards.REMOVED_DIR)) for f in files)
    assert [r.expert_id for r in Registry.load(registry_id, endpoint=hub.url)] == ids


def test_v1_registries_are_read_and_migrate_to_v2(hub, api, tmp_path):
    from click.testing import CliRunner

    registry_id = "test-org/v1-registry"
    init_registry(registry_id, base_model=BASE_REPO, embedder=EMBEDDER_REPO, endpoint=hub.url, format_version=1)
    vectors = clustered(3, seed=2)
    for i, vector in enumerate(vectors):
        update_registry(registry_id, upsert_expert(record(f"v{i}", vector)), commit_message="add", endpoint=hub.url)
    assert EXPERTS_FILENAME in api.list_repo_files(registry_id, repo_type="dataset")
    old = Registry.load(registry_id, endpoint=hub.url)
    assert old.manifest.format_version == 1 and len(old) == 3

    out = CliRunner().invoke(cli, ["registry", "migrate", "--registry", registry_id, "--endpoint", hub.url,
                                   "--format", "json"])
    assert out.exit_code == 0, out.output
    new = Registry.load(registry_id, endpoint=hub.url)
    assert new.manifest.format_version == 2 and new.experts == old.experts
    files = api.list_repo_files(registry_id, repo_type="dataset")
    assert EXPERTS_FILENAME not in files and "data/cell-00000.parquet" in files
    assert not migrate_registry(registry_id, endpoint=hub.url).committed  # already v2
    readme = api.hf_hub_download(registry_id, "README.md", repo_type="dataset")
    assert "data/*.parquet" in open(readme, encoding="utf-8").read()


def test_cold_route_fetches_the_coarse_file_and_probed_cells_only(hub, registry_id):
    vectors = clustered(3000, clusters=200, seed=3)
    result = write_rows(registry_id, synthetic_table(vectors), endpoint=hub.url)
    assert result.n_cells > 1
    extra = clustered(1, seed=4)[0]
    update_registry(registry_id, upsert_expert(record("fresh", extra)), commit_message="add", endpoint=hub.url)

    router = Router.from_registry(registry_id, endpoint=hub.url, index_threshold=2000)
    partial = router.index
    assert partial.kind == "cells" and partial.nprobe < len(partial.coarse.cells)
    router.route_vector(vectors[0], k=3)  # a cold query: the probed cells' centroids, a shard or two, the delta
    assert partial.nprobe + 2 <= partial.fetched_shards <= partial.nprobe + 4
    rng = np.random.default_rng(5)
    rows = rng.choice(len(vectors), 300, replace=False)
    noise = rng.standard_normal((300, DIM)).astype(np.float32) * (rng.uniform(1.0, 2.5, (300, 1)) / np.sqrt(DIM))
    queries = unit(vectors[rows] + noise)
    exact = (queries @ vectors.T).max(axis=1)
    hits = [router.route_vector(q, k=1).best.similarity >= e - 1e-5 for q, e in zip(queries, exact, strict=True)]
    recall = float(np.mean(hits))
    assert recall >= 0.99, recall
    assert router.route_vector(extra, k=1).best.expert.expert_id == "fresh"  # deltas are searched too
    assert not router.registry.loaded

    # removing a compacted row rewrites its cell and the cell's centroid file together
    gone = router.route_vector(vectors[7], k=1).best.expert.expert_id
    update_registry(registry_id, remove_expert_rows(gone), commit_message="rm", endpoint=hub.url)
    again = Router.from_registry(registry_id, endpoint=hub.url, index_threshold=2000)
    assert again.index.kind == "cells" and again.route_vector(vectors[7], k=1).best.expert.expert_id != gone
    print(f"recall@1 vs exact = {recall:.3f}, nprobe {partial.nprobe} of {len(partial.coarse.cells)} cells")
