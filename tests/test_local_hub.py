"""The local Hub against the REAL clients: huggingface_hub, datasets, pandas hf://, transformers, peft.

No mocks and no network beyond 127.0.0.1. ``endpoint=`` is passed explicitly everywhere; libraries
that read ``HF_ENDPOINT`` at import time (datasets, pandas' hf://, transformers, peft) run in a
subprocess with ``HF_ENDPOINT`` set.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    ModelCard,
    constants,
    hf_hub_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from moin_hub.local_hub.cards import validate_card_metadata
from moin_hub.local_hub.server import LocalHub

REPO = "org/demo"
GOOD_CARD = """---
tags: [lora, cooking]
library_name: peft
license: apache-2.0
base_model: test-org/tiny-llama
---
# Demo
"""


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path, monkeypatch):
    """Own HF_HOME and cache per test: the download cache is not keyed by endpoint."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def local_hub(tmp_path):
    with LocalHub(tmp_path / "hub-data") as hub:
        yield hub


@pytest.fixture
def client(local_hub) -> HfApi:
    return HfApi(endpoint=local_hub.url)


@pytest.fixture
def repo(client) -> str:
    """A model repo with one file, ``a/b.txt``."""
    client.create_repo(REPO)
    client.upload_file(path_or_fileobj=b"hello world", path_in_repo="a/b.txt", repo_id=REPO)
    return REPO


def raw_request(hub: LocalHub, method: str, target: str, body: bytes | None = None, headers=None):
    """Send exactly ``target`` (no URL normalisation) and return ``(status, headers, body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def add(path: str, data: bytes | str) -> CommitOperationAdd:
    return CommitOperationAdd(
        path_in_repo=path, path_or_fileobj=data.encode() if isinstance(data, str) else data
    )


def parquet_bytes(frame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def run_with_endpoint(hub: LocalHub, tmp_path: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter whose HF_ENDPOINT is the hub; return its stdout."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "subprocess_hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# ---------------------------------------------------------------------------------------------------
# repos


def test_create_exist_ok_delete_and_spaces(client):
    url = client.create_repo(REPO)
    assert url.repo_id == REPO and url.endpoint == client.endpoint
    with pytest.raises(HfHubHTTPError) as conflict:
        client.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert "url" in conflict.value.response.json()
    assert client.create_repo(REPO, exist_ok=True).repo_id == REPO

    info = client.model_info(REPO)
    assert len(info.sha) == 40 and info.private is False and info.author == "org"
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's "initial commit"

    client.create_repo("org/ds", repo_type="dataset", private=True)
    assert client.dataset_info("org/ds").private is True
    client.create_repo("org/app", repo_type="space", space_sdk="gradio")
    assert client.space_info("org/app").sdk == "gradio"

    client.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        client.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        client.delete_repo(REPO)
    client.delete_repo(REPO, missing_ok=True)
    assert not client.repo_exists(REPO) and client.repo_exists("org/ds", repo_type="dataset")


def test_upload_download_with_etag_and_commit_headers(local_hub, client, repo):
    first = client.model_info(repo).sha
    path = hf_hub_download(repo, "a/b.txt", endpoint=local_hub.url)
    assert Path(path).read_bytes() == b"hello world"

    status, headers, body = raw_request(local_hub, "HEAD", f"/{repo}/resolve/main/a/b.txt")
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == first
    assert headers["ETag"] == '"95d09f2b10159347eece71399a7e2e907ea3df4f"'  # git blob sha1
    assert headers["Content-Length"] == "11"

    second = client.upload_file(path_or_fileobj=b"changed", path_in_repo="a/b.txt", repo_id=repo)
    assert second.oid != first and len(second.oid) == 40
    pinned = hf_hub_download(repo, "a/b.txt", revision=first, endpoint=local_hub.url)
    assert Path(pinned).read_bytes() == b"hello world"  # an old sha still serves old content
    latest = hf_hub_download(repo, "a/b.txt", revision=second.oid[:7], endpoint=local_hub.url)
    assert Path(latest).read_bytes() == b"changed"

    assert local_hub.blob_path(repo, first, "a/b.txt").read_bytes() == b"hello world"
    with pytest.raises(LookupError):
        local_hub.blob_path(repo, first, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", endpoint=local_hub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "a/b.txt", revision="no-such-branch", endpoint=local_hub.url)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/nope", "a/b.txt", endpoint=local_hub.url)

    # A no-op upload is skipped by the client thanks to preupload's oid; a delete is a commit.
    client.delete_file("a/b.txt", repo_id=repo)
    assert client.list_repo_files(repo) == [".gitattributes"]


def test_range_reads(local_hub, client):
    client.create_repo(REPO)
    data = bytes(range(256)) * 4
    client.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id=REPO)
    target = f"/{REPO}/resolve/main/blob.bin"

    def get(range_header):
        return raw_request(local_hub, "GET", target, headers={"Range": range_header})

    status, headers, body = get("bytes=10-19")
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], "bytes 10-19/1024")
    assert get("bytes=1000-")[2] == data[1000:]
    status, headers, body = get("bytes=-24")
    assert (status, body, headers["Content-Length"]) == (206, data[-24:], "24")
    assert get("bytes=1020-5000")[2] == data[1020:]  # end clipped to the size
    status, headers, _ = get("bytes=1024-")
    assert (status, headers["Content-Range"]) == (416, "bytes */1024")
    assert get("bytes=0-0,5-6")[0] == 200  # multi-range: ignored, whole file

    fs = HfFileSystem(endpoint=local_hub.url)
    with fs.open(f"{REPO}/blob.bin", "rb", block_size=64) as handle:
        handle.seek(700)
        assert handle.read(30) == data[700:730]


# ---------------------------------------------------------------------------------------------------
# commits and concurrency


def test_stale_parent_commit_is_412(client, repo):
    head = client.model_info(repo).sha
    client.create_commit(repo, [add("x.txt", "1")], commit_message="x", parent_commit=head[:7])  # short ok
    with pytest.raises(HfHubHTTPError) as stale:
        client.create_commit(repo, [add("y.txt", "2")], commit_message="y", parent_commit=head)
    assert stale.value.response.status_code == 412
    assert "A commit has happened since" in str(stale.value)
    assert "y.txt" not in client.list_repo_files(repo)

    with pytest.raises(HfHubHTTPError) as lfs:  # we never hand out LFS: a clear 4xx, not a hang
        _post_lfs_commit(client, repo)
    assert lfs.value.response.status_code == 400


def _post_lfs_commit(client: HfApi, repo: str) -> None:
    from huggingface_hub.utils import get_session, hf_raise_for_status

    payload = b"\n".join(
        json.dumps(line).encode()
        for line in [
            {"key": "header", "value": {"summary": "lfs"}},
            {"key": "lfsFile", "value": {"path": "big.bin", "algo": "sha256", "oid": "0" * 64, "size": 1}},
        ]
    )
    response = get_session().post(
        f"{client.endpoint}/api/models/{repo}/commit/main",
        content=payload,
        headers={"Content-Type": "application/x-ndjson"},
    )
    hf_raise_for_status(response)


def test_concurrent_commits_with_parent_lose_nothing(client, repo):
    """16 writers doing read-sha / commit-with-parent / retry-on-412: one winner per parent, no lost change."""
    winners_by_parent: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        try:
            while True:
                parent = client.model_info(repo).sha
                try:
                    client.create_commit(
                        repo, [add(f"w/{i}.txt", str(i))], commit_message=f"w{i}", parent_commit=parent
                    )
                except HfHubHTTPError as exc:
                    if exc.response.status_code == 412:
                        continue
                    raise
                with lock:
                    winners_by_parent[parent] += 1
                return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert max(winners_by_parent.values()) == 1 and sum(winners_by_parent.values()) == 16
    files = client.list_repo_files(repo)
    assert sorted(f for f in files if f.startswith("w/")) == sorted(f"w/{i}.txt" for i in range(16))
    history = client.list_repo_commits(repo)
    assert len(history) == 2 + 16 and len({c.commit_id for c in history}) == 18


def test_concurrent_commits_without_parent_serialize(client, repo):
    def writer(i: int) -> None:
        client.create_commit(repo, [add(f"n/{i}.txt", str(i))], commit_message=f"n{i}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len([f for f in client.list_repo_files(repo) if f.startswith("n/")]) == 12
    assert len(client.list_repo_commits(repo)) == 2 + 12


def test_restart_keeps_repos_commits_and_files(tmp_path, client, local_hub, repo):
    head = client.model_info(repo).sha
    commits = [c.commit_id for c in client.list_repo_commits(repo)]
    local_hub.stop()
    with LocalHub(local_hub.data_dir) as again:
        api = HfApi(endpoint=again.url)
        assert api.model_info(repo).sha == head
        assert [c.commit_id for c in api.list_repo_commits(repo)] == commits
        assert Path(hf_hub_download(repo, "a/b.txt", endpoint=again.url)).read_bytes() == b"hello world"
        assert [m.id for m in api.list_models()] == [repo]


# ---------------------------------------------------------------------------------------------------
# browsing


def test_tree_paths_info_and_listing_files(local_hub, client, repo):
    client.create_commit(repo, [add("a/c/d.txt", "d"), add("top.txt", "t")], commit_message="more")
    assert client.list_repo_files(repo) == [".gitattributes", "a/b.txt", "a/c/d.txt", "top.txt"]
    top = {e.path: type(e).__name__ for e in client.list_repo_tree(repo)}
    assert top == {"a": "RepoFolder", ".gitattributes": "RepoFile", "top.txt": "RepoFile"}
    under_a = sorted(e.path for e in client.list_repo_tree(repo, path_in_repo="a", recursive=True))
    assert under_a == ["a/b.txt", "a/c", "a/c/d.txt"]
    expanded = list(client.list_repo_tree(repo, path_in_repo="a/c", expand=True))
    assert expanded[0].last_commit.title == "more"

    infos = client.get_paths_info(repo, ["a/b.txt", "a/c", "missing"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "a/b.txt"), ("RepoFolder", "a/c")]
    assert infos[0].size == 11 and infos[0].blob_id == "95d09f2b10159347eece71399a7e2e907ea3df4f"
    with pytest.raises(EntryNotFoundError):
        list(client.list_repo_tree(repo, path_in_repo="nope"))

    fs = HfFileSystem(endpoint=local_hub.url)
    assert sorted(fs.ls(f"{repo}/a", detail=False)) == [f"{repo}/a/b.txt", f"{repo}/a/c"]
    assert fs.cat(f"{repo}/a/c/d.txt") == b"d"
    assert fs.glob(f"{repo}/**/*.txt") == [f"{repo}/a/b.txt", f"{repo}/a/c/d.txt", f"{repo}/top.txt"]

    client.create_commit(repo, [CommitOperationDelete("a/c/")], commit_message="drop a folder")
    assert client.list_repo_files(repo) == [".gitattributes", "a/b.txt", "top.txt"]


def test_list_models_filter_search_author(client):
    for repo_id, tags in [("org/alpha", "[lora, cooking]"), ("org/beta", "[lora]"), ("other/gamma", "[x]")]:
        client.create_repo(repo_id)
        client.upload_file(
            path_or_fileobj=f"---\ntags: {tags}\nlibrary_name: peft\n---\n".encode(),
            path_in_repo="README.md",
            repo_id=repo_id,
        )
    assert sorted(m.id for m in client.list_models(filter="lora")) == ["org/alpha", "org/beta"]
    assert [m.id for m in client.list_models(filter=["lora", "cooking"])] == ["org/alpha"]
    assert [m.id for m in client.list_models(search="gam")] == ["other/gamma"]
    assert sorted(m.id for m in client.list_models(author="org")) == ["org/alpha", "org/beta"]
    assert len(list(client.list_models(filter="peft", limit=2))) == 2
    newest = next(iter(client.list_models(sort="last_modified", limit=1)))
    assert newest.id == "other/gamma"
    full = next(iter(client.list_models(search="alpha", full=True, cardData=True)))
    assert full.card_data.tags == ["lora", "cooking"] and {s.rfilename for s in full.siblings} >= {
        "README.md"
    }
    assert list(client.list_datasets()) == []


def test_refs_branches_tags_prs_and_commits(local_hub, client, repo):
    head = client.model_info(repo).sha
    client.create_branch(repo, branch="dev")
    client.create_tag(repo, tag="v1", revision=head)
    client.create_commit(repo, [add("dev.txt", "d")], commit_message="on dev", revision="dev")
    pr = client.create_commit(repo, [add("pr.txt", "p")], commit_message="a pr", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1

    refs = client.list_repo_refs(repo, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", head)]
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert client.model_info(repo, revision="v1").sha == head
    assert "dev.txt" in client.list_repo_files(repo, revision="dev")
    assert "dev.txt" not in client.list_repo_files(repo)
    pr_file = hf_hub_download(repo, "pr.txt", revision="refs/pr/1", endpoint=local_hub.url)  # refs%2Fpr%2F1
    assert Path(pr_file).read_bytes() == b"p"
    status, _, body = raw_request(local_hub, "GET", f"/{repo}/resolve/refs/pr/1/pr.txt")  # unquoted too
    assert (status, body) == (200, b"p")

    titles = [c.title for c in client.list_repo_commits(repo, revision="dev")]
    assert titles == ["on dev", "Upload a/b.txt with huggingface_hub", "initial commit"]
    client.delete_branch(repo, branch="dev")
    client.delete_tag(repo, tag="v1")
    assert [b.name for b in client.list_repo_refs(repo).branches] == ["main"]


# ---------------------------------------------------------------------------------------------------
# cards


def test_card_metadata_is_validated_and_indexed(local_hub, client, repo, monkeypatch):
    client.upload_file(path_or_fileobj=GOOD_CARD.encode(), path_in_repo="README.md", repo_id=repo)
    info = client.model_info(repo)
    assert info.card_data.base_model == "test-org/tiny-llama" and info.library_name == "peft"
    assert info.tags == ["lora", "cooking", "peft", "base_model:test-org/tiny-llama", "license:apache-2.0"]

    bad = "---\ntags: lora\nbase_model: 3\n---\n"
    with pytest.raises(ValueError, match='"tags" must be a list of strings'):  # client-side /validate-yaml
        client.create_commit(repo, [add("README.md", bad)], commit_message="bad card")
    with pytest.raises(ValueError, match="Invalid YAML"):
        client.create_commit(repo, [add("README.md", "---\ntags: [a\n---\n")], commit_message="bad yaml")
    assert client.model_info(repo).sha == info.sha  # nothing committed

    monkeypatch.setattr(constants, "ENDPOINT", local_hub.url)  # RepoCard.validate reads the constant
    ModelCard(GOOD_CARD).validate()
    with pytest.raises(ValueError, match="base_model"):
        ModelCard(bad).validate()

    # The commit endpoint validates on its own too, for clients that skip /validate-yaml.
    payload = b"\n".join(
        json.dumps(line).encode()
        for line in [
            {"key": "header", "value": {"summary": "raw"}},
            {"key": "file", "value": {"path": "README.md", "content": bad, "encoding": "utf-8"}},
        ]
    )
    status, _, body = raw_request(
        local_hub,
        "POST",
        f"/api/models/{repo}/commit/main",
        payload,
        {"Content-Type": "application/x-ndjson"},
    )
    assert status == 400 and b'\\"tags\\" must be' in body

    index = [
        {
            "name": "m",
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"type": "d", "name": "d"},
                    "metrics": [{"type": "perplexity", "value": 3.2}],
                }
            ],
        }
    ]
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    good = f"---\nmodel-index: {json.dumps(index)}\nconfigs: {json.dumps(configs)}\n---\n"
    assert validate_card_metadata(good) == []
    assert "model-index" in validate_card_metadata('---\nmodel-index: [{"name": "m"}]\n---\n')[0]
    assert "configs" in validate_card_metadata("---\nconfigs: [{data_files: 3}]\n---\n")[0]
    assert "mapping" in validate_card_metadata("---\n- a list\n---\n")[0]


# ---------------------------------------------------------------------------------------------------
# safety


def test_path_traversal_and_bad_names_are_refused(local_hub, client, repo):
    for target in (
        f"/{repo}/resolve/main/../../etc/passwd",
        f"/{repo}/resolve/main/%2e%2e/%2e%2e/etc/passwd",
        f"/{repo}/resolve/main/a%5cb.txt",
        f"/{repo}/resolve/main/a%00.txt",
        "/org/..%2F..%2Fx/resolve/main/a.txt",
        f"/api/models/{repo}/tree/main/..",
    ):
        status, _, body = raw_request(local_hub, "GET", target)
        assert status == 400, (target, status, body)
        assert "error" in json.loads(body)

    for bad_path in ("../evil.txt", "/abs.txt", "a\\b.txt", "a/./b", "nul\0.txt", "a//b"):
        payload = b"\n".join(
            json.dumps(line).encode()
            for line in [
                {"key": "header", "value": {"summary": "evil"}},
                {"key": "file", "value": {"path": bad_path, "content": "eA==", "encoding": "base64"}},
            ]
        )
        status, _, _ = raw_request(local_hub, "POST", f"/api/models/{repo}/commit/main", payload)
        assert status == 400, bad_path
    for name in ("..", "a..b", "-x", "x" * 97):
        status, _, _ = raw_request(
            local_hub, "POST", "/api/repos/create", json.dumps({"name": name, "organization": "org"}).encode()
        )
        assert status == 400, name
    assert client.list_repo_files(repo) == [".gitattributes", "a/b.txt"]


def test_write_tokens(local_hub, client, repo):
    local_hub.add_token("team", "team-secret")
    owner = HfApi(endpoint=local_hub.url, token="team-secret")
    owner.create_repo("team/model")
    owner.create_repo("team/hidden", private=True)
    head = owner.model_info("team/model").sha

    for api, status in [(client, 401), (HfApi(endpoint=local_hub.url, token="wrong"), 403)]:
        with pytest.raises(HfHubHTTPError) as refused:
            api.create_commit("team/model", [add("x.txt", "x")], commit_message="nope")
        assert refused.value.response.status_code == status
        assert "team" in refused.value.response.json()["error"]
        with pytest.raises(HfHubHTTPError):
            api.delete_repo("team/model")
        with pytest.raises(HfHubHTTPError):
            api.create_repo("team/other")
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("team/hidden")  # private: invisible without the token
    assert client.model_info("team/model").sha == head  # public reads stay open, nothing changed
    assert not client.repo_exists("team/other")
    assert {m.id for m in owner.list_models(author="team")} == {"team/model", "team/hidden"}
    assert [m.id for m in client.list_models(author="team")] == ["team/model"]

    owner.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id="team/model")
    owner.update_repo_settings("team/model", private=True)
    with pytest.raises(RepositoryNotFoundError):
        client.model_info("team/model")
    assert owner.whoami()["name"] == "team"
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=local_hub.url, token="wrong").whoami()
    client.upload_file(
        path_or_fileobj=b"open", path_in_repo="o.txt", repo_id=repo
    )  # other namespaces stay open


# ---------------------------------------------------------------------------------------------------
# HTTP behaviour and faults


def test_http_errors_are_json_and_bounded(local_hub, repo):
    status, headers, body = raw_request(local_hub, "GET", "/api/nothing/here")
    assert status == 404 and "error" in json.loads(body)
    status, headers, body = raw_request(local_hub, "GET", "/api/models/org/missing")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, headers, _ = raw_request(local_hub, "GET", f"/api/models/{repo}/revision/nope")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, _, body = raw_request(local_hub, "POST", "/api/repos/create", b"{not json")
    assert status == 400 and "Malformed JSON" in json.loads(body)["error"]
    status, _, _ = raw_request(local_hub, "POST", "/api/repos/create", b"[1, 2]")
    assert status == 400

    local_hub.max_body_bytes = 1024
    status, headers, body = raw_request(local_hub, "POST", f"/api/models/{repo}/commit/main", b"x" * 4096)
    assert status == 413 and "limit" in json.loads(body)["error"]

    conn = http.client.HTTPConnection("127.0.0.1", local_hub.port, timeout=10)  # keep-alive: one socket
    for _ in range(3):
        conn.request("GET", f"/api/models/{repo}")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Length")
        response.read()
    conn.close()


def test_fault_injection(local_hub, client, repo):
    local_hub.inject_fault("POST", r"/commit/", kind="status", status=503, times=1)
    with pytest.raises(HfHubHTTPError) as failed:
        client.create_commit(repo, [add("f.txt", "1")], commit_message="first try")
    assert failed.value.response.status_code == 503
    client.create_commit(repo, [add("f.txt", "1")], commit_message="second try")
    assert local_hub.faults == []

    delay = local_hub.inject_fault("GET", r"/api/models/", kind="delay", seconds=0.3, times=None)
    started = time.monotonic()
    client.model_info(repo)
    assert time.monotonic() - started >= 0.3 and delay.hits == 1
    local_hub.clear_faults()

    # A never-cached file: the client retries 5xx and dropped connections, then succeeds.
    head_fault = local_hub.inject_fault("HEAD", r"/resolve/", kind="status", status=503, times=1)
    get_fault = local_hub.inject_fault("GET", r"/resolve/", kind="drop", times=1)
    path = hf_hub_download(repo, "f.txt", endpoint=local_hub.url)
    assert Path(path).read_bytes() == b"1"
    assert head_fault.hits == 1 and get_fault.hits == 1
    assert ("GET", f"/{repo}/resolve/main/f.txt", None) in local_hub.request_log
    with pytest.raises(ValueError):
        local_hub.inject_fault(kind="explode")


# ---------------------------------------------------------------------------------------------------
# other libraries, in subprocesses (they read HF_ENDPOINT at import time)


def test_datasets_load_dataset_and_pandas_hf_urls(local_hub, client, tmp_path):
    import pandas as pd

    card = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test.parquet
- config_name: extra
  data_files: extra/*.parquet
---
# A tiny dataset
"""
    client.create_repo("org/ds", repo_type="dataset")
    client.create_commit(
        "org/ds",
        [
            add("README.md", card),
            add("data/train-00000.parquet", parquet_bytes(pd.DataFrame({"x": range(50), "t": ["a"] * 50}))),
            add("data/test.parquet", parquet_bytes(pd.DataFrame({"x": range(5), "t": ["b"] * 5}))),
            add("extra/e.parquet", parquet_bytes(pd.DataFrame({"y": [1.5, 2.5]}))),
        ],
        commit_message="data",
        repo_type="dataset",
    )
    sha = client.dataset_info("org/ds").sha

    out = run_with_endpoint(
        local_hub,
        tmp_path,
        f"""
        import json, datasets, pandas as pd
        # datasets' own dataset-viewer and download-count requests (other hosts) are off: see the net guard
        datasets.config.USE_PARQUET_EXPORT = False
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
        ds = datasets.load_dataset("org/ds")
        extra = datasets.load_dataset("org/ds", "extra", revision="{sha}")
        frame = pd.read_parquet("hf://datasets/org/ds/data/test.parquet")
        print(json.dumps({{"train": ds["train"].num_rows, "test": ds["test"].num_rows,
                          "extra": list(extra["train"]["y"]), "pandas": frame["x"].tolist()}}))
    """,
    )
    assert json.loads(out.strip().splitlines()[-1]) == {
        "train": 50,
        "test": 5,
        "extra": [1.5, 2.5],
        "pandas": [0, 1, 2, 3, 4],
    }


def test_transformers_and_peft_from_pretrained_pin_a_revision(local_hub, client, tmp_path):
    config = {
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "vocab_size": 100,
    }
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "org/base",
    }
    client.create_repo("org/adapter")
    pinned = client.create_commit(
        "org/adapter",
        [
            add("config.json", json.dumps(config)),
            add("adapter_config.json", json.dumps(adapter)),
        ],
        commit_message="v1",
    ).oid
    client.create_commit(
        "org/adapter",
        [
            add("config.json", json.dumps({**config, "hidden_size": 32})),
            add("adapter_config.json", json.dumps({**adapter, "r": 8})),
        ],
        commit_message="v2",
    )

    out = run_with_endpoint(
        local_hub,
        tmp_path,
        f"""
        from transformers import AutoConfig
        from peft import PeftConfig
        print(AutoConfig.from_pretrained("org/adapter", revision="{pinned}").hidden_size,
              PeftConfig.from_pretrained("org/adapter", revision="{pinned}").r,
              AutoConfig.from_pretrained("org/adapter").hidden_size)
    """,
    )
    assert out.split()[-3:] == ["16", "4", "32"]
