"""Planning a batch's rows, with deterministic stand-ins for bad samples.

A bad sample's stand-in is the first usable candidate of a fixed sequence derived from
``(seed, epoch, original index)``. Known-bad candidates are skipped, so whether a file is found bad
now or was known before, every server ends up with the same stand-in and the same bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from stoker.client.protocol.wire import ErrorCode
from stoker.server.engine.jobs import JobRegistry, OpenJob, replacement_candidate
from stoker.server.engine.records import BatchKey, BatchWork
from stoker.server.engine.stats import BadSample, BadSamples, EngineStats

__all__ = ["BadSamplePolicy", "BatchPlanner"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BadSamplePolicy:
    """What to do with a bad sample: ``skip`` (replace it) or ``raise`` (fail its batch)."""

    on_error: str
    max_replacements: int
    """Stand-ins tried for one bad sample before the batch fails."""


class BatchPlanner:
    """Turns a request into a :class:`BatchWork` and points bad rows at their stand-ins."""

    def __init__(self, jobs: JobRegistry, bad: BadSamples, stats: EngineStats) -> None:
        self.jobs = jobs
        self.bad = bad
        self.stats = stats

    def plan(self, job: OpenJob, key: BatchKey, policy: BadSamplePolicy) -> BatchWork:
        """The work for batch ``key``, with known bad samples already replaced (or the work failed)."""
        _, epoch, rank, k = key
        originals = self.jobs.indices(job, epoch, rank, k)
        work = BatchWork(key, job, originals.copy(), originals, {}, {}, set(range(len(originals))))
        for row, index in enumerate(originals):
            known = self.bad.get(job.table.name, int(index))
            if known is not None and not self.replace(work, row, known, policy):
                break
        return work

    def stand_in(self, work: BatchWork, row: int, reason: str, policy: BadSamplePolicy) -> bool:
        """Record ``row``'s sample as bad and point the row at its stand-in (``False``: batch failed)."""
        return self.replace(work, row, self._record(work, row, reason), policy)

    def replace(self, work: BatchWork, row: int, bad: BadSample, policy: BadSamplePolicy) -> bool:
        """Point ``row`` at the next usable stand-in; ``False`` (and the work failed) if none."""
        if policy.on_error == "raise":
            work.fail(ErrorCode.BAD_SAMPLE, f"bad sample {bad.path}: {bad.reason}", path=bad.path, reason=bad.reason)
            return False
        job, epoch = work.job, work.key[1]
        table = job.table
        original = int(work.originals[row])
        attempt = work.attempts.get(row, -1) + 1
        while attempt < policy.max_replacements:
            candidate = replacement_candidate(job.spec, epoch, original, attempt, len(table))
            if self.bad.get(table.name, candidate) is None:
                work.attempts[row] = attempt
                work.indices[row] = candidate
                return True
            attempt += 1
        work.fail(
            ErrorCode.BAD_SAMPLE,
            f"no usable stand-in for {bad.path} after {policy.max_replacements} tries",
            path=bad.path,
            reason=bad.reason,
        )
        return False

    def _record(self, work: BatchWork, row: int, reason: str) -> BadSample:
        table = work.job.table
        index = int(work.indices[row])
        sample = BadSample(table.name, index, table.display_path(index), reason, time.time())
        if self.bad.add(sample):
            self.stats.bad_total.labels(table.name).inc()
            log.warning("bad sample %s (dataset %r, index %d): %s", sample.path, table.name, index, reason)
        return self.bad.get(table.name, index) or sample
