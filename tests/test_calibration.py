"""Calibrated routing: similarity statistics in the rows, z-scores, `registry calibrate`, the default threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moin_hub import Registry
from moin_hub.cli import cli
from moin_hub.hub.calibration import choose_threshold
from moin_hub.hub.compaction import write_rows
from moin_hub.hub.config import ExpertRecord, similarity_stats
from moin_hub.hub.mixing import plan_mixture
from moin_hub.hub.router import Route, RouteResult
from tests import _helpers

OFF_TOPIC = ["hello", "hi there, how are you?", "write a python function that sorts a list", "thanks, bye!",
             "what is 2 + 2?", "how do I reset my wifi router password?"]


def test_threshold_choice_and_gating_on_the_calibrated_score():
    assert choose_threshold([1.0, 2.0, 3.0], [-2.0, -1.0, 0.0]) == (0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        choose_threshold([], [1.0])
    record = ExpertRecord("e", "org/e", "a" * 40, (1.0, 0.0), sim_mean=0.5, sim_std=0.1)
    route = RouteResult("q", (Route(record, 0.3, 0),))
    assert route.best.score == pytest.approx(-2.0) and route.to_dict()["expert"]["score"] == pytest.approx(-2.0)
    assert plan_mixture(route, threshold=-2.5).experts == ("e",)  # z -2.0 >= -2.5 (cosine 0.3 would be < 0.5)
    assert plan_mixture(route, threshold=-1.0).base_only
    plain = RouteResult("q", (Route(ExpertRecord("f", "org/f", "a" * 40, (1.0, 0.0)), 0.3, 0),))
    assert plain.best.score is None and plan_mixture(plain, threshold=0.2).experts == ("f",)  # raw cosine
    with pytest.raises(ValueError, match="sim_mean and sim_std"):
        ExpertRecord("e", "org/e", "a" * 40, (1.0, 0.0), sim_mean=0.5)


def test_calibrate_sets_the_default_threshold_that_route_applies(hub, registry_id, embedder, tmp_path):
    rows = []
    for i, (topic, texts) in enumerate(_helpers.TOPIC_TEXTS.items()):
        vectors = embedder.encode(texts)
        centroid = vectors.mean(axis=0) / np.linalg.norm(vectors.mean(axis=0))
        mean, std = similarity_stats(vectors, centroid)
        rows.append(ExpertRecord(expert_id=topic, repo_id=f"test-org/cal-{topic}", revision=f"{i + 1:040x}",
                                 centroid=tuple(centroid.tolist()), sim_mean=mean, sim_std=std))
    write_rows(registry_id, rows, endpoint=hub.url)
    queries, off = tmp_path / "queries.txt", tmp_path / "off.txt"
    queries.write_text("\n".join(_helpers.QUERIES.values()) + "\nThe midfielder was sent off after two fouls.\n")
    off.write_text("\n".join(OFF_TOPIC) + "\n")
    run = CliRunner().invoke
    out = run(cli, ["registry", "calibrate", "--registry", registry_id, "--queries", str(queries),
                    "--off-topic", str(off), "--write", "--endpoint", hub.url, "--format", "json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert min(report["kept"], report["rejected"]) >= 0.75 and report["written_revision"], report
    manifest = Registry.load(registry_id, endpoint=hub.url).manifest
    assert manifest.default_threshold == report["threshold"] and manifest.calibration["n_off_topic"] == 6

    def mixture(query: str) -> dict:
        result = run(cli, ["route", "--registry", registry_id, "-q", query, "--endpoint", hub.url, "--format", "json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    hello = mixture("hello")
    assert hello["mixture"]["experts"] == [] and hello["expert"]["score"] < report["threshold"]
    assert mixture(_helpers.QUERIES["astronomy"])["mixture"]["experts"][0]["expert_id"] == "astronomy"

    from moin_hub.serving.space import SpaceEngine

    space = SpaceEngine(registry_id, endpoint=hub.url)  # the Space applies the same calibrated default
    assert space.threshold == report["threshold"] and space.threshold_calibrated
    off, on = space.route("hello"), space.route(_helpers.QUERIES["astronomy"])
    assert off.on_score and not off.matched and on.matched and on.expert.expert_id == "astronomy"
    assert SpaceEngine(registry_id, endpoint=hub.url, threshold=-50.0).route("hello").matched

    from moin_hub.hub.pull import PullResult  # a routed pull says whether its expert clears the threshold

    pulled = [PullResult(r.best.expert, tmp_path, space.registry, r.result).to_dict() for r in (off, on)]
    assert [p["matched"] for p in pulled] == [False, True]
