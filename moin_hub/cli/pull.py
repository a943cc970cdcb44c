"""`moin-hub pull`: route a query, then download and verify only the chosen expert."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import emit, examples, hub_options, registry_option
from .route import format_routes, k_option


@click.command(
    "pull",
    epilog=examples(
        "moin-hub pull --registry acme/moin-registry --query 'Who won the cup final?'",
        "moin-hub pull --registry acme/moin-registry --expert topic-03 --local-dir ./topic-03",
        "moin-hub pull --registry acme/moin-registry -q 'tax law' --format json | jq .path",
    ),
)
@registry_option
@click.option("--query", "-q", default=None, help="The text to route; its nearest expert is pulled.")
@click.option("--expert", default=None, help="Pull this expert id or repo id instead of routing.")
@k_option
@click.option("--local-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Download into this folder instead of the HF cache.")
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def command(registry: str, query: str | None, expert: str | None, k: int, local_dir: Path | None,
            revision: str | None, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Route a query (or name an expert), download that expert at its pinned commit, verify it.

    Every file's sha256 is checked against the registry; a mismatch is refused and nothing is
    loaded. Prints the route (expert, similarity, runner-ups) and the local path.
    """
    from ..hub.pull import pull

    if (query is None) == (expert is None):
        raise click.UsageError("give exactly one of --query or --expert")
    result = pull(query, registry=registry, expert=expert, k=k, local_dir=local_dir, revision=revision,
                  endpoint=endpoint, token=token)

    def text() -> str:
        head = format_routes(result.route) + "\n" if result.route else ""
        if result.matched is False:
            head += (f"Note: the best score is below the registry's calibrated threshold "
                     f"{result.registry.manifest.default_threshold:+.3f}: no expert matches this query well "
                     "(route and serve would answer with the base model).\n")
        return (f"{head}Pulled {result.expert.expert_id} ({result.expert.repo_id}@{result.expert.revision[:12]}), "
                f"{len(result.expert.files)} files verified\n{result.path}")

    emit(output_format, result.to_dict(), text)
