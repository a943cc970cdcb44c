"""Options, output and error handling shared by every `moin-hub` command."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def endpoint_option(func: F) -> F:
    return click.option(
        "--endpoint", envvar="HF_ENDPOINT", default=None, metavar="URL",
        help="Hub endpoint (default: $HF_ENDPOINT, else https://huggingface.co).",
    )(func)


def token_option(func: F) -> F:
    return click.option(
        "--token", envvar="HF_TOKEN", default=None, metavar="TOKEN", show_envvar=True,
        help="Hub token (default: $HF_TOKEN or the saved login). Never printed.",
    )(func)


def format_option(func: F) -> F:
    return click.option(
        "--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
        help="Output for people (text) or scripts (json, one object on stdout).",
    )(func)


def registry_option(func: F) -> F:
    return click.option(
        "--registry", required=True, metavar="ORG/NAME", envvar="MOIN_REGISTRY", show_envvar=True,
        help="The registry dataset repo.",
    )(func)


def hub_options(func: F) -> F:
    """--endpoint, --token and --format, in that order in --help."""
    return endpoint_option(token_option(format_option(func)))


def emit(output_format: str, data: dict[str, Any], text: str | Callable[[], str]) -> None:
    """Print ``data`` as JSON or ``text`` for people."""
    if output_format == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    else:
        click.echo(text() if callable(text) else text)


def examples(*lines: str) -> str:
    """An "Examples" epilog for a command's --help."""
    body = "\n".join(f"  {line}" for line in lines)
    return f"\b\nExamples:\n{body}"


def debug_enabled() -> bool:
    return os.environ.get("MOIN_DEBUG", "").lower() not in ("", "0", "false", "no")


def die(message: str, hint: str | None = None, code: int = 1) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    if not debug_enabled():
        click.echo("(set MOIN_DEBUG=1 for the traceback)", err=True)
    sys.exit(code)
