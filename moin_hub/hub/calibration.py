"""Calibrated routing: choose a registry's default threshold from on-topic and off-topic queries.

A route's calibrated score is its similarity as a z-score against the chosen expert's own documents
(``(cosine - sim_mean) / sim_std``, see :meth:`~moin_hub.ExpertRecord.calibrated`): a broad topic whose
documents sit far from their centroid is not penalised against a tight one. ``calibrate_registry`` routes
held-out on-topic queries and off-topic prompts, picks the threshold on that score that best separates
them (the largest smallest-of-both rate), and can write it to the manifest as ``default_threshold``,
which ``route``, ``serve`` and the Space apply when no threshold is given (a routed ``pull`` reports
whether its expert clears it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import MoinHubError
from .client import resolve_endpoint
from .registry import DEFAULT_MAX_RETRIES, update_manifest


@dataclass(frozen=True)
class CalibrationReport:
    """The chosen threshold and how well it separates the two query sets."""

    registry_id: str
    threshold: float
    kept: float  # share of on-topic queries at or above the threshold
    rejected: float  # share of off-topic queries below it
    n_on_topic: int
    n_off_topic: int
    written_revision: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def choose_threshold(on_topic: Sequence[float], off_topic: Sequence[float]) -> tuple[float, float, float]:
    """The threshold that maximises min(kept on-topic, rejected off-topic) (ties: their sum), a midpoint.

    Returns:
        ``(threshold, kept, rejected)``.

    Example:
        >>> choose_threshold([1.0, 2.0, 3.0], [-2.0, -1.0, 0.0])
        (0.5, 1.0, 1.0)
    """
    on = np.sort(np.asarray(on_topic, dtype=np.float64))
    off = np.sort(np.asarray(off_topic, dtype=np.float64))
    if not len(on) or not len(off):
        raise ValueError("calibration needs at least one on-topic and one off-topic query")
    values = np.unique(np.concatenate([on, off]))
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    kept = 1.0 - np.searchsorted(on, cuts, side="left") / len(on)
    rejected = np.searchsorted(off, cuts, side="left") / len(off)
    best = max(range(len(cuts)), key=lambda i: (min(kept[i], rejected[i]), kept[i] + rejected[i]))
    return round(float(cuts[best]), 6), float(kept[best]), float(rejected[best])


def best_scores(router, queries: Sequence[str]) -> list[float]:  # noqa: ANN001 - a Router
    """The calibrated score of each query's best route.

    Raises:
        MoinHubError: an expert's row has no similarity statistics.
    """
    vectors = router.embedder.encode(list(queries))
    scores = []
    for vector in vectors:
        best = router.route_vector(vector, k=1).best
        if best.score is None:
            raise MoinHubError(f"Expert {best.expert.expert_id!r} has no similarity statistics (sim_mean, sim_std).",
                               hint="Push it again with a moin-hub that records them, or register it with --examples.")
        scores.append(best.score)
    return scores


def calibrate_registry(registry_id: str, on_topic: Sequence[str], off_topic: Sequence[str], *, write: bool = False,
                       endpoint: str | None = None, token: str | bool | None = None, router=None,  # noqa: ANN001
                       max_retries: int = DEFAULT_MAX_RETRIES) -> CalibrationReport:
    """Choose (and optionally write) a registry's default routing threshold on calibrated scores.

    Args:
        registry_id: the registry.
        on_topic: held-out queries the registry's experts should answer.
        off_topic: prompts no expert should take (greetings, other subjects).
        write: record ``default_threshold`` and the rates in the manifest (one conflict-safe commit).
        endpoint / token: Hub settings.
        router: a :class:`~moin_hub.Router` to use (default: one over the registry's head).

    Example:
        >>> calibrate_registry("acme/moin-registry", ["Who won the 1961 pennant?"], ["hello"])  # doctest: +SKIP
    """
    from .router import Router

    endpoint = resolve_endpoint(endpoint)
    router = router or Router.from_registry(registry_id, endpoint=endpoint, token=token)
    threshold, kept, rejected = choose_threshold(best_scores(router, on_topic), best_scores(router, off_topic))
    report = CalibrationReport(registry_id, threshold, kept, rejected, len(on_topic), len(off_topic))
    if not write:
        return report
    calibration = {"kept": round(kept, 4), "rejected": round(rejected, 4), "n_on_topic": len(on_topic),
                   "n_off_topic": len(off_topic), "score": "z-score of cosine vs the expert's own documents",
                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    sha = update_manifest(registry_id, lambda m: replace(m, default_threshold=threshold, calibration=calibration),
                          commit_message=f"Calibrate routing threshold: {threshold}", endpoint=endpoint,
                          token=token, max_retries=max_retries)
    return replace(report, written_revision=sha)
