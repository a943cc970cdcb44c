"""The `moin-hub` command line: one group, one module per command, one error handler.

Known errors (moin-hub's own, the Hub client's, bad values) become a one-line message and exit code 1;
``MOIN_DEBUG=1`` shows the traceback instead.

May import every stage (:mod:`moin_hub.pipeline`, :mod:`moin_hub.serving`, :mod:`moin_hub.hub`,
:mod:`moin_hub.local_hub`) and the top-level modules; commands import their stage inside the command, so
``--help`` stays fast. Nothing imports the CLI but :mod:`moin_hub.__main__` (``python -m moin_hub``).
"""

from __future__ import annotations

import sys

import click

from .._version import __version__
from ._common import debug_enabled, die


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moin-hub")
def cli() -> None:
    """moin-hub: topic experts (LoRA adapters) on the Hugging Face Hub, routed by query content.

    \b
    A registry (a Hub dataset) indexes experts by topic centroid. Push experts into it, then
    route a query to its nearest expert and pull only that adapter.
    \b
    Every command takes --endpoint (or $HF_ENDPOINT) to talk to any Hub-compatible server,
    e.g. the local one from `moin-hub local-hub`.
    """


def _register() -> None:
    from . import (
        demo,
        init_registry,
        local_hub,
        pipeline,
        publish_assets,
        pull,
        push_expert,
        register,
        registry,
        remove_expert,
        route,
        serve,
        space,
    )

    for module in (local_hub, init_registry, push_expert, register, remove_expert, route, pull, registry,
                   publish_assets, demo, space, serve):
        cli.add_command(module.command)
    for command in pipeline.COMMANDS:
        cli.add_command(command)


_register()


def _known_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from ..errors import MoinHubError

    return (MoinHubError, HfHubHTTPError, HFValidationError, ValueError, LookupError, OSError)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `moin-hub` console script."""
    try:
        cli.main(args=argv, prog_name="moin-hub", standalone_mode=False)
    except click.exceptions.Abort:
        die("aborted", code=130)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except _known_errors() as err:
        if debug_enabled():
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        die(f"{message}" if ":" in message or " " in message else f"{type(err).__name__}: {message}",
            getattr(err, "hint", None))


__all__ = ["cli", "main"]
