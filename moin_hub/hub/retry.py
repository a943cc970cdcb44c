"""Retries of transient Hub failures (5xx, 429, timeouts, dropped connections), with jittered back-off.

Only operations that are safe to repeat are retried: reads, and writes that re-read the state they
depend on at every attempt (a commit made with ``parent_commit`` = the head read in the same attempt).
A 4xx other than 408/429 is never retried: it will not get better.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import HubUnavailableError
from .client import http_status

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth trying again.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Attempts per operation; ``MOIN_HUB_ATTEMPTS`` overrides it.
DEFAULT_ATTEMPTS = 6


def default_attempts() -> int:
    value = os.environ.get("MOIN_HUB_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_ATTEMPTS


def is_transient(error: BaseException) -> bool:
    """True for errors a retry may cure: transient HTTP statuses and transport failures."""
    status = http_status(error)
    if status is not None:
        return status in TRANSIENT_STATUS
    try:
        import httpx2  # the HTTP client of huggingface_hub 2.x
    except ImportError:  # pragma: no cover - older clients
        httpx2 = None
    if httpx2 is not None and isinstance(error, httpx2.TransportError):
        return True
    return isinstance(error, (ConnectionError, TimeoutError)) and not isinstance(error, HubUnavailableError)


def backoff(attempt: int, *, base: float = 0.2, cap: float = 4.0) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential, capped, with 50-150% jitter."""
    return min(cap, base * 2**attempt) * (0.5 + random.random())


def retry_transient(operation: Callable[[], T], *, what: str, attempts: int | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``operation()`` until it succeeds, retrying transient failures.

    Args:
        operation: a callable that is safe to repeat.
        what: the operation, for messages ("download of acme/x@abc:adapter_model.safetensors").
        attempts: the most calls (default :func:`default_attempts`).
        sleep: the sleep function (tests pass a fake).

    Raises:
        HubUnavailableError: every attempt failed transiently.
        Any non-transient error, at once.
    """
    attempts = attempts or default_attempts()
    for attempt in range(attempts):
        try:
            return operation()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts - 1:
                raise HubUnavailableError(what, attempts, err) from err
            delay = backoff(attempt)
            logger.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(err).__name__,
                           str(err).strip().splitlines()[0][:200] if str(err).strip() else "", attempt + 1,
                           attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
