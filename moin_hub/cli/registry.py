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
    from ..hub.registry import Registry

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


@command.command("verify", epilog=examples("moin-hub registry verify --registry acme/moin-registry"))
@registry_option
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def verify(registry: str, revision: str | None, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Check every expert of a registry as `pull` would (exit code 1 if any is broken).

    \b
    For each row: its pinned commit exists, its repo holds no pickle, every file matches the
    recorded sha256, and its adapter names the registry's base model. Files go to the HF cache.
    """
    import sys

    from ..hub.pull import verify_registry
    from ..hub.registry import Registry

    report = verify_registry(Registry.load(registry, revision=revision, endpoint=endpoint, token=token),
                             token=token)

    def text() -> str:
        lines = [f"{report.registry_id}@{report.revision[:12]}: {report.checked} expert(s) checked, "
                 f"{len(report.problems)} problem(s)"]
        lines += [f"  {expert_id}: {reason}" for expert_id, reason in report.problems.items()]
        return "\n".join(lines)

    emit(output_format, report.to_dict(), text)
    if not report.ok:
        sys.exit(1)
