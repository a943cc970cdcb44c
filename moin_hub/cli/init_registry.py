"""`moin-hub init-registry`: create a registry dataset repo."""

from __future__ import annotations

import click

from ._common import emit, examples, hub_options


@click.command(
    "init-registry",
    epilog=examples(
        "moin-hub init-registry acme/moin-registry --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\",
        "    --embedder sentence-transformers/all-MiniLM-L6-v2",
    ),
)
@click.argument("registry_id", metavar="ORG/NAME")
@click.option("--base-model", required=True, metavar="REPO", help="Base model every expert adapts.")
@click.option("--base-revision", default=None, metavar="REV", help="Base model revision to pin (default main).")
@click.option("--embedder", required=True, metavar="REPO", help="sentence-transformers model for centroids.")
@click.option("--embedder-revision", default=None, metavar="REV", help="Embedder revision to pin (default main).")
@click.option("--embedder-dim", default=None, type=click.IntRange(1), help="Embedder dimension (read from it if omitted).")
@click.option("--description", default="", help="Free text for the registry card.")
@click.option("--private", is_flag=True, help="Create a private dataset repo.")
@click.option("--exist-ok", is_flag=True, help="Reuse an existing registry with the same base model and embedder.")
@hub_options
def command(registry_id: str, base_model: str, base_revision: str | None, embedder: str,
            embedder_revision: str | None, embedder_dim: int | None, description: str, private: bool,
            exist_ok: bool, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Create a registry: a Hub dataset that indexes experts of one base model.

    Base model and embedder are pinned to commit shas at creation; every expert pushed later must
    be a LoRA adapter of that base model with a centroid from that embedder.
    """
    from ..hub.registry import init_registry

    registry = init_registry(
        registry_id, base_model=base_model, embedder=embedder, base_revision=base_revision,
        embedder_revision=embedder_revision, embedder_dim=embedder_dim, description=description,
        private=private, exist_ok=exist_ok, endpoint=endpoint, token=token,
    )
    manifest = registry.manifest
    data = {"registry": registry.registry_id, "revision": registry.revision, "url": registry.url,
            **manifest.to_dict()}
    emit(output_format, data, lambda: (
        f"Registry {registry.registry_id} at {registry.revision[:12]}: {registry.url}\n"
        f"  base model  {manifest.base_model.repo_id}@{manifest.base_model.revision[:12]}\n"
        f"  embedder    {manifest.embedder.repo_id}@{manifest.embedder.revision[:12]} ({manifest.embedder.dim}-d)"
    ))
