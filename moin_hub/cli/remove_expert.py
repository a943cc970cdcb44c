"""`moin-hub remove-expert`: take an expert out of a registry."""

from __future__ import annotations

import click

from ._common import emit, examples, hub_options, registry_option


@click.command("remove-expert", epilog=examples(
    "moin-hub remove-expert topic-03 --registry acme/moin-registry",
    "moin-hub remove-expert acme/moin-topic-03 --registry acme/moin-registry --delete-repo --format json",
))
@click.argument("expert")
@registry_option
@click.option("--delete-repo", is_flag=True, help="Also delete the expert's model repo (after its row is gone).")
@click.option("--max-retries", default=30, show_default=True, type=click.IntRange(1),
              help="Registry update attempts when others write at the same time.")
@hub_options
def command(expert: str, registry: str, delete_repo: bool, max_retries: int, endpoint: str | None,
            token: str | None, output_format: str) -> None:
    """Remove EXPERT (expert id or repo id) from a registry.

    \b
    The row is removed in one conflict-safe registry commit (concurrent pushes and removals never
    lose each other's changes). With --delete-repo the expert's model repo is deleted afterwards,
    so no row ever points at a deleted repo.
    """
    from ..hub.push import remove_expert

    result = remove_expert(expert, registry=registry, delete_repo=delete_repo, endpoint=endpoint, token=token,
                           max_retries=max_retries)
    emit(output_format, result.to_dict(), lambda: (
        f"Removed expert {result.expert_id} ({result.repo_id}) from {registry}; "
        f"{result.n_experts} expert(s) left (commit {result.registry_revision[:12]})."
        + (f"\nDeleted repo {result.repo_id}." if result.repo_deleted else "")
    ))
