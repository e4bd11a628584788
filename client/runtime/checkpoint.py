"""The checkpoint format of ``RemoteBatches.state_dict()``: written here, read and checked here.

A state is a plain dict (JSON- and ``torch.save``-friendly)::

    {"version": 1, "job": {"dataset": "imagenet", "pipeline": "train", "image_size": 224,
     "batch_size": 64, "seed": 0, "shuffle": true, "drop_last": false, "world_size": 8},
     "rank": 0, "epoch": 3, "next_batch": 120}

Version 2 is the same with ``"span": [start, end]``: the epoch was itself resumed on another number
of ranks and its batches are those of that part of the epoch's order. A state without a span stays
version 1, so clients that only know version 1 still read it; one with a span is version 2, so they
refuse it rather than misread it. Both versions load.

A mixture job adds ``"mixture": {"sources": {name: {"weight", "pass", "position"}}, "base_weights":
{name: weight}}``: where each source stands (for people and tools; the job's ``reweights`` and the
position decide the plan) and the servers' declared weights the job was planned from (so a resume
after the TOML changed them takes the new ones from the saved position on). Its job may carry
``reweights``; a client that predates mixtures refuses that job field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from stoker.client.protocol.job import JobSpec
from stoker.client.runtime.position import SavedPosition

__all__ = ["STATE_VERSION", "SPAN_STATE_VERSION", "state_dict", "read_state", "read_states"]

STATE_VERSION = 1
SPAN_STATE_VERSION = 2
_REQUIRED = ("version", "job", "epoch", "next_batch")


def state_dict(
    spec: JobSpec, rank: int, saved: SavedPosition, mixture: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The state of ``rank`` of the job ``spec`` at ``saved`` (whose world size is the spec's); a
    mixture job adds where each source stands (``mixture``, informative: the job and position decide)."""
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "job": replace(spec, layout="nhwc").to_wire(),  # the layout is not the position's: left out
        "rank": rank,
        "epoch": saved.epoch,
        "next_batch": saved.next_batch,
    }
    if saved.span is not None:
        state.update(version=SPAN_STATE_VERSION, span=list(saved.span))
    if mixture is not None:
        state["mixture"] = dict(mixture)
    return state


def read_state(state: Mapping[str, Any], spec: JobSpec) -> SavedPosition:
    """The position in one rank's ``state``, checked against this client's job ``spec``: every field
    but ``world_size`` and ``targets`` must match (any number of ranks may resume a state, asking for
    any targets: they do not change which samples come when). Raises ``ValueError``."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a state is a dict from state_dict(), not {type(state).__name__}")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise ValueError(f"state lacks {missing}: not a state_dict() of RemoteBatches")
    version = state["version"]
    if version not in (STATE_VERSION, SPAN_STATE_VERSION):
        raise ValueError(f"state version {version!r} is not one of {STATE_VERSION}, {SPAN_STATE_VERSION}")
    if not isinstance(state["job"], Mapping):
        raise ValueError(f"state's job={state['job']!r} is not a job spec's map")
    saved = JobSpec.from_wire(dict(state["job"]))
    # The layout orders the same bytes differently and targets ride beside them (any may resume a state);
    # a mixture's re-weightings are the saved job's to carry on, not a difference of job.
    ours = replace(
        spec, world_size=saved.world_size, layout=saved.layout, reweights=saved.reweights, targets=saved.targets
    )
    if saved != ours:
        diff = {k: (v, getattr(ours, k)) for k, v in saved.to_wire().items() if getattr(ours, k) != v}
        raise ValueError(f"state is for another job; differing fields (saved, current): {diff}")
    try:  # as lenient as int(): states that loaded before still load
        epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        span = None if state.get("span") is None else _as_span(state["span"])
    except (TypeError, ValueError):
        epoch, next_batch, span = -1, -1, None
    if epoch < 0 or next_batch < 0 or (span is not None and not 0 <= span[0] < span[1]):
        raise ValueError(
            f"bad state: epoch={state['epoch']!r}, next_batch={state['next_batch']!r}, span={state.get('span')!r}"
        )
    return SavedPosition(epoch, next_batch, span, saved.world_size, saved.reweights)


def read_states(states: Mapping[str, Any] | Sequence[Mapping[str, Any]], spec: JobSpec) -> SavedPosition:
    """The position of one state, or of a list of ranks' states that must agree on it (in DDP every
    rank is at the same step, so any one rank's state describes the job). Raises ``ValueError``."""
    many = [states] if isinstance(states, Mapping) else list(states)
    if not many:
        raise ValueError("no state to load")
    saved = [read_state(one, spec) for one in many]
    first = saved[0]
    for one, other in zip(many[1:], saved[1:], strict=True):
        if other != first:
            raise ValueError(
                f"states disagree on the position: rank {many[0].get('rank')} at {first}, "
                f"rank {one.get('rank')} at {other}"
            )
    ranks = [one.get("rank") for one in many]
    for rank in ranks:
        if ranks.count(rank) > 1:
            raise ValueError(f"states of rank {rank} twice: pass one state, or one per old rank")
    return first


def _as_span(raw: Any) -> tuple[int, int]:
    if len(raw) != 2:
        raise ValueError(f"span={raw!r} must be [start, end]")
    return int(raw[0]), int(raw[1])
