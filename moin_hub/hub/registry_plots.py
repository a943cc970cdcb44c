"""Put a workspace's plots (``plots/*.png`` from ``moin-hub evaluate``) into a registry and show them in its card.

One commit adds the images under ``plots/`` in the registry dataset repo and re-renders ``README.md``
with a "Plots" section; it is an ordinary registry write (:func:`~moin_hub.hub.registry.update_registry`):
conflict-safe, retried on 412 and on transient failures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .._validators import validate_relative_path
from ..errors import MoinHubError, UnsafeFileError
from .config import PLOT_SUFFIXES, PLOTS_DIR
from .registry import DEFAULT_MAX_RETRIES, update_registry


def plot_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files of a plots folder (sorted), or the given files, checked.

    Raises:
        MoinHubError: a file is missing.
        UnsafeFileError: a file is not an image (by suffix).
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in PLOT_SUFFIXES)
    else:
        files = [Path(p) for p in ([source] if isinstance(source, (str, Path)) else source)]
    for path in files:
        if not path.is_file():
            raise MoinHubError(f"Plot {str(path)!r} not found.", hint="Run `moin-hub evaluate` to write the plots.")
        if path.suffix.lower() not in PLOT_SUFFIXES:
            raise UnsafeFileError(str(path), f"a plot must be an image ({', '.join(PLOT_SUFFIXES)})")
        validate_relative_path(f"{PLOTS_DIR}/{path.name}", field="plot name")
    return files


def publish_plots(registry_id: str, plots: str | Path | Sequence[str | Path], *, endpoint: str | None = None,
                  token: str | bool | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                  sleep: Callable[[float], None] = time.sleep) -> str:
    """Upload plot images into ``plots/`` of a registry and show them in its card, in one commit.

    Args:
        registry_id: the registry dataset repo.
        plots: a folder (its images are taken) or a list of image files.
        endpoint / token: Hub settings.
        max_retries: attempts when others commit to the registry at the same time.

    Returns:
        The commit sha of the registry after the upload.

    Raises:
        MoinHubError / UnsafeFileError: a plot is missing or not an image.
        RegistryNotFoundError: no such registry.
        RegistryConflictError: the registry moved on every attempt.
        HubUnavailableError: the Hub kept failing through every retry.

    Example:
        >>> publish_plots("acme/moin-registry", "work/plots")  # doctest: +SKIP
    """
    files = plot_files(plots)
    updated = update_registry(
        registry_id, lambda manifest, rows: rows, commit_message=f"Add {len(files)} plot(s) to the registry card",
        extra_files={f"{PLOTS_DIR}/{path.name}": path for path in files}, endpoint=endpoint, token=token,
        max_retries=max_retries, sleep=sleep)
    return updated.revision
