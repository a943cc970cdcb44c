"""Model and dataset cards, rendered from the Jinja templates in ``cards/``.

The YAML front matter is built by huggingface_hub's card-data classes, so the Hub (and the local hub)
understands it: ``base_model``, ``library_name: peft``, ``tags``, ``pipeline_tag`` and a
``model-index`` holding the perplexities as :class:`~huggingface_hub.EvalResult` entries.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from .._version import __version__
from .config import EXPERTS_FILENAME, ExpertRecord, RegistryManifest

EXPERT_TEMPLATE = "expert_card.md"
REGISTRY_TEMPLATE = "registry_card.md"


def cards_dir() -> Path:
    """The folder of card templates: inside the installed wheel, or ``cards/`` of a source checkout."""
    packaged = resources.files("moin_hub") / "cards"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "cards"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(cards_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # markdown, not HTML
    )


def _render(template: str, **context: Any) -> str:
    text = _environment().get_template(template).render(**context)
    return re.sub(r"\n{3,}", "\n\n", text)  # never leave triple blank lines behind conditionals


def human_size(num_bytes: int) -> str:
    """``1536000`` -> ``'1.5 MB'``."""
    size = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def registry_tag(registry_id: str) -> str:
    """The tag that marks an expert repo as a member of ``registry_id`` (filterable with list_models)."""
    return f"moin-registry:{registry_id}"


def example_prompt(samples: Sequence[str], keywords: Sequence[str], *, max_words: int = 12) -> str:
    """A prompt for the card's usage snippets: the start of the first sample, else the keywords.

    Only letters, digits, spaces and ``.,;:!?'-`` are kept, so that it is safe inside the double-quoted
    Python and shell strings of the card.

    Example:
        >>> example_prompt(['He said "stop" at $5 and left.'], [])
        'He said stop at 5 and left.'
    """
    text = " ".join(samples[0].split()[:max_words]) if samples and samples[0].strip() else (
        "Tell me about " + ", ".join(keywords[:3]) if keywords else "Tell me about this topic")
    cleaned = re.sub(r"[^\w .,;:!?'-]", "", text)
    return re.sub(r"\s+", " ", cleaned).strip() or "Tell me about this topic"


def expert_card(record: ExpertRecord, manifest: RegistryManifest, *, registry_id: str, endpoint: str,
                samples: list[str], eval_tokens: int = 0, role: str = "expert") -> ModelCard:
    """Render the model card of an expert repo.

    Args:
        record: the expert's registry row (its ``revision`` is not used: the card is part of that commit).
        manifest: the registry's manifest (base model, embedder).
        registry_id: the registry the expert is pushed into.
        endpoint: the Hub endpoint, for links.
        samples: a few sample documents of the topic.
        eval_tokens: held-out tokens behind the perplexities.
        role: ``"expert"`` (a routed row) or ``"fallback"`` (the registry's fallback expert); recorded as
            ``moin.role``, so that ``registry rebuild`` restores it as the fallback.

    Returns:
        A :class:`~huggingface_hub.ModelCard` whose ``data`` holds the Hub metadata.
    """
    if role not in ("expert", "fallback"):
        raise ValueError(f"role must be 'expert' or 'fallback', got {role!r}.")
    eval_results = []
    dataset = {"dataset_type": "moin-heldout", "dataset_name": f"held-out documents of topic {record.expert_id}"}
    for name, value in (("expert", record.perplexity), ("base model", record.base_perplexity)):
        if value is not None:
            eval_results.append(EvalResult(
                task_type="text-generation", task_name="Language modelling", metric_type="perplexity",
                metric_name=f"Perplexity ({name})", metric_value=float(value), **dataset,
            ))
    card_data = ModelCardData(
        base_model=manifest.base_model.repo_id,
        library_name="peft",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["moin", "moin-expert", "lora", "peft", registry_tag(registry_id)],
        model_name=record.repo_id.split("/")[-1],
        eval_results=eval_results or None,
        moin={**card_metadata(record, manifest, registry_id=registry_id), "role": role},
    )
    prompt = example_prompt(samples, list(record.keywords))
    title = record.title or f"MoIN expert `{record.expert_id}`" + (
        f": {', '.join(record.keywords[:4])}" if record.keywords else ""
    )
    content = _render(
        EXPERT_TEMPLATE,
        card_data=card_data.to_yaml(),
        title=title,
        endpoint=endpoint,
        registry_id=registry_id,
        repo_id=record.repo_id,
        expert_id=record.expert_id,
        keywords=list(record.keywords),
        n_docs=record.n_docs,
        n_tokens=record.n_tokens,
        base_model=manifest.base_model.repo_id,
        base_revision=manifest.base_model.revision,
        embedder_id=manifest.embedder.repo_id,
        embedder_revision=manifest.embedder.revision,
        embedder_dim=manifest.embedder.dim,
        lora_rank=record.lora_rank,
        lora_alpha=record.lora_alpha,
        target_modules=list(record.target_modules),
        adapter_size=human_size(record.adapter_bytes),
        perplexity=record.perplexity,
        base_perplexity=record.base_perplexity,
        eval_tokens=eval_tokens,
        samples=samples,
        prompt=prompt,
        centroid_head="[" + ", ".join(f"{x:.4f}" for x in record.centroid[:6]) + ", ...]",
        created_by=f"moin-hub {__version__}",
        role=role,
    )
    return ModelCard(content)


#: Row fields the card's ``moin`` metadata carries as they are (the perplexities are in ``model-index``,
#: the revision is the commit the card is read at).
CARD_ROW_FIELDS = ("expert_id", "keywords", "n_docs", "n_tokens", "lora_rank", "lora_alpha", "target_modules",
                   "adapter_bytes", "files", "title", "created_at", "created_by", "sim_mean", "sim_std")
PERPLEXITY_NAMES = {"Perplexity (expert)": "perplexity", "Perplexity (base model)": "base_perplexity"}


def card_metadata(record: ExpertRecord, manifest: RegistryManifest, *, registry_id: str) -> dict[str, Any]:
    """The ``moin`` block of an expert card: all a registry row needs but the perplexities and the revision.

    The centroid is the full vector (floats that round-trip the stored float32 exactly).
    """
    row = record.to_dict()
    meta: dict[str, Any] = {
        "registry": registry_id,
        "base_model_revision": manifest.base_model.revision,
        "embedder": manifest.embedder.repo_id,
        "embedder_revision": manifest.embedder.revision,
        "embedder_dim": manifest.embedder.dim,
    }
    for name in CARD_ROW_FIELDS:
        value = row[name]
        meta[name] = [dict(v) for v in value] if name == "files" else list(value) if isinstance(value, tuple) else value
    meta["centroid"] = [float(x) for x in record.centroid]
    return meta


def record_from_card(data: ModelCardData, *, repo_id: str, revision: str) -> ExpertRecord:
    """The registry row an expert card describes, pinned at ``revision`` (the commit the card was read at).

    Raises:
        ValueError: the card has no ``moin`` block, or a field is missing or malformed.
    """
    meta = getattr(data, "moin", None)
    if not isinstance(meta, dict) or "centroid" not in meta:
        raise ValueError(f"the card of {repo_id} has no moin metadata with a centroid (pushed by an older moin-hub?)")
    fields = {name: meta[name] for name in CARD_ROW_FIELDS if name in meta}
    for result in data.eval_results or []:
        if result.metric_name in PERPLEXITY_NAMES:
            fields[PERPLEXITY_NAMES[result.metric_name]] = float(result.metric_value)
    return ExpertRecord(**fields, repo_id=repo_id, revision=revision, centroid=tuple(meta["centroid"]))


def change_cell(perplexity: float | None, base_perplexity: float | None) -> tuple[str, float | None]:
    """The "Change" cell of the registry table: ``"-20.1% ████"`` (one block per 5% saved) and the number.

    Example:
        >>> change_cell(40.0, 50.0)
        ('-20.0% ████', -20.0)
    """
    if perplexity is None or not base_perplexity:
        return "n/a", None
    pct = 100.0 * (perplexity / base_perplexity - 1.0)
    blocks = "█" * min(20, round(-pct / 5)) if pct < 0 else ""
    return f"{pct:+.1f}%" + (f" {blocks}" if blocks else ""), round(pct, 1)


def plot_title(path: str) -> str:
    """``"plots/perplexity_per_expert.png"`` -> ``"Perplexity per expert"``."""
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return stem.replace("_", " ").replace("-", " ").strip().capitalize() or "Plot"


def registry_card(manifest: RegistryManifest, experts: list[ExpertRecord], *, registry_id: str,
                  endpoint: str, plots: Sequence[str] = (), n_experts: int | None = None) -> DatasetCard:
    """Render the dataset card of a registry: what it is, its experts table, plots, how to use it.

    Args:
        manifest / experts: the registry's manifest and rows.
        registry_id / endpoint: for links.
        plots: paths of image files *in the registry repo* (e.g. ``plots/topic_map.png``), shown in a
            "Plots" section through their ``resolve/main`` URLs; none, no section.
        n_experts: how many experts the registry holds, when ``experts`` shows only some of them (a big
            v2 registry's card lists its first rows).
    """
    data_files = EXPERTS_FILENAME if manifest.format_version == 1 else "data/*.parquet"
    card_data = DatasetCardData(
        license="apache-2.0",
        pretty_name=f"MoIN registry {registry_id}",
        tags=["moin", "moin-registry", "lora", "peft"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": data_files}]}],
        moin={
            "format_version": manifest.format_version,
            "base_model": manifest.base_model.repo_id,
            "embedder": manifest.embedder.repo_id,
        },
    )
    rows = []
    for record in sorted(experts, key=lambda r: r.expert_id):
        if record.perplexity is not None and record.base_perplexity is not None:
            ppl = f"{record.base_perplexity:.2f} → {record.perplexity:.2f}"
        elif record.perplexity is not None:
            ppl = f"? → {record.perplexity:.2f}"
        else:
            ppl = "n/a"
        change, change_pct = change_cell(record.perplexity, record.base_perplexity)
        rows.append({
            "expert_id": record.expert_id,
            "repo_id": record.repo_id,
            "keywords": [k.replace("|", "/") for k in record.keywords],
            "n_docs": record.n_docs,
            "ppl": ppl,
            "change": change,
            "change_pct": change_pct,
            "size": human_size(record.adapter_bytes),
            "revision": record.revision,
        })
    content = _render(
        REGISTRY_TEMPLATE,
        card_data=card_data.to_yaml(),
        registry_id=registry_id,
        endpoint=endpoint,
        description=manifest.description,
        base_model=manifest.base_model.repo_id,
        base_revision=manifest.base_model.revision,
        embedder_id=manifest.embedder.repo_id,
        embedder_revision=manifest.embedder.revision,
        embedder_dim=manifest.embedder.dim,
        distance=manifest.distance,
        format_version=manifest.format_version,
        experts=rows,
        n_experts=len(experts) if n_experts is None else n_experts,
        plots=[{"title": plot_title(path), "url": f"{endpoint}/datasets/{registry_id}/resolve/main/{path}"}
               for path in plots],
        created_by=f"moin-hub {__version__}",
    )
    return DatasetCard(content)
