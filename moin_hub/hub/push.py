"""Push one expert: its own model repo (one commit), then its row in the registry (conflict-safe).

The order makes failures harmless: the expert's commit lands first, and only then does a registry row
point at it. A push that dies between the two leaves an unregistered expert repo (rerun the push), never
a row that points at a missing or half-written expert.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from .._validators import validate_repo_id
from ..errors import BaseModelMismatchError
from . import cards
from .client import get_api, http_status, resolve_endpoint
from .config import VERIFIED_EXPERT_FILES, ExpertRecord
from .expert import ExpertFolder
from .registry import (
    DEFAULT_MAX_RETRIES,
    Registry,
    file_digest,
    remove_expert_rows,
    update_manifest,
    update_registry,
    upsert_expert,
)
from .retry import backoff, retry_transient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushResult:
    """What a push did: the expert's repo and commit, and the registry commit that records it."""

    expert_id: str
    repo_id: str
    revision: str
    url: str
    registry_id: str
    registry_revision: str
    n_experts: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _check_base_model(folder: ExpertFolder, registry: Registry, repo_id: str) -> None:
    expected = registry.manifest.base_model.repo_id
    if folder.lora.base_model != expected:
        raise BaseModelMismatchError(expected=expected, actual=folder.lora.base_model, repo_id=repo_id)


def _card_text(record: ExpertRecord, folder: ExpertFolder, registry: Registry, *, role: str = "expert") -> str:
    """The rendered card; a failure to render warns and falls back to a minimal card (never aborts)."""
    try:
        card = cards.expert_card(record, registry.manifest, registry_id=registry.registry_id,
                                  endpoint=registry.endpoint, samples=folder.metadata.samples[:3],
                                  eval_tokens=folder.metadata.eval_tokens, role=role)
        return str(card)
    except Exception as err:  # noqa: BLE001 - card enrichment must never abort a push
        warnings.warn(f"Could not render the full card of {record.repo_id}: {err}; pushing a minimal card.",
                      stacklevel=3)
        return (f"---\nbase_model: {registry.manifest.base_model.repo_id}\nlibrary_name: peft\n"
                f"tags:\n- moin\n- moin-expert\n---\n\n# MoIN expert {record.expert_id}\n")


def _commit_expert(api: HfApi, repo_id: str, folder: Path, card: bytes, *, message: str, max_retries: int,
                   sleep: Callable[[float], None] = time.sleep) -> CommitInfo:
    """One commit of the expert's files and card, made on the head read just before (``parent_commit``).

    Transient failures are retried with a fresh head each time, so a commit whose answer was lost (it
    landed, the client never heard) is simply made again on top of itself: the files are identical and
    the registry pins the last commit. A 412 (someone else pushed to this repo meanwhile) is retried too.
    """

    def attempt() -> CommitInfo:
        head = api.model_info(repo_id).sha
        operations = [CommitOperationAdd(name, str(folder / name)) for name in VERIFIED_EXPERT_FILES]
        operations.append(CommitOperationAdd("README.md", card))
        return api.create_commit(repo_id, operations, parent_commit=head, commit_message=message)

    for conflict in range(max_retries):
        try:
            return retry_transient(attempt, what=f"the commit to {repo_id}")
        except HfHubHTTPError as err:
            if http_status(err) != 412 or conflict == max_retries - 1:
                raise
            sleep(backoff(conflict))
    raise AssertionError("unreachable")  # pragma: no cover


def push_expert(expert_dir: str | Path, *, registry: str, repo_id: str, expert_id: str | None = None,
                private: bool = False, commit_message: str | None = None, endpoint: str | None = None,
                token: str | bool | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                fallback: bool = False) -> PushResult:
    """Push an expert folder as its own model repo and add (or update) its registry row.

    With ``fallback=True`` the expert becomes the registry's fallback instead of a row (replacing any
    earlier one): routed queries below the threshold get it rather than the bare base model, and no
    centroid routes to it. Branch-train's shared seed (``WORKDIR/seed``), trained on every topic, is
    the natural fallback.

    Args:
        expert_dir: folder with ``adapter_config.json``, ``adapter_model.safetensors``,
            ``centroid.safetensors`` and ``moin_expert.json``.
        registry: the registry dataset id, ``"org/name"``.
        repo_id: the expert's model repo, ``"org/name"`` (created if missing).
        expert_id: id in the registry (default: the folder's ``moin_expert.json`` id).
        private: create the expert repo as private.
        commit_message: message of the expert commit.
        endpoint / token: Hub settings.
        max_retries: registry update attempts when others write at the same time.
        fallback: make it the registry's fallback expert (see above), not a routed row.

    Returns:
        A :class:`PushResult` with the expert's commit sha and the registry's new commit.

    Raises:
        InvalidExpertError / UnsafeFileError: the folder is not a valid, safe expert.
        BaseModelMismatchError / EmbedderMismatchError: the expert does not fit the registry.
        RegistryNotFoundError: no such registry.
        RegistryConflictError: the registry kept moving for ``max_retries`` attempts.

    Example:
        >>> push_expert("experts/topic-03", registry="acme/moin-registry",
        ...             repo_id="acme/moin-topic-03")  # doctest: +SKIP
    """
    validate_repo_id(repo_id, field="repo_id")
    endpoint = resolve_endpoint(endpoint)
    reg = Registry.load(registry, endpoint=endpoint, token=token)
    folder = ExpertFolder.read(expert_dir, dim=reg.manifest.embedder.dim)
    _check_base_model(folder, reg, repo_id)
    meta = folder.metadata
    expert_id = expert_id or meta.expert_id
    if fallback and any(r.expert_id == expert_id for r in reg):
        raise ValueError(f"{expert_id!r} is a routed expert of {registry}; give the fallback another expert_id.")

    files = [file_digest(folder.path / name, name) for name in VERIFIED_EXPERT_FILES]
    draft = ExpertRecord(
        expert_id=expert_id, repo_id=repo_id, revision="0" * 40, centroid=tuple(folder.centroid.tolist()),
        keywords=tuple(meta.keywords), n_docs=meta.n_docs, n_tokens=meta.n_tokens, perplexity=meta.perplexity,
        base_perplexity=meta.base_perplexity, lora_rank=folder.lora.rank, lora_alpha=folder.lora.alpha,
        target_modules=folder.lora.target_modules, adapter_bytes=folder.adapter_bytes, files=tuple(files),
        title=meta.title, sim_mean=meta.sim_mean, sim_std=meta.sim_std,
    )
    card = _card_text(draft, folder, reg, role="fallback" if fallback else "expert").encode()
    api = get_api(endpoint, token)
    retry_transient(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what=f"creating {repo_id}")
    commit = _commit_expert(api, repo_id, folder.path, card, max_retries=max_retries,
                            message=commit_message or f"Push MoIN expert {expert_id} for {registry}")
    logger.info("pushed %s at %s", repo_id, commit.oid)
    record = ExpertRecord(**{**draft.to_dict(), "revision": commit.oid, "files": files})
    if fallback:
        sha = update_manifest(registry, lambda m: replace(m, fallback=record.to_dict()), endpoint=endpoint,
                              token=token, max_retries=max_retries,
                              commit_message=f"Set fallback expert {expert_id} ({repo_id}@{commit.oid[:12]})")
        return PushResult(expert_id=expert_id, repo_id=repo_id, revision=commit.oid, url=f"{endpoint}/{repo_id}",
                          registry_id=registry, registry_revision=sha, n_experts=len(reg))
    updated = update_registry(registry, upsert_expert(record), endpoint=endpoint, token=token,
                              commit_message=f"Register expert {expert_id} ({repo_id}@{commit.oid[:12]})",
                              max_retries=max_retries)
    return PushResult(
        expert_id=expert_id, repo_id=repo_id, revision=commit.oid, url=f"{endpoint}/{repo_id}",
        registry_id=registry, registry_revision=updated.revision, n_experts=len(updated),
    )


@dataclass(frozen=True)
class RemoveResult:
    """What a removal did: the registry commit without the expert, and whether its repo was deleted."""

    expert_id: str
    repo_id: str
    registry_id: str
    registry_revision: str
    n_experts: int
    repo_deleted: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def remove_expert(expert: str, *, registry: str, delete_repo: bool = False, endpoint: str | None = None,
                  token: str | bool | None = None, max_retries: int = DEFAULT_MAX_RETRIES) -> RemoveResult:
    """Remove an expert's row from a registry (conflict-safe), and optionally delete its model repo.

    The row goes first, the repo second: a failure in between leaves an unregistered repo, never a row
    pointing at a deleted expert. A retried removal whose first commit landed unnoticed is a no-op.

    Args:
        expert: expert id or repo id.
        registry: the registry dataset id.
        delete_repo: also delete the expert's model repo.
        endpoint / token / max_retries: as in :func:`push_expert`.

    Raises:
        ExpertNotFoundError: the registry has no such expert.
        RegistryNotFoundError / RegistryConflictError / HubUnavailableError.

    Example:
        >>> remove_expert("topic-03", registry="acme/moin-registry")  # doctest: +SKIP
    """
    endpoint = resolve_endpoint(endpoint)
    record = Registry.load(registry, endpoint=endpoint, token=token).get(expert)
    updated = update_registry(registry, remove_expert_rows(record.expert_id, missing_ok=True), endpoint=endpoint,
                              token=token, max_retries=max_retries,
                              commit_message=f"Remove expert {record.expert_id} ({record.repo_id})")
    if delete_repo:
        api = get_api(endpoint, token)
        retry_transient(lambda: api.delete_repo(record.repo_id, missing_ok=True), what=f"deleting {record.repo_id}")
    return RemoveResult(expert_id=record.expert_id, repo_id=record.repo_id, registry_id=registry,
                        registry_revision=updated.revision, n_experts=len(updated), repo_deleted=delete_repo)
