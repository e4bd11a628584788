"""A mixture job on the client: where each source stands at a position, and the job's re-weightings
when it resumes with new weights (see :mod:`stoker.client.protocol.mixture`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.mixture import Mixture
from stoker.client.runtime.position import SavedPosition

__all__ = ["resume_offset", "mixture_state", "planned_weights", "reweights_after", "check_weights"]


def resume_offset(saved: SavedPosition, batch_size: int) -> int:
    """The position of the epoch's order that ``saved`` resumes at (every batch before it is full)."""
    return (saved.span[0] if saved.span is not None else 0) + saved.next_batch * batch_size * saved.world_size


def _named(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((str(name), float(value)) for name, value in weights.items()))


def mixture_state(spec: JobSpec, described: Mapping[str, Any], saved: SavedPosition) -> dict[str, Any]:
    """Each source's weight, pass and position at ``saved`` of the mixture job ``spec``, and the
    servers' declared weights the job was planned from (``base_weights``)."""
    plan = Mixture(
        tuple(described["sources"]),
        tuple(described["sizes"]),
        tuple(described["weights"]),
        described["epoch_samples"],
        spec.seed,
        spec.shuffle,
    )
    plan = replace(plan, reweights=tuple((e, o, plan.weights_from(dict(w))) for e, o, w in spec.reweights))
    offset = resume_offset(saved, spec.batch_size)
    weights = plan.weights_at(saved.epoch, offset)
    total = sum(weights)
    return {
        "sources": {
            state.name: {"weight": w / total, "pass": state.pass_, "position": state.position}
            for state, w in zip(plan.states(saved.epoch, offset), weights, strict=True)
        },
        "base_weights": dict(zip(plan.names, plan.weights, strict=True)),
    }


def check_weights(described: Mapping[str, Any], weights: Mapping[str, float]) -> None:
    """Raise ``ValueError`` unless ``weights`` name exactly the mixture's sources, with numbers >= 0."""
    plan = Mixture(tuple(described["sources"]), tuple(described["sizes"]), tuple(described["weights"]), 1)
    plan.weights_from(dict(weights))


def planned_weights(state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """The servers' declared weights a saved mixture job was planned from, when it needs them (it
    has no re-weighting at its very start that fixes the weights of its first epochs)."""
    one = state if isinstance(state, Mapping) else (state[0] if state else {})
    mixture = one.get("mixture")
    if not isinstance(mixture, Mapping) or not isinstance(mixture.get("base_weights"), Mapping):
        return None
    reweights = one.get("job", {}).get("reweights") or []
    if reweights and list(reweights[0][:2]) == [0, 0]:
        return None  # the job's own first entry, not the servers' weights, plans it from the start
    return {str(k): float(v) for k, v in mixture["base_weights"].items()}


def reweights_after(
    saved: SavedPosition,
    batch_size: int,
    planned: Mapping[str, float] | None,
    weights: Mapping[str, float] | None,
) -> tuple:
    """The job's re-weightings to resume ``saved`` with ``weights`` from the saved position on. When
    the servers' declared weights may have changed since (``planned`` are the ones the job was
    planned from), they are pinned at the job's start so the epochs before keep their plan."""
    reweights = tuple(saved.reweights)
    if weights is None:
        return reweights
    if planned is not None:
        reweights = ((0, 0, _named(planned)), *reweights)
    point = (saved.epoch, resume_offset(saved, batch_size))
    kept = tuple(r for r in reweights if (r[0], r[1]) != point or point == (0, 0))  # one change per point
    if point == (0, 0):
        kept = tuple(r for r in kept if (r[0], r[1]) != (0, 0))
    return (*kept, (*point, _named(weights)))
