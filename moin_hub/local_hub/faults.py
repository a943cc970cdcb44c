"""Fault injection in the local Hub: make chosen requests fail, stall or lose their answer.

Tests use it to check that moin-hub retries transient Hub failures and never loses a write
(:meth:`LocalHub.inject_fault <moin_hub.local_hub.server.LocalHub.inject_fault>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FAULT_KINDS = ("status", "delay", "drop", "drop_after")


@dataclass
class Fault:
    """A misbehaviour the hub applies to matching requests (see :meth:`LocalHub.inject_fault`).

    Attributes:
        kind: ``"status"`` (answer ``status`` with a JSON error), ``"delay"`` (sleep ``seconds``, then
            serve normally), ``"drop"`` (close the connection without answering) or ``"drop_after"`` (serve
            the request, so a commit lands, then close the connection without answering).
        method: HTTP method to match (``None``: any).
        path_regex: searched in the raw request target (path and query).
        times: how many more requests it applies to (``None``: forever).
    """

    kind: str
    method: str | None = None
    path_regex: str = ""
    status: int = 503
    seconds: float = 0.0
    times: int | None = 1
    hits: int = 0
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"Fault times must be >= 1 or None, got {self.times!r}")
        self._pattern = re.compile(self.path_regex)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method.upper() == method) and bool(self._pattern.search(target))


class FaultInjection:
    """The fault-injection methods of :class:`~moin_hub.local_hub.server.LocalHub`, which inherits them.

    The hub keeps its active faults in ``self._faults`` under ``self._lock``; its request handler asks
    :meth:`_take_fault` about each request and applies the fault it gets.
    """

    @property
    def faults(self) -> list[Fault]:
        """The faults still active (a copy)."""
        with self._lock:
            return list(self._faults)

    def inject_fault(
        self,
        method: str | None = None,
        path_regex: str = "",
        kind: str = "status",
        *,
        status: int = 503,
        seconds: float = 0.0,
        times: int | None = 1,
    ) -> Fault:
        """Make the next ``times`` requests matching ``method`` and ``path_regex`` misbehave.

        Args:
            method: ``"GET"``, ``"POST"``... (``None``: any method).
            path_regex: regular expression searched in the raw request target, e.g. ``r"/commit/"``.
            kind: ``"status"`` answers ``status`` with ``{"error": ...}``; ``"delay"`` sleeps
                ``seconds`` and then serves normally; ``"drop"`` closes the connection unanswered;
                ``"drop_after"`` serves the request (a commit lands) and then closes it unanswered.
            times: number of matching requests affected (``None``: until :meth:`clear_faults`).

        Returns:
            The :class:`Fault`; its ``hits`` counts the requests it affected.

        Example:
            >>> hub.inject_fault("POST", r"/commit/", status=503, times=2)  # two 503s, then normal
        """
        fault = Fault(
            kind=kind, method=method, path_regex=path_regex, status=status, seconds=seconds, times=times
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, target):
                    fault.hits += 1
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
        return None
