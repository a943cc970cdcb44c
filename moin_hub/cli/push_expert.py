"""`moin-hub push-expert`: push one expert folder and register it."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import emit, examples, hub_options, registry_option


@click.command(
    "push-expert",
    epilog=examples(
        "moin-hub push-expert experts/topic-03 --registry acme/moin-registry --repo-id acme/moin-topic-03",
        "moin-hub push-expert experts/topic-03 --registry acme/moin-registry --repo-id acme/t3 --format json",
        "moin-hub push-expert work/seed --registry acme/moin-registry --repo-id acme/moin-seed --fallback",
    ),
)
@click.argument("expert_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@registry_option
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="The expert's own model repo (created if missing).")
@click.option("--expert-id", default=None, help="Id in the registry (default: the id in moin_expert.json).")
@click.option("--private", is_flag=True, help="Create the expert repo as private.")
@click.option("--message", default=None, help="Commit message of the expert commit.")
@click.option("--fallback", is_flag=True,
              help="Make it the registry's fallback expert instead of a routed row: queries below the routing "
                   "threshold get it rather than the bare base model (e.g. branch-train's seed, WORKDIR/seed).")
@click.option("--max-retries", default=30, show_default=True, type=click.IntRange(1),
              help="Registry update attempts when others push at the same time.")
@hub_options
def command(expert_dir: Path, registry: str, repo_id: str, expert_id: str | None, private: bool,
            message: str | None, fallback: bool, max_retries: int, endpoint: str | None, token: str | None,
            output_format: str) -> None:
    """Push EXPERT_DIR as its own model repo (one commit) and add or update its registry row.

    \b
    EXPERT_DIR holds adapter_config.json, adapter_model.safetensors (PEFT LoRA),
    centroid.safetensors and moin_expert.json. The adapter's base model and the centroid's
    dimension must match the registry. The model card is rendered with keywords, samples,
    perplexities and usage. The registry row pins the new commit and the sha256 of every file;
    concurrent pushers never lose a row (optimistic commits, retried on conflict).
    """
    from ..hub.push import push_expert

    result = push_expert(expert_dir, registry=registry, repo_id=repo_id, expert_id=expert_id, private=private,
                         commit_message=message, endpoint=endpoint, token=token, max_retries=max_retries,
                         fallback=fallback)
    role = "its fallback expert" if fallback else f"{result.n_experts} expert(s)"
    emit(output_format, {**result.to_dict(), "fallback": fallback}, lambda: (
        f"Pushed expert {result.expert_id}: {result.url} (commit {result.revision})\n"
        f"Registry {result.registry_id} now has {role} (commit {result.registry_revision[:12]})."
    ))
