"""Open jobs (engine thread): a validated spec bound to its dataset and pipeline, and the batches it plans.

The registry turns a client's job spec into an :class:`OpenJob` (or a typed refusal naming what is
wrong and what exists) and caches each epoch's order, which is the only per-job state a server keeps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.mixture import Mixture
from stoker.client.protocol.plan import (
    batch_indices,
    batch_positions,
    batch_sizes,
    batches_per_rank,
    permutation,
    sample_seed,
    span_length,
)
from stoker.client.protocol.rng import mix
from stoker.client.protocol.wire import ErrorCode
from stoker.server.data.catalog import Catalog
from stoker.server.data.mixtures import MixedTable
from stoker.server.data.table import SampleTable
from stoker.server.imaging.pipelines import Pipeline

__all__ = ["OpenJob", "JobRegistry", "replacement_candidate"]

_REPLACEMENT_DOMAIN = 0x5245504C
_MIXED_SAMPLE_DOMAIN = 0x4D534D50


@dataclass(frozen=True, eq=False)
class OpenJob:
    """A job this server can serve."""

    spec: JobSpec
    job_id: str
    table: SampleTable
    pipeline: Pipeline
    batches: int
    """Batches per rank per epoch."""
    last_batch: int
    """Size of each rank's last batch."""
    min_side: int = 0
    """The dataset's decode rule (its ``cache_min_side``; 0: reduce as far as each crop allows)."""
    mixture: Mixture | None = None
    """A mixture's plan (then ``table`` is its :class:`MixedTable`); ``None`` for a dataset."""
    targets: tuple[tuple[str, str], ...] = ()
    """``(field, kind)`` the job delivers beyond the images (``label``: the table's labels)."""
    min_box_visibility: float = 0.0

    @property
    def samples(self) -> int:
        """Samples in one epoch's order: the dataset's, or the mixture's ``epoch_samples``."""
        return self.mixture.epoch_samples if self.mixture is not None else len(self.table)

    @property
    def mask_side(self) -> int:
        """The side of the job's mask block (its first view's), or 0 without a mask."""
        return self.sizes[0] if any(kind == "mask" for _, kind in self.targets) else 0

    def rows(self, k: int) -> int:
        """Samples in batch ``k`` (the last one may be short)."""
        return self.last_batch if k == self.batches - 1 else self.spec.batch_size

    @property
    def sizes(self) -> tuple[int, ...]:
        """The side of each view's images (one entry for a single-view pipeline)."""
        return self.pipeline.sizes(self.spec.image_size)

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample's images, every view together."""
        return sum(side * side * 3 for side in self.sizes)

    def view_shapes(self, rows: int) -> list[list[int]]:
        """``[rows, side, side, 3]`` (``[rows, 3, side, side]`` for an ``nchw`` job) per view: a batch's
        image arrays, in the order they are laid out."""
        if self.spec.layout == "nchw":
            return [[rows, 3, side, side] for side in self.sizes]
        return [[rows, side, side, 3] for side in self.sizes]

    def batch_nbytes(self, k: int) -> int:
        """Bytes of batch ``k``'s images (and its mask block, after them)."""
        return self.rows(k) * (self.sample_nbytes + self.mask_side**2)

    def image_nbytes(self, rows: int) -> int:
        """Bytes of ``rows`` samples' images, every view (the mask block starts there)."""
        return rows * self.sample_nbytes


def resolve_job_targets(spec: JobSpec, table: SampleTable) -> tuple[tuple[str, str], ...]:
    """The ``(field, kind)`` pairs a job asks for: ``all`` is every declared field (and ``label`` when the
    dataset has class labels); ``label`` is always there. Unknown names are an ``INVALID_JOB``."""
    declared = {name: column.kind for name, column in table.targets.items()}
    if list(spec.targets) == ["all"]:
        labelled = len(table) > 0 and int(table.labels.max()) >= 0
        return (*((("label", "label"),) if labelled and "label" not in declared else ()), *declared.items())
    out = []
    for name in spec.targets:
        if name in declared:
            out.append((name, declared[name]))
        elif name == "label":
            out.append(("label", "label"))
        else:
            raise ProtocolError(
                f"dataset {spec.dataset!r} has no target {name!r}; it declares {sorted(declared)} (and 'label')",
                ErrorCode.INVALID_JOB,
            )
    return tuple(out)


def replacement_candidate(spec: JobSpec, epoch: int, index: int, attempt: int, num_samples: int) -> int:
    """The ``attempt``-th stand-in for a bad sample: deterministic, so batches stay reproducible."""
    return mix(_REPLACEMENT_DOMAIN, spec.seed, epoch, index, attempt) % num_samples


class JobRegistry:
    """Validates and remembers jobs; caches epoch orders (a few epochs per dataset/seed)."""

    def __init__(
        self,
        catalog: Catalog,
        pipelines: Mapping[str, Pipeline],
        max_batch_size: int,
        max_image_size: int,
        max_batch_bytes: int = 2**62,
        max_jobs: int = 256,
        max_orders: int = 8,
    ) -> None:
        self.catalog = catalog
        self.pipelines = pipelines
        self.max_batch_size = max_batch_size
        self.max_image_size = max_image_size
        self.max_batch_bytes = max_batch_bytes
        self._jobs: OrderedDict[str, OpenJob] = OrderedDict()
        self._orders: OrderedDict[tuple[str, int, bool, int], np.ndarray] = OrderedDict()
        self._max_jobs = max_jobs
        self._max_orders = max_orders
        self._mixed: dict[str, MixedTable] = {}

    def open(self, spec: JobSpec) -> OpenJob:
        """The open job for ``spec``; raise :class:`ProtocolError` with the code to answer with."""
        job_id = spec.job_id
        job = self._jobs.get(job_id)
        if job is not None:
            self._jobs.move_to_end(job_id)
            return job
        table, pipeline = self._resolve(spec)
        self._check_limits(spec, pipeline)
        mixture = self._mixture(spec, table) if isinstance(table, MixedTable) else None
        if isinstance(table, MixedTable):
            for source, own in zip(table.decl.sources, table.pipelines, strict=True):
                if own is not None and own.sizes(spec.image_size) != pipeline.sizes(spec.image_size):
                    raise ProtocolError(
                        f"mixture {spec.dataset!r}: source {source!r}'s pipeline {own.name!r} gives views of "
                        f"{own.sizes(spec.image_size)} px, pipeline {pipeline.name!r} {pipeline.sizes(spec.image_size)}"
                        ": a batch needs one layout",
                        ErrorCode.INVALID_JOB,
                    )
        if mixture is None and spec.reweights:
            raise ProtocolError(
                f"reweights given, but {spec.dataset!r} is a dataset, not a mixture", ErrorCode.INVALID_JOB
            )
        samples = mixture.epoch_samples if mixture is not None else len(table)
        if spec.span is not None and spec.span[1] > samples:
            raise ProtocolError(
                f"span={list(spec.span)} reaches past the {samples} samples of {spec.dataset!r}",
                ErrorCode.INVALID_JOB,
            )
        planned = span_length(spec.span, samples)
        count = batches_per_rank(planned, spec.batch_size, spec.world_size, spec.drop_last)
        if count == 0:
            raise ProtocolError(
                f"drop_last=True with batch_size * world_size = {spec.batch_size * spec.world_size} "
                f"> {planned} samples {'left of' if spec.span else 'in'} {spec.dataset!r} leaves no batch",
                ErrorCode.INVALID_JOB,
            )
        _, last = batch_sizes(planned, spec.batch_size, spec.world_size, spec.drop_last)
        entry = self.catalog.entry(spec.dataset)
        min_side = entry.decl.cache_min_side if entry is not None else 0
        visibility = entry.decl.min_box_visibility if entry is not None else 0.0
        targets = resolve_job_targets(spec, table)
        job = OpenJob(
            spec,
            job_id,
            table,
            pipeline,
            count,
            last,
            min_side,
            mixture,
            targets,
            visibility,  # type: ignore[arg-type]
        )
        self._jobs[job_id] = job
        while len(self._jobs) > self._max_jobs:
            self._jobs.popitem(last=False)
        return job

    def _mixture(self, spec: JobSpec, table: MixedTable) -> Mixture:
        try:
            reweights = [
                (epoch, offset, table.mixture(spec.seed, spec.shuffle).weights_from(dict(weights)))
                for epoch, offset, weights in spec.reweights
            ]
            return table.mixture(spec.seed, spec.shuffle, reweights)
        except ValueError as exc:
            raise ProtocolError(f"mixture {spec.dataset!r}: {exc}", ErrorCode.INVALID_JOB) from None

    def _mixed_table(self, name: str) -> MixedTable | None:
        """The table of mixture ``name`` once every source is listed; raises while one is not."""
        decl = self.catalog.mixtures.get(name)
        if decl is None:
            return None
        table = self._mixed.get(name)
        if table is not None:
            return table
        tables, min_sides = [], []
        for source in decl.sources:
            entry = self.catalog.entry(source)
            if entry is None or entry.table is None:
                state = "still being listed" if entry is not None and entry.state == "loading" else "not available"
                code = (
                    ErrorCode.NOT_READY if entry is not None and entry.state == "loading" else ErrorCode.UNKNOWN_DATASET
                )
                raise ProtocolError(f"mixture {name!r}: its source {source!r} is {state}", code)
            tables.append(entry.table)
            min_sides.append(entry.decl.cache_min_side)
        own = [self.pipelines.get(decl.pipelines[s]) if s in decl.pipelines else None for s in decl.sources]
        table = self._mixed[name] = MixedTable(decl, tables, min_sides, own)
        return table

    def _resolve(self, spec: JobSpec) -> tuple[SampleTable, Pipeline]:
        table = self.catalog.get(spec.dataset) or self._mixed_table(spec.dataset)  # type: ignore[assignment]
        if table is None:
            entry = self.catalog.entry(spec.dataset)
            if entry is not None and entry.state == "loading":
                raise ProtocolError(
                    f"dataset {spec.dataset!r} is still being listed ({entry.listed} samples so far); ask again",
                    ErrorCode.NOT_READY,
                )
            raise ProtocolError(
                f"unknown dataset {spec.dataset!r}; this server declares {self.catalog.declared}"
                + (f" and mixtures {sorted(self.catalog.mixtures)}" if self.catalog.mixtures else ""),
                ErrorCode.UNKNOWN_DATASET,
            )
        pipeline = self.pipelines.get(spec.pipeline)
        if pipeline is None:
            raise ProtocolError(
                f"unknown pipeline {spec.pipeline!r}; this server declares {sorted(self.pipelines)}",
                ErrorCode.UNKNOWN_PIPELINE,
            )
        return table, pipeline

    def _check_limits(self, spec: JobSpec, pipeline: Pipeline) -> None:
        if spec.batch_size > self.max_batch_size:
            raise ProtocolError(
                f"batch_size={spec.batch_size} exceeds this server's max_batch_size={self.max_batch_size}",
                ErrorCode.INVALID_JOB,
            )
        sizes = pipeline.sizes(spec.image_size)
        if max(sizes) > self.max_image_size:
            raise ProtocolError(
                f"image_size={max(sizes)} exceeds this server's max_image_size={self.max_image_size}",
                ErrorCode.INVALID_JOB,
            )
        batch_bytes = spec.batch_size * sum(side * side * 3 for side in sizes)
        if batch_bytes > self.max_batch_bytes:
            raise ProtocolError(
                f"a batch of {spec.batch_size} x {'+'.join(f'{side}px' for side in sizes)} needs "
                f"{batch_bytes / 2**20:.0f} MiB; this server's shared-memory budget is "
                f"{self.max_batch_bytes / 2**20:.0f} MiB",
                ErrorCode.INVALID_JOB,
            )

    def get(self, job_id: str) -> OpenJob | None:
        """An already open job by id."""
        return self._jobs.get(job_id)

    def order(self, job: OpenJob, epoch: int) -> np.ndarray:
        """The epoch's permutation of the job's dataset (cached)."""
        spec = job.spec
        key = (job.table.fingerprint, spec.seed, spec.shuffle, epoch, spec.reweights)
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = self._new_order(job, epoch)
            while len(self._orders) > self._max_orders:
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(key)
        return order

    @staticmethod
    def _new_order(job: OpenJob, epoch: int) -> np.ndarray:
        spec = job.spec
        if job.mixture is None:
            return permutation(len(job.table), spec.seed, epoch, spec.shuffle)
        sources, indices = job.mixture.epoch_plan(epoch)
        return job.table.offsets[sources] + indices  # type: ignore[attr-defined]

    def indices(self, job: OpenJob, epoch: int, rank: int, k: int) -> np.ndarray:
        """Dataset indices of batch ``k`` of ``rank`` (before bad-sample replacement)."""
        spec = job.spec
        order = self.order(job, epoch)
        return batch_indices(order, spec.batch_size, spec.world_size, spec.drop_last, rank, k, spec.span)

    @staticmethod
    def sample_key(job: OpenJob, epoch: int, index: int, rank: int = 0, k: int = 0, row: int = 0) -> int:
        """The augmentation RNG key of ``index`` in ``epoch`` (at ``row`` of batch ``k`` of ``rank``).

        A mixture keys a sample by its position in the epoch's order too: a small source drawn
        several times in one epoch gets a fresh augmentation each time. Positions survive a re-plan
        on another number of ranks (a span holds the epoch's own positions), so the bytes do too.
        """
        spec = job.spec
        if job.mixture is None:
            return sample_seed(spec.seed, epoch, index)
        start, end = spec.span if spec.span is not None else (0, job.samples)
        positions = batch_positions(end - start, spec.batch_size, spec.world_size, spec.drop_last, rank, k)
        position = start + positions[row] % (end - start)  # padding repeats its sample's own key
        return mix(_MIXED_SAMPLE_DOMAIN, spec.seed, epoch, position, index)

    @property
    def open_jobs(self) -> list[OpenJob]:
        """Jobs opened recently, oldest first."""
        return list(self._jobs.values())
