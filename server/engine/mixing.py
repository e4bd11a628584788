"""Mixtures as this server serves them (engine thread): how far each mixture's jobs have got, and
where each source stands there, for ``/status`` and the metrics.

The server keeps no client progress (the client's ``state_dict`` is the truth); this is what the
batches it delivered say: the furthest ``(epoch, position in the epoch's order)`` delivered per
mixture, turned into each source's weight, draws this epoch, pass and position by the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from stoker.client.protocol.mixture import Mixture
from stoker.client.protocol.plan import span_length

__all__ = ["MixtureProgress", "SourceProgress"]


@dataclass(frozen=True)
class SourceProgress:
    """One source of a mixture at the furthest point delivered."""

    mixture: str
    source: str
    weight: float
    served_epoch: int
    """Samples drawn from it in the current epoch so far."""
    pass_: int
    position: int


class MixtureProgress:
    """The furthest point delivered of each mixture (by any of its jobs)."""

    def __init__(self) -> None:
        self._furthest: dict[str, tuple[tuple[int, int], Mixture]] = {}
        self._sources: list[SourceProgress] | None = None

    def delivered(self, job: object, epoch: int, k: int) -> None:
        """Batch ``k`` of ``epoch`` of ``job`` (an ``OpenJob`` with a mixture) was delivered."""
        mixture, spec = job.mixture, job.spec  # type: ignore[attr-defined]
        if mixture is None:
            return
        start = spec.span[0] if spec.span is not None else 0
        end = start + span_length(spec.span, mixture.epoch_samples)
        point = (epoch, min(start + (k + 1) * spec.batch_size * spec.world_size, end))
        name = spec.dataset
        known = self._furthest.get(name)
        if known is None or point > known[0] or (point == known[0] and mixture is not known[1]):
            self._furthest[name] = (point, mixture)
            self._sources = None  # worked out again when next read

    def sources(self) -> list[SourceProgress]:
        """Each source of each mixture served so far, at its furthest point."""
        if self._sources is None:
            self._sources = self._work_out()
        return self._sources

    def _work_out(self) -> list[SourceProgress]:
        out = []
        for name, ((epoch, offset), mixture) in sorted(self._furthest.items()):
            weights = mixture.weights_at(epoch, offset)  # the job's, re-weightings included
            total = sum(weights)
            begun = mixture.draws_at(epoch)
            for state, weight, before in zip(mixture.states(epoch, offset), weights, begun, strict=True):
                out.append(
                    SourceProgress(
                        name, state.name, weight / total, state.draws - int(before), state.pass_, state.position
                    )
                )
        return out
