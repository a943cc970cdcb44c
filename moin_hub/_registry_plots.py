"""Put a workspace's plots (``plots/*.png`` from ``moin-hub evaluate``) into a registry and show them in its card.

One commit adds the images under ``plots/`` in the registry dataset repo and re-renders ``README.md``
with a "Plots" section; like every registry write it is made with ``parent_commit`` = the head it was
computed from and recomputed when someone else committed first (HTTP 412).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd

from . import _cards
from ._hub import get_api, http_status, resolve_endpoint
from ._registry import DEFAULT_MAX_RETRIES, Registry
from ._validators import validate_relative_path
from .errors import MoinHubError, RegistryConflictError, UnsafeFileError

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".webp")


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

    Example:
        >>> publish_plots("acme/moin-registry", "work/plots")  # doctest: +SKIP
    """
    files = plot_files(plots)
    endpoint = resolve_endpoint(endpoint)
    api = get_api(endpoint, token)
    paths = [f"{PLOTS_DIR}/{path.name}" for path in files]
    for attempt in range(max_retries):
        registry = Registry.load(registry_id, endpoint=endpoint, token=token)
        card = _cards.registry_card(registry.manifest, list(registry.experts), registry_id=registry_id,
                                    endpoint=endpoint, plots=paths)
        operations = [CommitOperationAdd(name, str(path)) for name, path in zip(paths, files, strict=True)]
        operations.append(CommitOperationAdd("README.md", str(card).encode()))
        try:
            info = api.create_commit(registry_id, operations, repo_type="dataset", parent_commit=registry.revision,
                                     commit_message=f"Add {len(files)} plot(s) to the registry card")
        except Exception as err:
            if http_status(err) != 412:
                raise
            delay = min(2.0, 0.05 * 2 ** min(attempt, 5)) * (0.5 + random.random())
            logger.info("registry %s moved while adding plots (attempt %d); retrying in %.2fs", registry_id,
                        attempt + 1, delay)
            sleep(delay)
            continue
        return info.oid
    raise RegistryConflictError(registry_id, max_retries)
