"""Routing modes beyond the paper's single expert: how much of each routed expert a query gets.

- ``top1`` (MoIN): the nearest expert alone;
- ``topk``: the ``k`` nearest, weighted by a softmax of their similarities;
- ``adaptive``: as few experts as carry ``mass`` of the softmax probability (at most ``k``): one expert
  when the router is confident, more when it is not;
- with a ``threshold``, a query whose best similarity is below it gets no expert (the base model).

:func:`mix_weights` is a pure function of the similarities; :func:`apply_mixture` turns a
:class:`Mixture` into the active adapter of a PEFT model holding the experts (``moin__<id>`` slots), with
``add_weighted_adapter(combination_type="cat")``: the mixed update is exactly ``sum_i w_i * delta_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._validators import validate_positive_int
from .loading import adapter_name

MODES = ("top1", "topk", "adaptive")
#: The adapter slot that holds a mixture of several experts.
MIXTURE_SLOT = "moin__mixture"


def mix_weights(similarities: Sequence[float], *, mode: str = "top1", k: int = 3, temperature: float = 0.05,
                mass: float = 0.8, threshold: float | None = None) -> list[float]:
    """Weights of the candidates (same order as ``similarities``, best first), summing to 1, or ``[]``.

    Args:
        similarities: cosine similarities of the candidate experts, best first.
        mode: one of :data:`MODES`.
        k: the most experts mixed (``topk``, ``adaptive``).
        temperature: softmax temperature over similarities (cosines differ by a few hundredths).
        mass: ``adaptive``: the probability mass the chosen experts must reach, in (0, 1].
        threshold: below this best similarity no expert is used: ``[]`` means the base model.

    Raises:
        ValueError: an unknown mode, bad numbers, or similarities not sorted best first.

    Example:
        >>> mix_weights([0.6, 0.3], mode="top1")
        [1.0, 0.0]
        >>> [round(w, 3) for w in mix_weights([0.60, 0.58, 0.2], mode="adaptive", k=3)]
        [0.599, 0.401, 0.0]
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    validate_positive_int(k, field="k")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}.")
    sims = [float(s) for s in similarities]
    if not sims:
        return []
    if any(not math.isfinite(s) for s in sims) or any(a < b for a, b in zip(sims, sims[1:], strict=False)):
        raise ValueError("similarities must be finite and sorted best first.")
    if threshold is not None and sims[0] < threshold:
        return []
    if mode == "top1":
        return [1.0] + [0.0] * (len(sims) - 1)
    top = sims[: min(k, len(sims))]
    exps = [math.exp((s - top[0]) / temperature) for s in top]
    probs = [e / sum(exps) for e in exps]
    if mode == "adaptive":
        chosen, total = 0, 0.0
        while chosen < len(probs) and total < mass:
            total += probs[chosen]
            chosen += 1
        probs = [p / total for p in probs[:chosen]] + [0.0] * (len(probs) - chosen)
    return probs + [0.0] * (len(sims) - len(top))


@dataclass(frozen=True)
class Mixture:
    """The experts a query gets and their weights (empty: the base model alone)."""

    experts: tuple[str, ...]
    weights: tuple[float, ...]
    mode: str

    @property
    def base_only(self) -> bool:
        return not self.experts

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "experts": [{"expert_id": e, "weight": round(w, 6)}
                                               for e, w in zip(self.experts, self.weights, strict=True)]}


def plan_mixture(route: Any, *, mode: str = "top1", k: int = 3, temperature: float = 0.05, mass: float = 0.8,
                 threshold: float | None = None, fallback: str | None = None) -> Mixture:
    """The :class:`Mixture` of a :class:`~moin_hub.hub.router.RouteResult` (experts with weight 0 left out).

    ``threshold`` applies to the best route's calibrated score (:attr:`~moin_hub.hub.router.Route.score`)
    when its row has similarity statistics, else to its raw similarity. Below it the query gets
    ``fallback`` (the registry's fallback expert id, mode ``"fallback"``), or the base model without one.
    """
    if route.routes and not route.routes[0].clears(threshold):
        return Mixture((fallback,), (1.0,), "fallback") if fallback else Mixture((), (), mode)
    weights = mix_weights([r.similarity for r in route.routes], mode=mode, k=k, temperature=temperature,
                          mass=mass)
    kept = [(r.expert.expert_id, w) for r, w in zip(route.routes, weights, strict=False) if w > 0]
    return Mixture(tuple(e for e, _ in kept), tuple(w for _, w in kept), mode)


def apply_mixture(model: Any, mixture: Mixture) -> str | None:
    """Make ``mixture`` the active adapter of ``model`` (a PeftModel holding each expert as ``moin__<id>``).

    One expert: ``set_adapter`` on its slot. Several: a weighted ``cat`` combination in the slot
    :data:`MIXTURE_SLOT` (replaced on each call). No expert: returns ``None``; run the model inside
    ``model.disable_adapter()`` for the base model.

    Returns:
        The active adapter slot, or ``None`` for the base model.

    Raises:
        KeyError: an expert of the mixture is not loaded in ``model``.
    """
    if mixture.base_only:
        return None
    slots = [adapter_name(e) for e in mixture.experts]
    missing = [s for s in slots if s not in model.peft_config]
    if missing:
        raise KeyError(f"experts not loaded in the model: {missing}")
    if len(slots) == 1:
        model.set_adapter(slots[0])
        return slots[0]
    if MIXTURE_SLOT in model.peft_config:
        model.delete_adapter(MIXTURE_SLOT)
    model.add_weighted_adapter(slots, list(mixture.weights), adapter_name=MIXTURE_SLOT, combination_type="cat")
    model.set_adapter(MIXTURE_SLOT)
    return MIXTURE_SLOT


#: The temperatures :func:`calibrate_temperature` searches between (cosine similarities differ by 0.01-0.5).
TEMPERATURE_BOUNDS = (1e-3, 1.0)


def calibrate_temperature(similarities: Any, labels: Sequence[int]) -> tuple[float, float]:
    """The softmax temperature that makes ``softmax(similarities / T)`` the best probability of each query's
    topic: temperature scaling (Guo et al. 2017), the mean negative log-likelihood of ``labels`` minimised over
    ``log T`` in :data:`TEMPERATURE_BOUNDS`.

    ``topk`` and ``adaptive`` weight experts by that softmax (c-BTM weights its experts by such a posterior
    over clusters), so a calibrated T makes a weight mean "how likely this query is of that topic" on the
    registry's own data, instead of a fixed constant that suits one embedder and one corpus.

    Args:
        similarities: ``[queries, experts]`` cosine similarities of queries to every expert's centroid.
        labels: each query's true topic, an index into the columns.

    Returns:
        ``(temperature, mean_nll)``.

    Raises:
        ValueError: shapes that do not match, no queries, labels out of range, or non-finite similarities.

    Example:
        >>> t, _ = calibrate_temperature([[0.9, 0.1], [0.2, 0.8], [0.6, 0.5]], [0, 1, 0])
        >>> 0.001 <= t <= 1.0
        True
    """
    import numpy as np
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    sims = np.asarray(similarities, dtype=np.float64)
    labels = np.asarray(labels)
    if sims.ndim != 2 or sims.shape[0] == 0 or sims.shape[0] != labels.shape[0]:
        raise ValueError(f"similarities must be [queries, experts] with one label per query, got {sims.shape} "
                         f"and {labels.shape[0]} labels.")
    if not np.isfinite(sims).all():
        raise ValueError("similarities must be finite.")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= sims.shape[1]:
        raise ValueError(f"labels must be column indexes in [0, {sims.shape[1]}).")
    own = sims[np.arange(len(labels)), labels]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return float(np.mean(logsumexp(sims / t, axis=1) - own / t))

    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    best = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return math.exp(best.x), float(best.fun)
