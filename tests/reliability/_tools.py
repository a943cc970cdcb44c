"""Shared tools of the reliability suite (also used by benchmarks/reliability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from moin_hub.hub.pull import verify_registry
from moin_hub.hub.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


def subprocess_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a pusher process: the local Hub, its own HF home, the repo on PYTHONPATH."""
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))  # keeps the tests' net guard
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "PYTHONPATH": path,
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}
    env.pop("HF_HUB_CACHE", None)
    return env


def start_push(folder: Path, registry_id: str, repo_id: str, env: dict[str, str], *,
               extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start `moin-hub push-expert ... --format json` in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "moin_hub", "push-expert", str(folder), "--registry", registry_id, "--repo-id",
         repo_id, "--format", "json", *extra_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def race_pushes(folders: Sequence[Path], registry_id: str, repo_ids: Sequence[str], env: dict[str, str],
                timeout: float = 600) -> tuple[list[dict], list[str]]:
    """Push every folder at once, one process each; return (acknowledged results, error outputs)."""
    procs = [start_push(folder, registry_id, repo_id, env) for folder, repo_id in zip(folders, repo_ids, strict=True)]
    acknowledged, failures = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode == 0:
            acknowledged.append(json.loads(out))
        else:
            failures.append(err[-2000:])
    return acknowledged, failures


def consistency_problems(registry_id: str, endpoint: str, tmp: Path) -> list[str]:
    """What is wrong with a registry: duplicate ids/repos, and rows that do not pull cleanly."""
    registry = Registry.load(registry_id, endpoint=endpoint)
    problems = []
    ids = [r.expert_id for r in registry]
    repos = [r.repo_id for r in registry]
    if len(set(ids)) != len(ids):
        problems.append(f"duplicate expert ids: {sorted(ids)}")
    if len(set(repos)) != len(repos):
        problems.append(f"duplicate repos: {sorted(repos)}")
    report = verify_registry(registry, local_dir=tmp / f"verify-{registry.revision[:12]}")
    problems += [f"{expert}: {reason}" for expert, reason in report.problems.items()]
    return problems


def raw_request(base_url: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """One raw HTTP request with the standard library: ``(status, content type, body)``."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def wait_until_answers(proc: subprocess.Popen, base_url: str, path: str, *, timeout: float, what: str,
                       poll: float = 0.2) -> None:
    """Wait until ``GET path`` answers 200 from the server that ``proc`` starts; fail (with its last output)
    if the process exits first, or after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if raw_request(base_url, "GET", path)[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            output = proc.communicate()[0] if proc.stdout else ""
            raise AssertionError(f"{what} exited with {proc.returncode}: {(output or '')[-3000:]}")
        assert time.monotonic() < deadline, f"{what} did not answer {path} within {timeout:.0f} s"
        time.sleep(poll)
