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
        score = "" if route.score is None else f" (z {route.score:+.2f})"
        lines.append(f"{mark} {route.similarity:6.3f}{score}  {route.expert.expert_id:<20} {route.expert.repo_id}  "
                     f"[{keywords}]")
    return "\n".join(lines)


@click.command(
    "route",
    epilog=examples(
        "moin-hub route --registry acme/moin-registry --query 'How long do I knead bread dough?'",
        "moin-hub route --registry acme/moin-registry -q 'offside rule' -k 5 --format json",
        "moin-hub route --registry acme/moin-registry -q 'offside rule' --mode adaptive --threshold 0.1",
    ),
)
@registry_option
@query_option
@k_option
@click.option("--mode", type=click.Choice(["top1", "topk", "adaptive"]), default="top1", show_default=True,
              help="top1: the nearest expert (MoIN); topk: the k nearest, softmax-weighted; adaptive: as few "
                   "as carry --mass of the probability.")
@click.option("--mass", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
              help="adaptive: probability mass the chosen experts must reach.")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True,
              help="Softmax temperature over the similarities (topk, adaptive).")
@click.option("--threshold", type=float, default=None,
              help="Below this best score no expert is used (the base model answers): the calibrated z-score when "
                   "the expert's row has similarity statistics, else the cosine. Default: the registry's "
                   "calibrated default_threshold, if any.")
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def command(registry: str, query: str, k: int, mode: str, mass: float, temperature: float, threshold: float | None,
            revision: str | None, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Route a query to its nearest experts (cosine to topic centroids) without downloading them.

    \b
    Also prints the mixture the query would get in --mode: which experts, with which weights
    (none when the best similarity is below --threshold: the base model answers).
    """
    from ..hub.mixing import plan_mixture
    from ..hub.router import Router

    router = Router.from_registry(registry, revision=revision, endpoint=endpoint, token=token)
    result = router.route(query, k=k)
    if threshold is None:
        threshold = router.registry.manifest.default_threshold
    fallback = router.registry.fallback
    mixture = plan_mixture(result, mode=mode, k=k, temperature=temperature, mass=mass, threshold=threshold,
                           fallback=None if fallback is None else fallback.expert_id)

    def text() -> str:
        mixed = (", ".join(f"{e} x{w:.2f}" for e, w in zip(mixture.experts, mixture.weights, strict=True))
                 if not mixture.base_only else "none: below the threshold, the base model answers")
        if mixture.mode == "fallback":
            mixed += " (below the threshold: the registry's fallback expert)"
        return f"{format_routes(result)}\nMixture ({mode}): {mixed}"

    emit(output_format, {**result.to_dict(), "mixture": mixture.to_dict()}, text)
