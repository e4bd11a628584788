"""A job's targets on the engine thread: each sample's raw values for its task, and the batch's
targets frame (msgpack) once every row is in. The wire form is in ``client/protocol/WIRE.md``."""

from __future__ import annotations

from typing import Any

import msgpack

from stoker.client.protocol.wire import box_labels_name
from stoker.server.engine.jobs import OpenJob
from stoker.server.engine.records import BatchWork
from stoker.server.imaging.targets import RawTarget

__all__ = ["raw_targets", "targets_frame"]


def raw_targets(job: OpenJob, index: int) -> tuple[RawTarget, ...]:
    """Sample ``index``'s requested targets as a worker gets them (``label`` travels from the table)."""
    out = []
    table = job.table
    for name, kind in job.targets:
        column = table.targets.get(name)
        if column is None:
            continue  # the table's own label
        if kind == "mask":
            out.append(RawTarget(name, kind, locator=table.target_locator(name, index)))
        else:
            out.append(RawTarget(name, kind, column.raw(index), box_format=column.box_format))
    return tuple(out)


def targets_frame(job: OpenJob, work: BatchWork) -> bytes:
    """The batch's targets frame: a map of field -> one value per row (masks travel in their block)."""
    rows = range(len(work.indices))
    values: dict[str, list[Any]] = {}
    for name, kind in job.targets:
        if kind == "mask":
            continue
        if name not in job.table.targets:  # the table's own label
            values[name] = job.table.labels[work.indices].tolist()
        elif kind == "boxes":
            pairs = [work.targets.get(row, {}).get(name, (b"", b"")) for row in rows]
            values[name] = [boxes for boxes, _ in pairs]
            values[box_labels_name(name)] = [labels for _, labels in pairs]
        else:
            values[name] = [work.targets.get(row, {}).get(name) for row in rows]
    return msgpack.packb(values, use_bin_type=True)
