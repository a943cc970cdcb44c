"""Rebuild a registry's rows from the expert cards on the Hub (``moin-hub registry rebuild``).

Every expert card written by ``push`` carries, in its ``moin`` metadata, all a registry row needs (the
full centroid, the embedder pin, the registry id, the LoRA settings, the sha256 of every file) and the
perplexities in ``model-index``. The experts of a registry are found by their tag
(``moin-registry:<registry id>``); each card is read at its repo's head commit, which becomes the row's
pinned revision, and checked: same registry, base model and embedder, the centroid's dimension, and
(with ``verify``) every file downloaded and its sha256 compared, as ``pull`` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub import ModelCard

from ..errors import MoinHubError
from .cards import record_from_card, registry_tag
from .client import download_file, get_api, resolve_endpoint
from .config import ExpertRecord
from .pull import download_expert
from .registry import Registry


@dataclass
class RebuildReport:
    """The rows rebuilt from the cards, and the repos that were refused (``{repo_id: reason}``)."""

    registry_id: str
    rows: list[ExpertRecord]
    problems: dict[str, str] = field(default_factory=dict)
    written_revision: str | None = None
    fallback: ExpertRecord | None = None  # the card marked ``moin.role: fallback``, if any

    def to_dict(self) -> dict[str, object]:
        fallback = None if self.fallback is None else {"expert_id": self.fallback.expert_id,
                                                        "repo_id": self.fallback.repo_id,
                                                        "revision": self.fallback.revision}
        return {"registry": self.registry_id, "n_rows": len(self.rows), "problems": self.problems,
                "written_revision": self.written_revision, "fallback": fallback,
                "experts": [{"expert_id": r.expert_id, "repo_id": r.repo_id, "revision": r.revision} for r in self.rows]}


def _check(record: ExpertRecord, meta: dict, registry: Registry) -> None:
    manifest = registry.manifest
    expected = {"registry": registry.registry_id, "base_model_revision": manifest.base_model.revision,
                "embedder": manifest.embedder.repo_id, "embedder_revision": manifest.embedder.revision,
                "embedder_dim": manifest.embedder.dim}
    for name, value in expected.items():
        if meta.get(name) != value:
            raise ValueError(f"card field moin.{name}={meta.get(name)!r}, the registry has {value!r}")
    if len(record.centroid) != manifest.embedder.dim:
        raise ValueError(f"centroid of dimension {len(record.centroid)}, the embedder's is {manifest.embedder.dim}")


def rebuild_registry(registry_id: str, *, verify: bool = True, write: bool = False, endpoint: str | None = None,
                     token: str | bool | None = None, progress: bool = False) -> RebuildReport:
    """The rows of ``registry_id`` rebuilt from the expert cards tagged for it; optionally write them.

    Args:
        registry_id: the registry (its manifest gives the base model and embedder every card must match).
        verify: download every file of each expert and compare its sha256 with the card's.
        write: replace the registry's rows by the rebuilt ones (one commit, compacted).
        endpoint / token: Hub settings.
        progress: show a progress bar.

    Returns:
        A :class:`RebuildReport`, rows sorted by expert id.

    Example:
        >>> rebuild_registry("acme/moin-registry").rows  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    endpoint = resolve_endpoint(endpoint)
    api = get_api(endpoint, token)
    registry = Registry.load(registry_id, endpoint=endpoint, token=token, lazy=True)
    models = [m.id for m in api.list_models(filter=registry_tag(registry_id))]
    rows: dict[str, ExpertRecord] = {}
    problems: dict[str, str] = {}
    fallback: ExpertRecord | None = None
    for repo_id in tqdm(sorted(models), desc="expert cards", disable=not progress):
        try:
            sha = api.model_info(repo_id).sha
            card = ModelCard.load(download_file(repo_id, "README.md", revision=sha, endpoint=endpoint, token=token))
            record = record_from_card(card.data, repo_id=repo_id, revision=sha)
            _check(record, card.data.moin, registry)
            if verify:
                download_expert(record, endpoint=endpoint, token=token, base_model=registry.manifest.base_model)
            if card.data.moin.get("role") == "fallback":
                if fallback is not None:
                    raise ValueError(f"a second fallback card (the first is {fallback.repo_id})")
                fallback = record
                continue
            if record.expert_id in rows:
                raise ValueError(f"expert id {record.expert_id!r} is also claimed by {rows[record.expert_id].repo_id}")
        except (MoinHubError, ValueError, TypeError, OSError) as err:
            problems[repo_id] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        rows[record.expert_id] = record
    report = RebuildReport(registry_id, sorted(rows.values(), key=lambda r: r.expert_id), problems,
                           fallback=fallback)
    if write:
        from dataclasses import replace

        from .compaction import write_rows
        from .registry import update_manifest

        report.written_revision = write_rows(registry_id, report.rows, endpoint=endpoint, token=token,
                                             message="Rebuild moin registry from the expert cards").revision
        if fallback is not None:
            report.written_revision = update_manifest(
                registry_id, lambda m: replace(m, fallback=fallback.to_dict()), endpoint=endpoint, token=token,
                commit_message=f"Rebuild: fallback expert {fallback.expert_id} from its card")
    return report
