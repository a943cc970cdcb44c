"""Download an expert at its pinned commit and verify every file against the registry's sha256."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import BaseModelMismatchError, ExpertNotFoundError, IntegrityError, InvalidRegistryError
from .client import RepositoryNotFoundError, RevisionNotFoundError, download_file, get_api, sha256_file
from .config import ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, ExpertRecord, PinnedModel
from .expert import refuse_pickles
from .registry import Registry
from .retry import retry_transient
from .router import Router, RouteResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullResult:
    """A downloaded, verified expert and how it was chosen."""

    expert: ExpertRecord
    path: Path
    registry: Registry
    route: RouteResult | None = None

    @property
    def matched(self) -> bool | None:
        """For a routed pull: whether the best route clears the registry's calibrated ``default_threshold``
        (True without one); None when the expert was named. Below it, ``route`` and ``serve`` would answer
        with the base model: the expert is pulled all the same, since it was asked for."""
        if self.route is None:
            return None
        return self.route.best.clears(self.registry.manifest.default_threshold)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "expert_id": self.expert.expert_id,
            "repo_id": self.expert.repo_id,
            "revision": self.expert.revision,
            "path": str(self.path),
            "registry": self.registry.registry_id,
            "registry_revision": self.registry.revision,
            "verified_files": [f.path for f in self.expert.files],
        }
        if self.route is not None:
            data["route"] = self.route.to_dict()
            data["matched"] = self.matched
        return data


def _verified_download(record: ExpertRecord, name: str, expected: str, *, endpoint: str,
                       token: str | bool | None, local_dir: str | Path | None) -> Path:
    """Download one file at the pinned commit; re-download once if the cached copy is corrupt."""
    for force in (False, True):
        path = retry_transient(
            lambda force=force: download_file(record.repo_id, name, revision=record.revision, endpoint=endpoint,
                                              token=token, local_dir=local_dir, force_download=force),
            what=f"the download of {record.repo_id}@{record.revision[:12]}:{name}")
        actual = sha256_file(path)
        if actual == expected:
            return path
        logger.warning("%s@%s:%s has sha256 %s, expected %s%s", record.repo_id, record.revision[:12], name,
                       actual[:12], expected[:12], "" if force else "; downloading it again")
    raise IntegrityError(repo_id=record.repo_id, revision=record.revision, path=name, expected=expected,
                         actual=actual)


def download_expert(record: ExpertRecord, *, endpoint: str, token: str | bool | None = None,
                    local_dir: str | Path | None = None, base_model: PinnedModel | None = None) -> Path:
    """Download the verified files of an expert at its pinned commit; return the folder holding them.

    Files go to the standard HF cache (``local_dir=None``) or to ``local_dir``. The repo must hold no
    pickle at that commit (someone loading it with other tools could run it), and, given ``base_model``,
    the adapter must name that base model (and revision, if it records one).

    Raises:
        ExpertNotFoundError: the repo or the pinned commit is gone.
        IntegrityError: a file's sha256 differs from the registry's record (even after re-downloading).
        UnsafeFileError: the record lists a pickle, or the repo holds one at the pinned commit.
        BaseModelMismatchError: the adapter was trained on another base model than ``base_model``.
        InvalidRegistryError: the record lists no adapter files.
        HubUnavailableError: the Hub kept failing through every retry.
    """
    digests = record.digests
    for required in (ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME):
        if required not in digests:
            raise InvalidRegistryError("?", f"expert {record.expert_id!r} lists no sha256 for {required}")
    refuse_pickles(list(digests), where=record.repo_id)
    paths = []
    try:
        listed = retry_transient(lambda: get_api(endpoint, token).list_repo_files(record.repo_id,
                                                                                  revision=record.revision),
                                 what=f"listing {record.repo_id}@{record.revision[:12]}")
        refuse_pickles(listed, where=f"{record.repo_id}@{record.revision[:12]}")
        for name, expected in digests.items():
            paths.append(_verified_download(record, name, expected, endpoint=endpoint, token=token,
                                            local_dir=local_dir))
    except RepositoryNotFoundError:
        raise ExpertNotFoundError(record.repo_id, revision=record.revision,
                                  reason="its Hub repo is gone (deleted, renamed or private)") from None
    except RevisionNotFoundError:
        raise ExpertNotFoundError(record.repo_id, revision=record.revision,
                                  reason="the pinned commit no longer exists in its repo") from None
    folder = paths[0].parent
    if base_model is not None:
        _check_adapter_base(folder / ADAPTER_CONFIG_FILENAME, base_model, record)
    return folder


def _check_adapter_base(config_path: Path, base: PinnedModel, record: ExpertRecord) -> None:
    """The adapter must adapt the registry's base model: same repo id, and same commit if it names one."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    actual = config.get("base_model_name_or_path")
    revision = config.get("revision")
    if actual != base.repo_id:
        raise BaseModelMismatchError(expected=base.repo_id, actual=str(actual), repo_id=record.repo_id)
    if revision and revision != base.revision:
        raise BaseModelMismatchError(expected=f"{base.repo_id}@{base.revision[:12]}",
                                     actual=f"{actual}@{str(revision)[:12]}", repo_id=record.repo_id)


def pull(query: str | None = None, *, registry: str | Registry, expert: str | None = None, k: int = 3,
         local_dir: str | Path | None = None, revision: str | None = None, endpoint: str | None = None,
         token: str | bool | None = None, router: Router | None = None) -> PullResult:
    """Route ``query`` (or take ``expert``), then download and verify that expert.

    Args:
        query: text to route; the nearest expert is pulled.
        registry: registry id (``"org/name"``) or a loaded :class:`Registry`.
        expert: pull this expert id or repo id instead of routing.
        k: how many routes to report (the best is pulled).
        local_dir: download into this folder instead of the HF cache.
        revision: registry revision (default: head of main).
        endpoint / token: Hub settings.
        router: reuse a router (and its loaded embedder).

    Returns:
        A :class:`PullResult` with the local folder of the verified adapter.

    Raises:
        EmptyQueryError, ExpertNotFoundError, IntegrityError, RegistryNotFoundError.

    Example:
        >>> result = pull("Who won the cup final?", registry="acme/moin-registry")  # doctest: +SKIP
        >>> result.expert.expert_id, result.path  # doctest: +SKIP
    """
    if (query is None) == (expert is None):
        raise ValueError("pull needs exactly one of query= or expert=.")
    if router is not None:
        reg = router.registry
    elif isinstance(registry, Registry):
        reg = registry
    else:
        # routing a query reads the rows only if the router needs them all (a large compacted registry
        # is searched through its cells, so a cold pull downloads the coarse file and the probed cells)
        reg = Registry.load(registry, revision=revision, endpoint=endpoint, token=token, lazy=query is not None)
    route = None
    if query is not None:
        route = (router or Router(reg)).route(query, k=k)
        record = route.best.expert
    else:
        record = reg.get(expert)
    path = download_expert(record, endpoint=reg.endpoint, token=token if token is not None else reg.token,
                           local_dir=local_dir, base_model=reg.manifest.base_model)
    return PullResult(record, path, reg, route)


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify_registry`: which rows are sound and what is wrong with the others."""

    registry_id: str
    revision: str
    checked: int
    problems: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {"registry": self.registry_id, "revision": self.revision, "checked": self.checked, "ok": self.ok,
                "problems": dict(self.problems)}


def verify_registry(registry: str | Registry, *, endpoint: str | None = None, token: str | bool | None = None,
                    local_dir: str | Path | None = None) -> VerifyReport:
    """Check every row of a registry as ``pull`` would: the pinned commit exists, the repo holds no pickle,
    every file's sha256 matches, and the adapter names the registry's base model.

    Args:
        registry: a registry id or a loaded :class:`Registry` (checked at its commit).
        endpoint / token: Hub settings.
        local_dir: download into this folder instead of the HF cache.

    Returns:
        A :class:`VerifyReport`; ``problems`` maps expert ids to one-line reasons.
    """
    from ..errors import MoinHubError

    reg = registry if isinstance(registry, Registry) else Registry.load(registry, endpoint=endpoint, token=token)
    problems = {}
    for record in reg:
        target = Path(local_dir) / record.expert_id if local_dir is not None else None
        try:
            download_expert(record, endpoint=reg.endpoint, token=token if token is not None else reg.token,
                            local_dir=target, base_model=reg.manifest.base_model)
        except MoinHubError as err:
            problems[record.expert_id] = f"{type(err).__name__}: {err}"
    return VerifyReport(reg.registry_id, reg.revision, len(reg), problems)
