"""Mixtures (server process): what an operator declares (``[mixtures.NAME]``), the checks made at
start, and a mixture's samples as one table over its sources' tables.

A mixture is served as a dataset whose epoch order comes from the mixture planner
(:mod:`stoker.client.protocol.mixture`) instead of one permutation: index ``i`` of the
:class:`MixedTable` is sample ``i - offset[s]`` of source ``s``, sources in name order. Everything
downstream (batches, stand-ins, labels, bad samples) reads it like any table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stoker.client.protocol.mixture import Mixture, parse_weights
from stoker.server.data.locators import Locator
from stoker.server.data.table import SampleTable
from stoker.server.imaging.pipelines import Pipeline

__all__ = ["MixtureDecl", "MixedTable", "check_mixtures"]


@dataclass(frozen=True)
class MixtureDecl:
    """A declared mixture: source datasets with their weights (normalised when planned), and the
    samples of one epoch (``None``: the sum of the sources' sizes)."""

    name: str
    weights: Mapping[str, float]
    epoch_samples: int | None = None
    pipelines: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0
    """The fair-share weight of the mixture's jobs (``weight = 3`` in its table), not a source's."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"mixture {self.name!r}: weight={self.weight!r} must be > 0")
        if not self.weights:
            raise ValueError(f"mixture {self.name!r}: 'datasets' names no dataset")
        try:
            parsed = parse_weights(list(self.weights.values()))
        except ValueError as exc:
            raise ValueError(f"mixture {self.name!r}: {exc}") from None
        bad = [name for name, w in zip(self.weights, parsed, strict=True) if w <= 0]
        if bad:
            raise ValueError(f"mixture {self.name!r}: weight of {bad} must be > 0")
        if self.epoch_samples is not None and (
            isinstance(self.epoch_samples, bool) or not isinstance(self.epoch_samples, int) or self.epoch_samples <= 0
        ):
            raise ValueError(f"mixture {self.name!r}: epoch_samples={self.epoch_samples!r} must be an int > 0")

    @property
    def sources(self) -> tuple[str, ...]:
        """Source names in the mixture's order (sorted, so every server agrees)."""
        return tuple(sorted(self.weights))

    def base_weights(self) -> tuple[float, ...]:
        """Weights in :attr:`sources` order, normalised."""
        total = sum(float(w) for w in self.weights.values())
        return tuple(float(self.weights[name]) / total for name in self.sources)


def check_mixtures(mixtures: Iterable[MixtureDecl], datasets: Iterable[str], pipelines: Iterable[str]) -> None:
    """Refuse at start what cannot be served; raises ``ValueError`` naming the reason."""
    declared, known = set(datasets), set(pipelines)
    for mixture in mixtures:
        if mixture.name in declared:
            raise ValueError(f"mixture {mixture.name!r} has the name of a declared dataset: rename one of them")
        unknown = sorted(set(mixture.weights) - declared)
        if unknown:
            raise ValueError(f"mixture {mixture.name!r} names unknown datasets {unknown}; declared: {sorted(declared)}")
        strangers = sorted(set(mixture.pipelines) - set(mixture.weights))
        if strangers:
            raise ValueError(f"mixture {mixture.name!r}: 'pipelines' names {strangers}, which are not its sources")
        missing = sorted({p for p in mixture.pipelines.values() if p not in known})
        if missing:
            raise ValueError(f"mixture {mixture.name!r}: unknown pipelines {missing}; declared: {sorted(known)}")


class MixedTable:
    """A mixture's sources as one table: index ``offsets[s] + i`` is sample ``i`` of source ``s``."""

    def __init__(
        self,
        decl: MixtureDecl,
        tables: Sequence[SampleTable],
        min_sides: Sequence[int] = (),
        pipelines: Sequence[Pipeline | None] = (),
    ) -> None:
        self.name = decl.name
        self.decl = decl
        self.tables = tuple(tables)
        self.min_sides = tuple(min_sides) or (0,) * len(self.tables)
        """Each source's decode rule (its ``cache_min_side``): a source's rows decode as its own jobs do."""
        self.pipelines = tuple(pipelines) or (None,) * len(self.tables)
        """Each source's own pipeline (``pipelines = {coco = "det"}``), or ``None``: the job's."""
        sizes = [len(table) for table in self.tables]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = np.concatenate([table.labels for table in self.tables]).astype(np.int64, copy=False)
        self.classes: tuple[str, ...] = ()
        self.targets: dict[str, Any] = {}
        """A mixture delivers its sources' class labels (``targets=["label"]`` too), not their other
        targets: its sources may declare different ones."""
        self.containers: tuple[str, ...] = ()
        self.epoch_samples = decl.epoch_samples or int(sum(sizes))
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((decl.name, decl.sources, decl.base_weights(), self.epoch_samples)).encode())
        for table in self.tables:
            digest.update(table.fingerprint.encode())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def root(self) -> str:
        return ""

    def mixture(
        self, seed: int, shuffle: bool, reweights: Sequence[tuple[int, int, tuple[float, ...]]] = ()
    ) -> Mixture:
        """The planner's view of this mixture for one job."""
        return Mixture(
            self.decl.sources,
            tuple(len(table) for table in self.tables),
            self.decl.base_weights(),
            self.epoch_samples,
            seed,
            shuffle,
            tuple(reweights),
        )

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """The source number of each index."""
        return np.searchsorted(self.offsets, indices, side="right") - 1

    def _split(self, index: int) -> tuple[SampleTable, int]:
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.tables[source], index - int(self.offsets[source])

    def locator(self, index: int) -> Locator:
        table, local = self._split(index)
        return table.locator(local)

    def display_path(self, index: int) -> str:
        table, local = self._split(index)
        return table.display_path(local)

    def _source(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def min_side(self, index: int) -> int:
        """The decode rule of the sample's source."""
        return self.min_sides[self._source(index)]

    def pipeline(self, index: int) -> Pipeline | None:
        """The sample's source's own pipeline, or ``None`` (the job's applies)."""
        return self.pipelines[self._source(index)]

    def cache_key(self, index: int) -> tuple[str, int, int]:
        """``(source dataset, index in it, its size)``: the decoded cache keeps samples per source."""
        table, local = self._split(index)
        return table.name, local, len(table)
