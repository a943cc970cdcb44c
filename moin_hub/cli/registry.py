"""`moin-hub registry show`: what a registry holds."""

from __future__ import annotations

import click

from ._common import emit, examples, hub_options, registry_option


@click.group("registry")
def command() -> None:
    """Inspect registries."""


@command.command("show", epilog=examples("moin-hub registry show --registry acme/moin-registry --format json"))
@registry_option
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def show(registry: str, revision: str | None, endpoint: str | None, token: str | None, output_format: str) -> None:
    """List the experts of a registry with their keywords and perplexities."""
    from .._registry import Registry

    reg = Registry.load(registry, revision=revision, endpoint=endpoint, token=token)
    data = {
        "registry": reg.registry_id, "revision": reg.revision, "manifest": reg.manifest.to_dict(),
        "experts": [{k: v for k, v in r.to_dict().items() if k != "centroid"} for r in reg],
    }

    def text() -> str:
        lines = [f"{reg.registry_id}@{reg.revision[:12]}: {len(reg)} expert(s), base "
                 f"{reg.manifest.base_model.repo_id}, embedder {reg.manifest.embedder.repo_id}"]
        for r in reg:
            ppl = (f"ppl {r.base_perplexity:.2f} -> {r.perplexity:.2f}"
                   if r.perplexity is not None and r.base_perplexity is not None else "ppl n/a")
            lines.append(f"  {r.expert_id:<20} {r.repo_id:<40} {ppl:<22} {', '.join(r.keywords[:5])}")
        return "\n".join(lines)

    emit(output_format, data, text)
