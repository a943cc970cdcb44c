"""`moin-hub route`: which expert would answer a query (no download of adapters)."""

from __future__ import annotations

import click

from ._common import emit, examples, hub_options, registry_option


def query_option(func):  # noqa: ANN001, ANN201
    return click.option("--query", "-q", required=True, help="The text to route.")(func)


def k_option(func):  # noqa: ANN001, ANN201
    return click.option("-k", "--top-k", "k", default=3, show_default=True, type=click.IntRange(1),
                        help="How many candidate experts to show.")(func)


def format_routes(result) -> str:  # noqa: ANN001
    """Routes as a small text table."""
    lines = [f"Query: {result.query[:80]!r}  (embed {result.embed_ms:.1f} ms, search {result.search_ms:.2f} ms)"]
    for route in result.routes:
        mark = "->" if route.rank == 0 else "  "
        keywords = ", ".join(route.expert.keywords[:5])
        lines.append(f"{mark} {route.similarity:6.3f}  {route.expert.expert_id:<20} {route.expert.repo_id}  [{keywords}]")
    return "\n".join(lines)


@click.command(
    "route",
    epilog=examples(
        "moin-hub route --registry acme/moin-registry --query 'How long do I knead bread dough?'",
        "moin-hub route --registry acme/moin-registry -q 'offside rule' -k 5 --format json",
    ),
)
@registry_option
@query_option
@k_option
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def command(registry: str, query: str, k: int, revision: str | None, endpoint: str | None, token: str | None,
            output_format: str) -> None:
    """Route a query to its nearest experts (cosine to topic centroids) without downloading them."""
    from .._router import Router

    result = Router.from_registry(registry, revision=revision, endpoint=endpoint, token=token).route(query, k=k)
    emit(output_format, result.to_dict(), lambda: format_routes(result))
