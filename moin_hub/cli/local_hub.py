"""`moin-hub local-hub`: serve a Hub-compatible server on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ._common import examples


@click.command(
    "local-hub",
    epilog=examples(
        "moin-hub local-hub --port 8080 --data ./hub-data",
        "HF_ENDPOINT=http://127.0.0.1:8080 moin-hub route --registry acme/reg --query '...'",
    ),
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep it on loopback).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0 = any free).")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the repos (created if missing; reused across restarts).")
@click.option("--token", "tokens", multiple=True, metavar="NAMESPACE=TOKEN",
              help="Require TOKEN to write into NAMESPACE (repeatable). Reads stay open.")
@click.option("--verbose", is_flag=True, help="Log every request.")
def command(host: str, port: int, data_dir: Path, tokens: tuple[str, ...], verbose: bool) -> None:
    """Run a local Hugging Face Hub-compatible server (for offline work and tests).

    The real `huggingface_hub` client, `datasets`, `transformers` and `peft` work against it
    unchanged: point them at it with HF_ENDPOINT or --endpoint. Stop it with Ctrl-C.
    """
    from ..local_hub.server import LocalHub

    token_map = {}
    for item in tokens:
        namespace, sep, secret = item.partition("=")
        if not sep or not namespace or not secret:
            raise click.BadParameter(f"expected NAMESPACE=TOKEN, got {item.split('=')[0]!r}=...",
                                     param_hint="--token")
        token_map[namespace] = secret
    hub = LocalHub(data_dir, host=host, port=port, tokens=token_map or None, verbose=verbose)
    hub.start()
    click.echo(f"Local hub serving {data_dir} at {hub.url}  (export HF_ENDPOINT={hub.url})")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
