"""What a task tells its worker about each sample: where its bytes are, its RNG key, and its part in
the decoded-sample cache (read this entry instead of decoding; or decode and write the result).

A sample of a cached dataset already in the arena is read from it (a hit). One that is not is claimed
by the first task that needs it, which decodes and stores it; a row of another batch needing the same
sample meanwhile is parked and handed back once that claim settles, so a sample is decoded once.
"""

from __future__ import annotations

from dataclasses import replace

from stoker.server.data.jobs import JobRegistry
from stoker.server.engine.decoded import DecodedCache
from stoker.server.engine.records import Task
from stoker.server.workers.messages import SampleSpec, TaskMessage

__all__ = ["SpecMaker"]


class SpecMaker:
    """Builds each task's message, consulting (and claiming in) the decoded-sample cache."""

    def __init__(self, jobs: JobRegistry, cache: DecodedCache) -> None:
        self.jobs = jobs
        self.cache = cache

    def message(self, task: Task) -> TaskMessage | None:
        """The task's message; rows whose sample another task is decoding are parked and left out
        (``None`` when nothing is left to do)."""
        work = task.work
        if work.slot is None:
            raise RuntimeError("a task of a batch without a slot")  # unreachable: tasks are cut after acquire
        job, epoch = work.job, work.key[1]
        table, cache = job.table, self.cache
        cached = cache.declared(table.name)
        use_arena = cached and cache.arena is not None
        specs, kept = [], []
        for row, index in task.samples:
            spec = SampleSpec(row, table.locator(index), self.jobs.sample_key(job, epoch, index))
            if use_arena:
                entry = cache.entry(table.name, index, len(table))
                if entry is not None:
                    spec = replace(spec, cached=entry)
                    cache.hit()
                elif cache.claim((table.name, index), task):
                    spec = replace(spec, store=True)
                    task.claims[row] = (table.name, index)
                else:
                    cache.park((table.name, index), (work, row))
                    continue
            specs.append(spec)
            kept.append((row, index))
        task.samples = kept
        if not specs:
            return None
        return TaskMessage(
            task.task_id,
            work.slot.name,
            len(work.originals),
            job.spec.image_size,
            job.pipeline,
            tuple(specs),
            cache.min_sides[table.name] if cached else None,
        )
