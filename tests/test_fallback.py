"""The registry's fallback expert (e.g. branch-train's seed): no routed row, taken by queries below the threshold."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard, hf_hub_download

from moin_hub import Registry, push_expert
from moin_hub.cli import cli
from moin_hub.hub.rebuild import rebuild_registry
from moin_hub.serving.engine import ExpertEngine
from moin_hub.serving.space import SpaceEngine
from tests._helpers import QUERIES

OFF_TOPIC = "How do I fix a segfault in my C++ code?"


@pytest.fixture
def with_fallback(hub, registry_id, make_expert) -> str:
    """A registry with two routed experts and a fallback expert ``seed`` (an adapter trained on no topic here)."""
    for topic in ("cooking", "football"):
        push_expert(make_expert(topic), registry=registry_id, repo_id=f"test-org/{registry_id[-8:]}-{topic}",
                    endpoint=hub.url)
    out = CliRunner().invoke(cli, ["push-expert", str(make_expert("astronomy", expert_id="seed", seed=5)),
                                   "--registry", registry_id, "--repo-id", f"test-org/{registry_id[-8:]}-seed",
                                   "--fallback", "--endpoint", hub.url, "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["fallback"] is True
    return registry_id


def test_the_fallback_is_no_row_and_takes_queries_below_the_threshold(hub, with_fallback, make_expert):
    registry = Registry.load(with_fallback, endpoint=hub.url)
    assert [r.expert_id for r in registry] == ["cooking", "football"]  # not routed: no row, no centroid search
    assert registry.fallback.expert_id == "seed" and registry.get("seed") == registry.fallback
    assert registry.get(registry.fallback.repo_id) == registry.fallback

    def route(query: str, *extra: str) -> dict:
        out = CliRunner().invoke(cli, ["route", "--registry", with_fallback, "-q", query, "--endpoint", hub.url,
                                       "--format", "json", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.output)

    low = route(OFF_TOPIC, "--threshold", "0.5")  # rows without statistics: the threshold is on the cosine
    assert low["mixture"] == {"mode": "fallback", "experts": [{"expert_id": "seed", "weight": 1.0}]}
    assert route(QUERIES["cooking"], "--threshold", "0.2")["mixture"]["experts"][0]["expert_id"] == "cooking"
    assert "seed" not in [r["expert_id"] for r in [low["expert"], *low["runner_ups"]]]

    card = ModelCard.load(hf_hub_download(registry.fallback.repo_id, "README.md", revision=registry.fallback.revision,
                                          endpoint=hub.url))
    assert card.data.moin["role"] == "fallback" and "fallback expert" in card.text
    report = rebuild_registry(with_fallback, endpoint=hub.url)  # the card restores it as the fallback, not a row
    assert report.problems == {} and report.rows == list(registry.experts) and report.fallback == registry.fallback

    with pytest.raises(ValueError, match="routed expert"):  # a fallback may not shadow a routed expert
        push_expert(make_expert("astronomy", expert_id="cooking"), registry=with_fallback,
                    repo_id="test-org/other-cooking", endpoint=hub.url, fallback=True)


def test_serving_engines_use_the_fallback_below_the_threshold(hub, with_fallback):
    engine = ExpertEngine(with_fallback, endpoint=hub.url, cache_size=2)
    try:
        plan = engine.plan(OFF_TOPIC, threshold=0.5)
        assert plan.mixture.experts == ("seed",) and plan.mixture.mode == "fallback"
        assert engine.plan(QUERIES["football"], threshold=0.2).mixture.experts == ("football",)
        prompt = engine.encode("The night sky")
        with_seed = engine.generate_batch([prompt], plan.mixture, max_new_tokens=[6])[0]
        engine.activate("seed")  # the fallback loads through the verified pull, like any expert
        assert engine.cached_experts() == ["seed"] and with_seed.token_ids
    finally:
        engine.close()
    space = SpaceEngine(with_fallback, endpoint=hub.url, threshold=0.5)
    route = space.route(OFF_TOPIC)
    assert not route.matched and route.expert.expert_id == "seed"

