"""Batching for `moin-hub serve`: requests collected for a few milliseconds run as one batch.

An :class:`ExpertBatcher` thread takes pending :class:`Job` objects, groups those with the same sampling
settings (:func:`next_batch`; rows may use different single experts, a mixture of several experts batches
only with the same mixture) and runs each group as one padded batch on the engine's one base model. When to
run a batch that is not full is :func:`batch_deadline`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..hub.mixing import Mixture
from .engine import ExpertEngine


@dataclass
class Job:
    """One prompt waiting for generation."""

    mixture: Mixture
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_token: Callable[[int], None] | None = None
    cancel: threading.Event | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys run in one batch: the same sampling, and either one expert (or none) each, in
        any mix (per-row adapters), or the same mixture of several experts. Streamed jobs batch like others."""
        if len(self.mixture.experts) > 1:
            mixture: Any = tuple(zip(self.mixture.experts, (round(w, 6) for w in self.mixture.weights),
                                     strict=True))
        else:
            mixture = "rows"
        return mixture, self.temperature, self.top_p, self.seed


def next_batch(pending: Sequence[Job], max_batch_size: int) -> tuple[list[Job], list[Job]]:
    """Split ``pending`` (oldest first) into the next batch and the rest: the oldest job and up to
    ``max_batch_size - 1`` more jobs with its batch key, in arrival order. Pure; the batcher's policy.

    Example:
        >>> a, b = (Job(Mixture((e,), (1.0,), "top1"), [1], 4) for e in "xy")
        >>> c = Job(Mixture(("x", "y"), (0.5, 0.5), "topk"), [1], 4)
        >>> [j.mixture.experts for j in next_batch([a, c, b], 8)[0]]
        [('x',), ('y',)]
    """
    if not pending:
        return [], []
    key = pending[0].batch_key
    batch, rest = [], []
    for job in pending:
        if len(batch) < max_batch_size and job.batch_key == key:
            batch.append(job)
        else:
            rest.append(job)
    return batch, rest


#: After a batch, the batcher waits this share of the batch's run time (on top of the window) for the requests of
#: the clients it has just answered, unless the next batch fills first (see :func:`batch_deadline`).
SETTLE_SHARE = 0.05


def batch_deadline(oldest_enqueued: float, window: float, last_end: float, last_seconds: float,
                   settle_share: float = SETTLE_SHARE) -> float:
    """When the batcher runs a batch that is not full (``time.perf_counter`` seconds). Pure; the batcher's policy.

    Two waits, the later one counts: ``window`` after the oldest pending job arrived, and ``window`` plus
    ``settle_share`` of the last batch's run time after that batch ended. The second keeps a stream of clients
    that each wait for their answer in one batch: jobs that arrived while a batch ran are old by the time it
    ends, and running them at once (the first wait alone) leaves out the clients that batch has just answered,
    whose next requests come a round trip later (tens of milliseconds over HTTP on a busy CPU); from then on the
    two groups take turns in half-size batches. The second wait costs at most ``settle_share`` of a batch's
    time, and only while batches run back to back.

    Example:
        >>> batch_deadline(10.0, 0.01, last_end=9.0, last_seconds=2.0)  # idle before: the window alone
        10.01
        >>> round(batch_deadline(8.0, 0.01, last_end=10.0, last_seconds=2.0), 3)  # queued during a 2 s batch
        10.11
    """
    return max(oldest_enqueued + window, last_end + window + settle_share * last_seconds)


class ExpertBatcher:
    """Runs submitted jobs on an engine in batches (one thread): jobs of different single experts share a
    batch (per-row adapters); a mixture of several experts batches with its own kind.

    Until ``max_batch_size`` jobs are pending, the batcher waits ``window_ms`` after the first job arrives, and
    after a batch ``window_ms`` plus ``settle_share`` of that batch's run time (:func:`batch_deadline`); then it
    runs the oldest job's group (:func:`next_batch`), so no expert starves.
    """

    def __init__(self, engine: ExpertEngine, *, max_batch_size: int = 8, window_ms: float = 5.0,
                 settle_share: float = SETTLE_SHARE, on_batch: Callable[[int], None] | None = None):
        if not (0 <= settle_share <= 1):
            raise ValueError(f"settle_share must be between 0 and 1, got {settle_share!r}.")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000
        self.settle_share = settle_share
        self._last_end = float("-inf")  # when the last batch ended, and how long it ran
        self._last_seconds = 0.0
        self._on_batch = on_batch
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moin-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        """Stop after the running batch; jobs still waiting fail with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                deadline = batch_deadline(self._pending[0].enqueued, self.window, self._last_end,
                                          self._last_seconds, self.settle_share)
                while not self._closed and len(self._pending) < self.max_batch_size:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending = next_batch(self._pending, self.max_batch_size)
            start = time.perf_counter()
            self._execute(batch)
            self._last_end = time.perf_counter()
            self._last_seconds = self._last_end - start

    def _execute(self, batch: list[Job]) -> None:
        first = batch[0]
        try:
            outputs = self.engine.generate_batch(
                [j.prompt_ids for j in batch], [j.mixture for j in batch],
                max_new_tokens=[j.max_new_tokens for j in batch],
                temperature=first.temperature, top_p=first.top_p, stop=[j.stop for j in batch], seed=first.seed,
                on_token=[j.on_token for j in batch], cancel=[j.cancel for j in batch])
        except BaseException as err:  # every waiting request must get an answer
            for job in batch:
                job.future.set_exception(err)
            return
        if self._on_batch:
            self._on_batch(len(batch))
        for job, output in zip(batch, outputs, strict=True):
            job.future.set_result(output)
