"""The mixture planner: a pure function from ``(mixture, epoch)`` to the epoch's sequence of
``(source, index in that source)``.

A mixture draws ``epoch_samples`` samples per epoch from several datasets (its *sources*) by weight.
Three rules make it a plan rather than a sampler, so every invariant of one dataset (exactly once,
equal steps per rank, resume, re-plan on another number of ranks) carries over by composition: the
sequence is cut into batches by :mod:`stoker.client.protocol.plan` as a dataset's permutation is.

1. **Counts.** A run of ``L`` positions planned with weights ``w`` gives source ``s`` exactly
   ``apportion(L, w)[s]`` draws: ``floor(L * w_s)`` plus one for the largest remainders, so each
   count is within 1 of ``L * w_s`` and they sum to ``L``.
2. **Interleave.** Draw ``j`` of a source with ``c`` draws sits at the ideal time ``(j + 1/2) / c``
   of the run; the draws of every source are merged by that time, ties broken by a seeded order of
   the sources. Over the first ``n`` positions a source's count stays within
   :func:`prefix_bound` ``= 1 + (S - 2) * w_s`` of ``n * w_s`` for ``S`` sources (within 1 for two),
   so any window of ``W`` positions is within twice that of ``W * w_s``. "Within 1 over every
   window" does not hold in general for three or more sources (0.9/0.05/0.05 reaches 1.6); with
   0.6/0.3/0.1 every window of 64 is within 1. The tests assert each of these.
3. **Passes.** A source's draws are consecutive positions of its own endless stream: pass ``p`` is
   a seeded permutation of the source (``plan.permutation`` keyed by the source's name and ``p``);
   draw number ``d`` (counted from the job's start, across epochs) is position ``d % size`` of pass
   ``d // size``. So each pass gives each sample once whatever the epochs' boundaries, a small
   source wraps into its next pass inside an epoch, and a big one spans epochs.

**Re-weighting.** A job may change its weights at a resume point ``(epoch, offset)``: positions of
that epoch before ``offset`` keep the old plan, the rest of it is planned anew over ``[offset, N)``
with the new weights, and every source goes on from the draw it had reached (so no sample of a
current pass repeats or is lost). The list of such points is part of the job, so every server and
rank derives the same sequence; counting the draws before a point is closed form except inside the
epochs where weights changed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stoker.client.protocol.plan import _PERMUTATION_DOMAIN, permutation
from stoker.client.protocol.rng import mix, splitmix64_array

__all__ = ["Mixture", "Reweight", "SourceState", "apportion", "interleave", "prefix_bound"]

_SOURCE_DOMAIN = 0x4D495853
_TIE_DOMAIN = 0x54494553

Reweight = tuple[int, int, tuple[float, ...]]
"""``(epoch, offset, weights)``: from position ``offset`` of ``epoch`` on, the weights (one per source,
in the mixture's order) are these."""


def prefix_bound(weight: float, sources: int) -> float:
    """How far a source's count over the first ``n`` positions of a run may be from ``n * weight``."""
    return 1.0 + max(sources - 2, 0) * weight


def apportion(length: int, weights: Sequence[float]) -> np.ndarray:
    """Draws per source in a run of ``length`` positions: floor of the share, plus one for the largest
    remainders (ties to the first source), summing to ``length``."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    share = length * w
    counts = np.floor(share).astype(np.int64)
    short = length - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(share - counts), kind="stable")[:short]] += 1
    return counts


def interleave(counts: np.ndarray, ties: Sequence[int]) -> np.ndarray:
    """The run's source of each position (``int16``): draw ``j`` of ``c`` at ``(j + 1/2) / c``, merged
    by that time; equal times go in the order of ``ties``.

    No sort: draw ``j`` of ``s`` lands after ``j`` of its own and, of each other source ``t``, the
    draws ``i`` with ``(2i + 1) / c_t`` before ``(2j + 1) / c_s`` (at it too when ``t`` wins ties),
    counted exactly in integers. Linear in the run's length per source.
    """
    counts = np.asarray(counts, dtype=np.int64)
    out = np.empty(int(counts.sum()), dtype=np.int16)
    rank = {source: r for r, source in enumerate(ties)}
    for s in ties:
        c = int(counts[s])
        if not c:
            continue
        odd = np.arange(c, dtype=np.int64) * 2 + 1
        position = np.arange(c, dtype=np.int64)
        for t in ties:
            ct = int(counts[t])
            if t == s or not ct:
                continue
            # draws i of t with (2i + 1) * c < (2j + 1) * ct, or <= when t goes first on a tie
            num = odd * ct - c
            before = num // (2 * c) + 1 if rank[t] < rank[s] else -(-num // (2 * c))
            position += np.clip(before, 0, ct)
        out[position] = s
    return out


@dataclass(frozen=True)
class SourceState:
    """Where one source of a mixture stands: ``draws`` samples drawn since the job began, so ``pass_``
    (0-based) and ``position`` in that pass."""

    name: str
    size: int
    draws: int

    @property
    def pass_(self) -> int:
        return self.draws // self.size

    @property
    def position(self) -> int:
        return self.draws % self.size


@dataclass(frozen=True)
class Mixture:
    """A mixture as both sides plan it: sources (names and sizes, in a fixed order), base weights,
    samples per epoch, the job's seed and shuffle, and the re-weighting points so far."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    epoch_samples: int
    seed: int = 0
    shuffle: bool = True
    reweights: tuple[Reweight, ...] = ()

    def __post_init__(self) -> None:
        count = len(self.names)
        if count == 0 or len(self.sizes) != count or len(self.weights) != count:
            raise ValueError("a mixture needs one size and one weight per source, and at least one source")
        if any(size <= 0 for size in self.sizes):
            raise ValueError(f"every source needs samples; sizes {dict(zip(self.names, self.sizes, strict=True))}")
        if self.epoch_samples <= 0:
            raise ValueError(f"epoch_samples={self.epoch_samples} must be > 0")
        for weights in (self.weights, *(w for _, _, w in self.reweights)):
            if len(weights) != count or any(not w >= 0 for w in weights) or not sum(weights) > 0:
                raise ValueError(f"weights {list(weights)} must be {count} numbers >= 0 with a positive sum")
        points = [self._normal(epoch, offset) for epoch, offset, _ in self.reweights]
        if any(b <= a for a, b in zip(points, points[1:], strict=False)):
            raise ValueError(f"re-weighting points {points} must increase")

    # -- the sequence ------------------------------------------------------------------------------

    def _normal(self, epoch: int, offset: int) -> tuple[int, int]:
        """A point with its offset inside the epoch (the end of an epoch is the next one's start)."""
        if epoch < 0 or offset < 0:
            raise ValueError(f"point ({epoch}, {offset}) must be >= 0")
        return (epoch + 1, 0) if offset >= self.epoch_samples else (epoch, offset)

    def _segments(self) -> list[tuple[tuple[int, int], tuple[float, ...]]]:
        return [((0, 0), self.weights)] + [(self._normal(e, o), w) for e, o, w in self.reweights]

    def _ties(self, epoch: int, offset: int) -> list[int]:
        keys = [mix(_TIE_DOMAIN, self.seed, epoch, offset, _name_key(name)) for name in self.names]
        return sorted(range(len(self.names)), key=lambda s: (keys[s], s))

    def _run(self, epoch: int, offset: int, weights: tuple[float, ...]) -> np.ndarray:
        """The sources of positions ``[offset, N)`` of ``epoch`` planned with ``weights``."""
        return _run_cached(self.epoch_samples - offset, weights, tuple(self._ties(epoch, offset)))

    def draws_at(self, epoch: int, offset: int = 0) -> np.ndarray:
        """Draws of each source before position ``offset`` of ``epoch`` (since the job began)."""
        stop = self._normal(epoch, offset)
        total = np.zeros(len(self.names), dtype=np.int64)
        segments = self._segments()
        for i, (start, weights) in enumerate(segments):
            end = min(segments[i + 1][0], stop) if i + 1 < len(segments) else stop
            if end <= start:
                continue  # an empty segment (the next starts where it does) or past the stop
            total += self._counts(start, end, weights)
        return total

    def _counts(self, start: tuple[int, int], end: tuple[int, int], weights: tuple[float, ...]) -> np.ndarray:
        """Draws of each source from ``start`` to ``end`` planned with ``weights`` (one segment)."""
        (e0, o0), (e1, o1) = start, end
        n = self.epoch_samples
        if e0 == e1:
            return self._prefix(e0, o0, weights, o1 - o0)
        counts = apportion(n - o0, weights) + (e1 - e0 - 1) * apportion(n, weights)
        return counts + (self._prefix(e1, 0, weights, o1) if o1 else 0)

    def _prefix(self, epoch: int, offset: int, weights: tuple[float, ...], length: int) -> np.ndarray:
        if offset + length >= self.epoch_samples:
            return apportion(self.epoch_samples - offset, weights)
        run = self._run(epoch, offset, weights)[:length]
        return np.bincount(run, minlength=len(self.names)).astype(np.int64)

    def sources(self, epoch: int) -> np.ndarray:
        """The source of each position of ``epoch`` (``int16``, ``epoch_samples`` long)."""
        out = np.empty(self.epoch_samples, dtype=np.int16)
        pieces = [
            (max(start, (epoch, 0)), weights)
            for i, (start, weights) in enumerate(self._segments())
            if start[0] <= epoch and (i + 1 >= len(self._segments()) or self._segments()[i + 1][0] > (epoch, 0))
        ]
        for i, ((_, lo), weights) in enumerate(pieces):
            hi = pieces[i + 1][0][1] if i + 1 < len(pieces) else self.epoch_samples
            out[lo:hi] = self._run(epoch, lo, weights)[: hi - lo]
        return out

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(sources, indices)`` of every position of ``epoch``: the source (``int16``) and the index
        in that source (``int64``) of the sample drawn there."""
        sources = self.sources(epoch)
        indices = np.empty(self.epoch_samples, dtype=np.int64)
        start = self.draws_at(epoch)
        for s, size in enumerate(self.sizes):
            where = np.flatnonzero(sources == s)
            if len(where):
                indices[where] = self._draws(s, size, int(start[s]), len(where))
        return sources, indices

    def _draws(self, source: int, size: int, first: int, count: int) -> np.ndarray:
        """Source indices of draws ``first .. first + count - 1`` of ``source``'s stream of passes
        (consecutive draws: the passes they cross, one after another, cut at both ends)."""
        passes = range(first // size, (first + count - 1) // size + 1)
        seed = self.source_seed(source)
        if len(passes) <= 2:  # a big source: its passes are cached for the next epoch
            orders = np.concatenate([_pass_order(size, seed, p, self.shuffle) for p in passes])
        else:  # a small source wrapping many times: every pass's permutation at once
            orders = _pass_orders(size, seed, passes, self.shuffle).reshape(-1)
        start = first % size
        return orders[start : start + count]

    def source_seed(self, source: int) -> int:
        """The seed of ``source``'s passes in this job."""
        return mix(_SOURCE_DOMAIN, self.seed, _name_key(self.names[source])) & (2**63 - 1)

    def states(self, epoch: int, offset: int = 0) -> list[SourceState]:
        """Each source's pass and position before position ``offset`` of ``epoch``."""
        draws = self.draws_at(epoch, offset)
        return [SourceState(n, s, int(d)) for n, s, d in zip(self.names, self.sizes, draws, strict=True)]

    def weights_at(self, epoch: int, offset: int = 0) -> tuple[float, ...]:
        """The weights in force at position ``offset`` of ``epoch``."""
        point = self._normal(epoch, offset)
        current = self.weights
        for start, weights in self._segments():
            if start <= point:
                current = weights
        return current

    def weights_from(self, given: Mapping[str, float]) -> tuple[float, ...]:
        """``given`` (by source name) as weights in this mixture's order; raises ``ValueError``."""
        unknown = sorted(set(given) - set(self.names))
        missing = sorted(set(self.names) - set(given))
        if unknown or missing:
            raise ValueError(
                f"weights must name exactly the sources {list(self.names)}; unknown {unknown}, missing {missing}"
            )
        return parse_weights([given[name] for name in self.names])


def parse_weights(values: Sequence[object]) -> tuple[float, ...]:
    """Numbers ``>= 0`` with a positive sum, as floats; raises ``ValueError`` naming the bad one."""
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
            raise ValueError(f"weight {value!r} is not a finite number >= 0")
        out.append(float(value))
    if not sum(out) > 0:
        raise ValueError(f"weights {out} need a positive sum")
    return tuple(out)


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


_RUNS: OrderedDict[tuple, np.ndarray] = OrderedDict()
_ORDERS: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHED = 8


def _cached(cache: OrderedDict[tuple, np.ndarray], key: tuple, make) -> np.ndarray:  # type: ignore[no-untyped-def]
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        value.flags.writeable = False
        while len(cache) > _CACHED:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _run_cached(length: int, weights: tuple[float, ...], ties: tuple[int, ...]) -> np.ndarray:
    return _cached(_RUNS, (length, weights, ties), lambda: interleave(apportion(length, weights), ties))


def _pass_orders(size: int, seed: int, passes: range, shuffle: bool) -> np.ndarray:
    """``permutation(size, seed, p, shuffle)`` for every ``p`` of ``passes``, one row each."""
    if not shuffle:
        return np.tile(np.arange(size, dtype=np.int64), (len(passes), 1))
    bases = np.array([mix(_PERMUTATION_DOMAIN, seed, p) for p in passes], dtype=np.uint64)[:, None]
    keys = splitmix64_array(np.arange(size, dtype=np.uint64)[None, :] ^ bases)
    return np.argsort(keys, axis=1, kind="stable").astype(np.int64, copy=False)


def _pass_order(size: int, seed: int, pass_: int, shuffle: bool) -> np.ndarray:
    return _cached(_ORDERS, (size, seed, pass_, shuffle), lambda: permutation(size, seed, pass_, shuffle))
