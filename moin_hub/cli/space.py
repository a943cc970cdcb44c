"""`moin-hub space`: run the MoIN router Space (Gradio) locally, against any Hub."""

from __future__ import annotations

import click

from ._common import endpoint_option, examples, registry_option, token_option


@click.command(
    "space",
    epilog=examples(
        "moin-hub space --registry acme/moin-registry",
        "moin-hub local-hub --data demo-out/hub --port 8080 &",
        "moin-hub space --registry moin-demo/brown-experts --endpoint http://127.0.0.1:8080 --port 7861",
        "moin-hub space --registry acme/moin-registry --threshold 0.2 --cache-size 8",
    ),
)
@registry_option
@click.option("--revision", default=None, help="Registry revision (default: head of main, followed on Refresh).")
@endpoint_option
@token_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep it on loopback).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--threshold", default=None, type=float, envvar="MOIN_THRESHOLD", show_envvar=True,
              help="Below this best score no expert matches and the base model answers: the calibrated z-score "
                   "where the expert's row has similarity statistics, else the cosine. Default: the registry's "
                   "calibrated default_threshold, else cosine 0.1.")
@click.option("--base-model", default=None, envvar="MOIN_BASE_MODEL", show_envvar=True, metavar="ORG/NAME[@REV]",
              help="Serve the experts on this base model instead of the registry's (same architecture), "
                   "or on a local folder.")
@click.option("--cache-size", default=4, show_default=True, type=click.IntRange(1),
              help="Expert adapters kept loaded (LRU).")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1, 4096),
              help="The most tokens one request may generate.")
@click.option("--share", is_flag=True, default=False,
              help="Ask Gradio for a public share link (off by default; contacts Gradio's servers).")
@click.option("--warm-up/--no-warm-up", default=True, show_default=True,
              help="Load the embedder and base model before serving.")
def command(registry: str, revision: str | None, endpoint: str | None, token: str | None, host: str, port: int,
            threshold: float | None, base_model: str | None, cache_size: int, max_new_tokens: int, share: bool,
            warm_up: bool) -> None:
    """Run the MoIN router Space: route, generate (base vs expert), browse the registry.

    \b
    The same app as spaces/moin-router on the Hub: a query is routed to its topic expert,
    the adapter is pulled at its pinned commit and verified, and the base model runs with it.
    Loaded adapters stay cached, so switching experts does not reload the base model.
    """
    from ..serving import space_app
    from ..serving.space import SpaceEngine

    engine = SpaceEngine(registry, revision=revision, endpoint=endpoint, token=token, base_model=base_model,
                         threshold=threshold, cache_size=cache_size,
                         max_new_tokens_limit=max_new_tokens)
    click.echo(f"Registry {engine.registry.registry_id}@{engine.registry.revision[:12]} "
               f"({len(engine.registry)} experts) on {engine.endpoint}")
    if warm_up:
        click.echo("Loading the embedder and the base model ...")
        engine.warm_up()
    shown = "0.0.0.0" if host in ("", "0.0.0.0") else host  # noqa: S104 - only echoed
    click.echo(f"MoIN router Space at http://{shown}:{port}/  (Ctrl-C to stop)")
    space_app.launch(engine, host=host, port=port, share=share)
