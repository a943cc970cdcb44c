"""The `moin-hub` command line, through its real entry point (CliRunner and a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from moin_hub.cli import cli, main
from tests._helpers import QUERIES

COMMANDS = ["local-hub", "init-registry", "push-expert", "register", "remove-expert", "route", "pull", "registry",
            "publish-assets", "cluster", "train", "evaluate", "push-all", "demo", "space", "serve"]


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def _entry(args: tuple[str, ...]) -> None:
    main(list(args))


def invoke(*args: str) -> tuple[int, str, str]:
    """Run ``main`` as the console script does; return (exit code, stdout, stderr)."""
    result = CliRunner().invoke(_entry, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_examples(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0
    text = result.output
    if name != "registry":
        assert "Examples:" in text
    if name in ("route", "pull", "push-expert", "init-registry"):
        assert "--endpoint" in text and "--format" in text and "--token" in text


def test_route_and_pull_json(hub, registry_id, make_expert, tmp_path):
    for topic in ("cooking", "astronomy"):
        code, out, err = invoke("push-expert", str(make_expert(topic)), "--registry", registry_id, "--repo-id",
                                f"test-org/cli-{registry_id[-8:]}-{topic}", "--endpoint", hub.url, "--format", "json")
        assert code == 0, err
        assert json.loads(out)["expert_id"] == topic
    code, out, err = invoke("route", "--registry", registry_id, "-q", QUERIES["astronomy"], "--endpoint", hub.url,
                            "--format", "json")
    assert code == 0, err
    routed = json.loads(out)
    assert routed["expert"]["expert_id"] == "astronomy" and len(routed["runner_ups"]) == 1
    assert routed["mixture"] == {"mode": "top1", "experts": [{"expert_id": "astronomy", "weight": 1.0}]}
    code, out, err = invoke("route", "--registry", registry_id, "-q", QUERIES["astronomy"], "--endpoint", hub.url,
                            "--mode", "topk", "--temperature", "10", "--format", "json")
    mixed = json.loads(out)["mixture"]["experts"]  # a hot softmax spreads the weight over both experts
    assert code == 0 and [e["expert_id"] for e in mixed] == ["astronomy", "cooking"]
    assert mixed[0]["weight"] > mixed[1]["weight"] > 0 and sum(e["weight"] for e in mixed) == pytest.approx(1)
    code, out, err = invoke("route", "--registry", registry_id, "-q", QUERIES["astronomy"], "--endpoint", hub.url,
                            "--threshold", "0.99")
    assert code == 0 and "the base model answers" in out
    code, out, err = invoke("pull", "--registry", registry_id, "-q", QUERIES["cooking"], "--endpoint", hub.url,
                            "--local-dir", str(tmp_path / "pulled"))
    assert code == 0, err
    assert "-> " in out and "cooking" in out and str(tmp_path / "pulled") in out and "verified" in out
    code, out, err = invoke("registry", "show", "--registry", registry_id, "--endpoint", hub.url, "--format", "json")
    assert code == 0 and [e["expert_id"] for e in json.loads(out)["experts"]] == ["astronomy", "cooking"]


def test_known_errors_are_one_line_messages(hub, registry_id):
    code, out, err = invoke("route", "--registry", "test-org/missing-registry", "-q", "hello",
                            "--endpoint", hub.url, "--token", "hf_supersecret123")
    assert code == 1 and out == ""
    assert err.startswith("Error: Registry 'test-org/missing-registry' not found")
    assert "Traceback" not in err and "hf_supersecret123" not in err
    code, out, err = invoke("route", "--registry", registry_id, "-q", "   ", "--endpoint", hub.url)
    assert code == 1 and "query is empty" in err
    code, out, err = invoke("route", "--registry", "not a repo id", "-q", "x", "--endpoint", hub.url)
    assert code == 1 and "not a valid Hub repo id" in err
    code, out, err = invoke("pull", "--registry", registry_id, "--endpoint", hub.url)
    assert code == 2 and "exactly one of --query or --expert" in err


def test_evaluate_modes_are_checked_before_anything_loads(tmp_path):
    from moin_hub.cli.pipeline import MODE_NAMES
    from moin_hub.pipeline.modes import EVAL_MODES

    assert MODE_NAMES == EVAL_MODES
    for bad, named in (("top1,best", "'best'"), (" , ", "' , '")):
        code, out, err = invoke("evaluate", str(tmp_path), "--modes", bad)
        errors = [line for line in err.splitlines() if line.startswith("Error")]
        assert code == 2 and out == "" and len(errors) == 1
        assert errors[0].startswith("Error: Invalid value for '--modes'") and named in errors[0]
        assert "top1, topk, adaptive, arrow" in errors[0]
    code, _, err = invoke("evaluate", str(tmp_path), "--modes", "adaptive,top1")  # valid: on to the workspace
    assert code == 1 and "not a moin-hub workspace" in err


def test_console_script_subprocess(hub):
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    proc = subprocess.run([sys.executable, "-m", "moin_hub", "route", "--registry", "test-org/nope", "-q", "x"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: Registry 'test-org/nope' not found")
    assert "MOIN_DEBUG=1" in proc.stderr
    version = subprocess.run([sys.executable, "-m", "moin_hub", "--version"], capture_output=True, text=True,
                             check=True)
    assert version.stdout.startswith("moin-hub, version ")
