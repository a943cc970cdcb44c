"""Bring your own adapter: register a PEFT LoRA already on the Hub into a registry (``moin-hub register``).

No write access to the adapter's repo is needed: the row pins the repo's commit, and everything the row
needs that the repo does not say is measured here from example texts of the adapter's subject:

- the centroid: the normalised mean of the examples' embeddings (the registry's pinned embedder), and the
  similarity statistics (the examples' cosines to it) that calibrate routing scores;
- the perplexities: base model vs base + adapter on held-out examples (every ``1/heldout_fraction``-th);
- the same checks as a push: the adapter names the registry's base model (and its commit, if it records
  one), the repo holds no pickle and has ``adapter_model.safetensors``, the adapter is a LoRA (its rank
  and target modules are reported and recorded), and the sha256 of both adapter files is recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .._validators import validate_repo_id
from ..errors import InvalidExpertError, MoinHubError
from ..hub.client import download_file, get_api, resolve_endpoint
from ..hub.config import ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME, ExpertRecord, similarity_stats
from ..hub.embed import load_embedder
from ..hub.expert import refuse_pickles
from ..hub.loading import load_base_model
from ..hub.pull import _check_adapter_base
from ..hub.registry import Registry, file_digest, update_registry, upsert_expert
from ..hub.retry import retry_transient


@dataclass(frozen=True)
class RegisterResult:
    """What ``register`` recorded."""

    expert_id: str
    repo_id: str
    revision: str
    registry_id: str
    registry_revision: str
    lora_rank: int
    target_modules: list[str]
    perplexity: float | None
    base_perplexity: float | None
    n_examples: int
    n_heldout: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def read_examples(path: str | Path) -> list[str]:
    """Example texts from a file: JSON lines with a ``"text"`` field (``.jsonl``), else one text per line."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if str(path).endswith(".jsonl"):
        return [str(json.loads(line)["text"]) for line in lines]
    return lines


def _expert_id(repo_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", repo_id.split("/")[-1]).lstrip("._-")[:96] or "expert"


def register_adapter(repo_id: str, *, registry: str, examples: Sequence[str], expert_id: str | None = None,
                     revision: str | None = None, heldout_fraction: float = 0.25, seq_len: int = 256,
                     endpoint: str | None = None, token: str | bool | None = None) -> RegisterResult:
    """Register a LoRA adapter repo of the Hub into a registry, pinned at its commit.

    Args:
        repo_id: the adapter's model repo (``adapter_config.json`` + ``adapter_model.safetensors``).
        registry: the registry dataset id.
        examples: texts of the adapter's subject (at least 4): centroid, statistics, held-out perplexity.
        expert_id: id in the registry (default: the repo's name).
        revision: the adapter repo's revision to pin (default: its head), resolved to a commit sha.
        heldout_fraction: share of the examples held out for the perplexities.
        seq_len: tokens per perplexity block.
        endpoint / token: Hub settings (read access to the adapter repo is enough).

    Raises:
        InvalidExpertError: not a safetensors LoRA adapter, or too few examples.
        UnsafeFileError: the repo holds a pickle.
        BaseModelMismatchError: the adapter adapts another base model.

    Example:
        >>> register_adapter("someone/lora-sailing", registry="acme/moin-registry",
        ...                  examples=read_examples("sailing.txt"))  # doctest: +SKIP
    """
    from .evaluate import load_with_adapter
    from .scoring import perplexity

    validate_repo_id(repo_id, field="repo_id")
    endpoint = resolve_endpoint(endpoint)
    texts = [t for t in examples if t.strip()]
    if len(texts) < 4:
        raise InvalidExpertError(repo_id, f"give at least 4 example texts, got {len(texts)}")
    reg = Registry.load(registry, endpoint=endpoint, token=token, lazy=True)
    api = get_api(endpoint, token)
    sha = retry_transient(lambda: api.model_info(repo_id, revision=revision).sha, what=f"reading {repo_id}")
    listed = retry_transient(lambda: api.list_repo_files(repo_id, revision=sha), what=f"listing {repo_id}")
    refuse_pickles(listed, where=f"{repo_id}@{sha[:12]}")
    for required in (ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME):
        if required not in listed:
            raise InvalidExpertError(repo_id, f"no {required} at {sha[:12]} (a PEFT LoRA saved with safetensors)")
    paths = {name: download_file(repo_id, name, revision=sha, endpoint=endpoint, token=token)
             for name in (ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME)}
    config = json.loads(paths[ADAPTER_CONFIG_FILENAME].read_text(encoding="utf-8"))
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidExpertError(repo_id, f"peft_type={config.get('peft_type')!r}; only LoRA adapters are routed")
    draft = ExpertRecord(expert_id=expert_id or _expert_id(repo_id), repo_id=repo_id, revision=sha, centroid=(1.0,))
    _check_adapter_base(paths[ADAPTER_CONFIG_FILENAME], reg.manifest.base_model, draft)
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)

    vectors = load_embedder(reg.manifest.embedder, endpoint=endpoint, token=token).encode(texts)
    centroid = vectors.mean(axis=0)
    centroid = centroid / np.linalg.norm(centroid)
    sim_mean, sim_std = similarity_stats(vectors, centroid)
    step = max(2, round(1 / heldout_fraction)) if heldout_fraction > 0 else 0
    heldout = texts[::step] if step else []
    base_ppl = expert_ppl = None
    if heldout:
        model, tokenizer = load_base_model(reg.manifest.base_model, endpoint=endpoint, token=token)

        def measure(scored) -> float:  # noqa: ANN001
            try:
                return perplexity(scored, tokenizer, heldout, seq_len=seq_len)[0]
            except ValueError as err:  # too few tokens for one block
                raise MoinHubError(f"Cannot measure perplexity on the held-out examples: {err}",
                                   hint="Give longer or more examples, or a smaller --seq-len.") from None

        base_ppl = measure(model)
        expert_ppl = measure(load_with_adapter(model, paths[ADAPTER_WEIGHTS_FILENAME].parent))
    record = ExpertRecord(
        expert_id=draft.expert_id, repo_id=repo_id, revision=sha, centroid=tuple(centroid.tolist()),
        n_docs=len(texts), perplexity=expert_ppl, base_perplexity=base_ppl, lora_rank=int(config.get("r") or 0),
        lora_alpha=float(config.get("lora_alpha") or 0.0), target_modules=tuple(targets),
        adapter_bytes=paths[ADAPTER_WEIGHTS_FILENAME].stat().st_size,
        files=tuple(file_digest(paths[name], name) for name in (ADAPTER_CONFIG_FILENAME, ADAPTER_WEIGHTS_FILENAME)),
        title=f"{repo_id} (registered)", sim_mean=sim_mean, sim_std=sim_std,
    )
    updated = update_registry(registry, upsert_expert(record), endpoint=endpoint, token=token,
                              commit_message=f"Register adapter {record.expert_id} ({repo_id}@{sha[:12]})")
    return RegisterResult(record.expert_id, repo_id, sha, registry, updated.revision, record.lora_rank, targets,
                          expert_ppl, base_ppl, len(texts), len(heldout))
