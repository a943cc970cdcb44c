"""The README's commands, run through the real entry point (``main`` as the console script calls it, or
``python -m moin_hub`` / Ray's ``serve`` in a subprocess) against the local Hub.

`moin-hub serve --cache-bytes/--prefetch` is in ``tests/test_serve.py::test_moin_hub_serve_runs_as_a_command``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from moin_hub import Registry
from moin_hub.hub.registry import update_registry, upsert_expert
from tests._helpers import free_port
from tests.conftest import BASE_REPO, EMBEDDER_REPO
from tests.reliability._tools import subprocess_env, wait_until_answers
from tests.test_cli import invoke
from tests.test_pipeline import write_corpus


def _push(hub, registry_id: str, folder: Path, repo_id: str) -> None:
    code, _, err = invoke("push-expert", str(folder), "--registry", registry_id, "--repo-id", repo_id,
                          "--endpoint", hub.url)
    assert code == 0, err


def test_registry_verify_catches_a_tampered_row_and_remove_expert_takes_it_out(hub, api, registry_id,
                                                                                 make_expert, tmp_path):
    repos = {topic: f"test-org/rd-{registry_id[-8:]}-{topic}" for topic in ("cooking", "football")}
    for topic, repo in repos.items():
        _push(hub, registry_id, make_expert(topic), repo)
    code, out, err = invoke("registry", "verify", "--registry", registry_id, "--endpoint", hub.url, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["checked"] == 2 and report["problems"] == {}

    # tamper: the cooking row now records another sha256 for its adapter weights
    row = Registry.load(registry_id, endpoint=hub.url).get("cooking")
    files = tuple(dataclasses.replace(f, sha256="0" * 64) if f.path == "adapter_model.safetensors" else f
                  for f in row.files)
    update_registry(registry_id, upsert_expert(dataclasses.replace(row, files=files)), endpoint=hub.url,
                    commit_message="tamper")
    proc = subprocess.run([sys.executable, "-m", "moin_hub", "registry", "verify", "--registry", registry_id],
                          env=subprocess_env(hub.url, tmp_path / "home"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "2 expert(s) checked, 1 problem(s)" in proc.stdout
    (problem,) = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert problem.strip().startswith("cooking:") and "adapter_model.safetensors" in problem

    code, out, err = invoke("remove-expert", "cooking", "--registry", registry_id, "--delete-repo",
                            "--endpoint", hub.url, "--format", "json")
    assert code == 0, err
    removed = json.loads(out)
    assert removed["expert_id"] == "cooking" and removed["repo_deleted"] and removed["n_experts"] == 1
    assert not api.repo_exists(repos["cooking"]) and api.repo_exists(repos["football"])
    assert [r.expert_id for r in Registry.load(registry_id, endpoint=hub.url)] == ["football"]
    code, out, err = invoke("registry", "verify", "--registry", registry_id, "--endpoint", hub.url)
    assert code == 0 and "1 expert(s) checked, 0 problem(s)" in out, (out, err)
    code, out, err = invoke("remove-expert", "cooking", "--registry", registry_id, "--endpoint", hub.url)
    assert code == 1 and err.startswith("Error: ") and "cooking" in err


@pytest.mark.e2e
def test_local_hub_with_a_namespace_token(tmp_path):
    port = free_port()
    secret = "hf_acme_secret_" + os.urandom(4).hex()
    proc = subprocess.Popen([sys.executable, "-m", "moin_hub", "local-hub", "--port", str(port), "--data",
                             str(tmp_path / "data"), "--token", f"acme={secret}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(proc, url, "/api/models", timeout=60, what="the local hub")
        api = HfApi(endpoint=url)
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_repo("acme/model", token=False)
        assert refused.value.response.status_code in (401, 403)
        with pytest.raises(HfHubHTTPError):
            api.create_repo("acme/model", token="hf_wrong_token")
        api.create_repo("acme/model", token=secret)
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="acme/model", token=secret)
        assert api.list_repo_files("acme/model", token=False) == [".gitattributes", "a.txt"]  # reads stay open
        api.create_repo("other/model", token=False)  # a namespace without a token stays open
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert f"at {url}" in output and secret not in output


def _cluster(hub, work: Path, tmp_path: Path, *extra: str) -> dict:
    code, out, err = invoke("cluster", str(work), "--corpus", str(write_corpus(tmp_path / "corpus.jsonl")),
                            "--base-model", BASE_REPO, "--embedder", EMBEDDER_REPO, "--heldout-fraction", "0.25",
                            "--endpoint", hub.url, "--format", "json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_cluster_method_hdbscan(hub, tmp_path):
    clustered = _cluster(hub, tmp_path / "work", tmp_path, "--method", "hdbscan", "--min-cluster-size", "3")
    assert clustered["method"] == "hdbscan" and clustered["k"] == 3  # found the three topics itself (no --k)
    assert clustered["metrics"]["purity"] == 1.0


@pytest.mark.slow
def test_train_executor_ray(hub, tmp_path, monkeypatch):
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    work = tmp_path / "work"
    _cluster(hub, work, tmp_path, "--k", "2")
    code, out, err = invoke("train", str(work), "--executor", "ray", "--seq-len", "16", "--batch-size", "2",
                            "--tokens-per-expert", "128", "--rank", "2", "--endpoint", hub.url, "--format", "json")
    assert code == 0, err
    trained = json.loads(out)
    assert sorted(trained["experts"]) == sorted(trained["trained"]) == ["topic-00", "topic-01"]
    # branch-train on Ray (the default seed fraction): the seed trained first, each expert branched from it
    seed = work / "seed" / "adapter_model.safetensors"
    assert trained["seed"] and seed.is_file()
    seed_sha = hashlib.sha256(seed.read_bytes()).hexdigest()
    for expert in trained["experts"]:
        assert (work / "experts" / expert / "adapter_model.safetensors").is_file()
        record = json.loads((work / "experts" / expert / "training.json").read_text())
        assert record["phase"]["name"] == "branch" and record["seed"]["sha256"] == seed_sha


@pytest.mark.slow
def test_ray_serve_run_app_builder(hub, topic_registry, tmp_path):
    """The README's ``serve run moin_hub.serving.ray_serve:app_builder registry_id=...`` (Ray's own CLI; its
    HTTP proxy is on 127.0.0.1:8000, which `serve run IMPORT_PATH` cannot change)."""
    serve = Path(sys.executable).with_name("serve")
    assert serve.is_file(), "Ray's `serve` command is missing: `make setup` installs moin-hub[ray]"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 is taken: `serve run` needs it for its HTTP proxy")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    env = subprocess_env(hub.url, tmp_path / "home", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                         OMP_NUM_THREADS="1", RAY_TMPDIR=str(temp), RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60",
                         RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="60")  # see tests/test_ray_serve.py's cluster
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(serve), "run", "moin_hub.serving.ray_serve:app_builder", f"registry_id={topic_registry}",
                             f"endpoint={hub.url}", "replicas=1", "replica_num_cpus=0.5", "ingress_num_cpus=0.5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = "http://127.0.0.1:8000"
    try:
        wait_until_answers(proc, url, "/health", timeout=240, what="serve run", poll=0.5)
        body = json.dumps({"model": "moin:auto", "prompt": "The striker scored a goal in the cup final",
                           "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=180) as response:
            answer = json.loads(response.read())
        assert answer["moin"]["expert"] == "football" and answer["choices"][0]["text"] is not None
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run cleans up (the app, its local Ray) on Ctrl-C
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        shutil.rmtree(temp, ignore_errors=True)
