"""The job spec: what a client asks a server for, identified by the hash of its canonical form."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.wire import MAX_BATCH_SAMPLES, ErrorCode

__all__ = ["JobSpec", "LAYOUTS", "MAX_IMAGE_SIZE", "MAX_WORLD_SIZE"]

MAX_IMAGE_SIZE = 4096
MAX_WORLD_SIZE = 65536
LAYOUTS = ("nhwc", "nchw")
"""How a batch's image bytes are laid out: ``[n, H, W, 3]`` (the default) or ``[n, 3, H, W]``."""
_OPTIONAL = ("span", "reweights", "layout", "targets")
"""Fields a first-version job lacks: in its id and wire form only when set."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything that decides the bytes of a batch, except epoch, rank and batch number.

    Two clients with equal specs get byte-identical batches from any server.
    """

    dataset: str
    pipeline: str = "train"
    image_size: int = 224
    batch_size: int = 64
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    world_size: int = 1
    span: tuple[int, int] | None = None
    """Positions ``[start, end)`` of each epoch's order that this job plans (a job resumed on another
    number of ranks asks for the rest of its epoch this way); ``None``: the whole epoch."""
    reweights: tuple[tuple[int, int, tuple[tuple[str, float], ...]], ...] = ()
    """A mixture's changes of weight: ``(epoch, offset, ((source, weight), ...))``, each from that
    position of that epoch on (see :mod:`stoker.client.protocol.mixture`); empty: the server's weights."""
    layout: str = "nhwc"
    """The image bytes' layout (:data:`LAYOUTS`): the workers write the rows in it, so the client
    receives straight into the tensor it yields (``nchw``: contiguous, ``nhwc``: channels-last)."""
    targets: tuple[str, ...] = ()
    """Per-sample fields to deliver beyond the images (``("all",)``: every one the dataset declares);
    empty: ``(images, labels)`` as always."""

    def __post_init__(self) -> None:
        for name in ("dataset", "pipeline"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME.match(value):
                raise ValueError(f"{name}={value!r} must be a name of letters, digits, '_', '.', '-'")
        for name, low, high in (
            ("image_size", 8, MAX_IMAGE_SIZE),
            ("batch_size", 1, MAX_BATCH_SAMPLES),
            ("seed", 0, 2**63 - 1),
            ("world_size", 1, MAX_WORLD_SIZE),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} must be an int in [{low}, {high}]")
        for name in ("shuffle", "drop_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} must be one of {LAYOUTS}")
        if self.span is not None:
            span = self.span
            if (
                not isinstance(span, tuple | list)
                or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or not 0 <= span[0] < span[1] <= 2**63 - 1
            ):
                raise ValueError(f"span={span!r} must be [start, end] with 0 <= start < end")
            object.__setattr__(self, "span", (int(span[0]), int(span[1])))
        object.__setattr__(self, "reweights", _reweights(self.reweights))
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, tuple | list) or len(targets) > 64:
            raise ValueError(f"targets={targets!r} must be a list of at most 64 field names")
        for name in targets:
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"targets: {name!r} must be a name of letters, digits, '_', '.', '-'")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets={list(targets)!r} names a field twice")
        object.__setattr__(self, "targets", tuple(targets))

    def _values(self) -> list[Any]:
        values = [getattr(self, f.name) for f in fields(self) if f.name not in _OPTIONAL]
        # ``span`` as it always was; the later ones tagged by name, so no two jobs' values coincide.
        optional = self._optional()
        return [*values, *(value if name == "span" else {name: value} for name, value in optional)]

    def _optional(self) -> list[tuple[str, Any]]:
        """The fields added after the first version, in wire form, each only when not its default: jobs
        without them keep the ids (and wire form) they always had."""
        out: list[tuple[str, Any]] = []
        if self.span is not None:
            out.append(("span", list(self.span)))
        if self.reweights:
            out.append(("reweights", _reweights_wire(self.reweights)))
        if self.layout != "nhwc":
            out.append(("layout", self.layout))
        if self.targets:
            out.append(("targets", list(self.targets)))
        return out

    @property
    def job_id(self) -> str:
        """A short stable hash of the canonical spec."""
        canonical = msgpack.packb(self._values(), use_bin_type=True)
        return hashlib.blake2b(canonical, digest_size=8).hexdigest()

    def to_wire(self) -> dict[str, Any]:
        """The spec as a msgpack-ready map."""
        wire = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _OPTIONAL}
        wire.update(self._optional())
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> JobSpec:
        """Build a spec from a peer's map; unknown or ill-typed fields are an ``INVALID_JOB`` error.

        Unknown fields are refused rather than ignored: a newer client asking for a feature this
        server lacks must not silently get different batches.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ProtocolError(f"unknown job fields {unknown}; known: {sorted(known)}", ErrorCode.INVALID_JOB)
        if isinstance(raw.get("targets"), list):
            raw = {**raw, "targets": tuple(raw["targets"])}
        try:
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"invalid job: {exc}", ErrorCode.INVALID_JOB) from None


def _reweights(raw: Any) -> tuple[tuple[int, int, tuple[tuple[str, float], ...]], ...]:
    """``reweights`` in canonical form (sources sorted by name); raises ``ValueError``."""
    if not isinstance(raw, tuple | list) or len(raw) > 1024:
        raise ValueError(f"reweights={raw!r} must be a list of [epoch, offset, {{source: weight}}]")
    out = []
    for point in raw:
        if not isinstance(point, tuple | list) or len(point) != 3:
            raise ValueError(f"reweights entry {point!r} must be [epoch, offset, {{source: weight}}]")
        epoch, offset, weights = point
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 2**63 - 1 for x in (epoch, offset)):
            raise ValueError(f"reweights entry {point!r}: epoch and offset must be ints >= 0")
        pairs = weights.items() if isinstance(weights, dict) else weights
        try:
            named = sorted((str(name), value) for name, value in pairs)
        except (TypeError, ValueError):
            raise ValueError(f"reweights entry {point!r}: weights must map source names to numbers") from None
        for name, value in named:
            if (
                not _NAME.match(name)
                or isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value < float("inf")
            ):
                raise ValueError(f"reweights entry {point!r}: weight {name}={value!r} must be a finite number >= 0")
        if not named or not sum(v for _, v in named) > 0:
            raise ValueError(f"reweights entry {point!r}: weights need a positive sum")
        out.append((int(epoch), int(offset), tuple((name, float(value)) for name, value in named)))
    return tuple(out)


def _reweights_wire(reweights: tuple[tuple[int, int, tuple[tuple[str, float], ...]], ...]) -> list[Any]:
    return [[epoch, offset, dict(weights)] for epoch, offset, weights in reweights]
