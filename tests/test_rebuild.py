"""The expert card carries its whole registry row; `registry rebuild` reconstructs a registry from the cards."""

from __future__ import annotations

import json

from click.testing import CliRunner
from huggingface_hub import ModelCard, hf_hub_download

from moin_hub import Registry
from moin_hub.cli import cli
from moin_hub.hub.cards import record_from_card
from moin_hub.hub.rebuild import rebuild_registry


def test_card_data_holds_the_whole_row(hub, topic_registry):
    registry = Registry.load(topic_registry, endpoint=hub.url)
    row = registry.experts[0]
    # ModelCard.load(repo_id) has no endpoint argument: fetch README.md with the Hub client, parse it as the Hub does
    card = ModelCard.load(hf_hub_download(row.repo_id, "README.md", revision=row.revision, endpoint=hub.url))
    meta = card.data.moin
    assert len(meta["centroid"]) == registry.manifest.embedder.dim == 384
    assert meta["registry"] == topic_registry and meta["embedder_revision"] == registry.manifest.embedder.revision
    assert record_from_card(card.data, repo_id=row.repo_id, revision=row.revision) == row


def test_rebuild_yields_the_same_rows(hub, topic_registry, api):
    registry = Registry.load(topic_registry, endpoint=hub.url)
    report = rebuild_registry(topic_registry, endpoint=hub.url)
    assert report.problems == {} and report.rows == list(registry.experts)

    # a card that claims this registry but another embedder is refused, the others still rebuilt
    impostor = "test-org/impostor-expert"
    api.create_repo(impostor, exist_ok=True)
    source = hf_hub_download(registry.experts[0].repo_id, "README.md", endpoint=hub.url,
                             revision=registry.experts[0].revision)
    text = open(source, encoding="utf-8").read().replace(registry.manifest.embedder.revision, "f" * 40)
    text = text.replace(f"expert_id: {registry.experts[0].expert_id}", "expert_id: impostor")
    api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=impostor)
    out = CliRunner().invoke(cli, ["registry", "rebuild", "--registry", topic_registry, "--endpoint", hub.url,
                                   "--format", "json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["same_as_registry"] is True and data["n_rows"] == len(registry)
    assert "embedder_revision" in data["problems"][impostor]
    api.delete_repo(impostor)
