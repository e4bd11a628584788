"""Per-sample targets beyond the class label: what a dataset declares, and their raw values per sample.

A dataset declares ``targets = {field = "kind or extension"}``. A field's **kind** says how it travels
and whether geometry applies to it: ``label`` (an integer), ``text`` (UTF-8), ``json`` (any JSON value),
``boxes`` (``N x 4`` boxes with their integer classes) and ``mask`` (a single-channel PNG aligned with
the image). In tar shards the value names the member's extension (``txt``, ``json``, ``cls``, ``png``,
``seg.png``), from which the kind follows; a kind name there reads its usual extension.

Listing keeps each sample's **raw** value only (the member's or field's bytes, or where a mask's bytes
are): parsing and checking happen in the worker, so a bad target (invalid UTF-8 or JSON, a box outside
the image, a missing member) is a bad sample under the server's ``on_error``, named in ``/status``, not
a failed listing. Raw values are a few numpy arrays per field, like the rest of the table.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from stoker.server.data.locators import Locator

__all__ = [
    "TARGET_KINDS",
    "GEOMETRIC_KINDS",
    "BOX_FORMATS",
    "MAX_INLINE_BYTES",
    "TargetColumn",
    "ColumnBuilder",
    "TargetDecl",
    "resolve_targets",
    "shard_extension",
    "concatenate_columns",
]

TARGET_KINDS: tuple[str, ...] = ("label", "text", "json", "boxes", "mask")
GEOMETRIC_KINDS = frozenset({"boxes", "mask"})
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "cxcywh")
MAX_INLINE_BYTES = 1 << 20
"""The largest inline target (a caption, a JSON record, a box list) kept in the table."""
_EXTENSION_KINDS = {"txt": "text", "text": "text", "json": "json", "cls": "label", "png": "mask", "seg.png": "mask"}
_KIND_EXTENSIONS = {"text": "txt", "json": "json", "label": "cls", "mask": "png", "boxes": "boxes.json"}


@dataclass(frozen=True, slots=True)
class TargetDecl:
    """One declared field: its name, kind and (for shards) the member extension holding it."""

    name: str
    kind: str
    extension: str

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"target {self.name!r}: kind {self.kind!r} must be one of {TARGET_KINDS}")


def resolve_targets(declared: Mapping[str, str]) -> tuple[TargetDecl, ...]:
    """The declared fields, each value a kind or a member extension; ``ValueError`` says what is wrong."""
    out = []
    for name, value in declared.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"target {name!r} = {value!r} must be a kind {TARGET_KINDS} or a member extension")
        lowered = value.lower().lstrip(".")
        if lowered in TARGET_KINDS:
            kind, extension = lowered, _KIND_EXTENSIONS[lowered]
        elif lowered in _EXTENSION_KINDS:
            kind, extension = _EXTENSION_KINDS[lowered], lowered
        elif lowered.endswith(".png"):
            kind, extension = "mask", lowered
        else:
            known = sorted(_EXTENSION_KINDS)
            raise ValueError(f"target {name!r} = {value!r}: not a kind {TARGET_KINDS} nor a known extension {known}")
        out.append(TargetDecl(name, kind, extension))
    if sum(1 for decl in out if decl.kind == "mask") > 1:
        raise ValueError("at most one target of kind 'mask' per dataset")
    if sum(1 for decl in out if decl.kind == "boxes") > 1:
        raise ValueError("at most one target of kind 'boxes' per dataset")
    return tuple(out)


def shard_extension(decls: Sequence[TargetDecl], extension: str) -> TargetDecl | None:
    """The declared field a shard member's (lower-case) extension holds, if any."""
    for decl in decls:
        if decl.extension == extension:
            return decl
    return None


@dataclass(frozen=True, eq=False)
class TargetColumn:
    """One field's raw value per sample: inline bytes (``data[offsets[i]:offsets[i + 1]]``) or, for a
    mask in a shard, a byte range of the sample's shard (``starts``/``lengths``). ``present[i]`` is
    false where the sample has no value (a missing member or field)."""

    kind: str
    data: np.ndarray
    offsets: np.ndarray
    present: np.ndarray
    starts: np.ndarray | None = None
    lengths: np.ndarray | None = None
    box_format: str = "xyxy"

    def __len__(self) -> int:
        return len(self.present)

    def raw(self, index: int) -> bytes | None:
        """The inline bytes of sample ``index`` (``None``: missing)."""
        if not self.present[index]:
            return None
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()

    def locator(self, index: int, container: str, root: str) -> Locator | None:
        """Where a mask's bytes are: a range of the sample's shard, or a path relative to ``root``."""
        if not self.present[index]:
            return None
        if self.starts is not None and self.lengths is not None:
            return Locator(container, int(self.starts[index]), int(self.lengths[index]))
        path = os.fsdecode(self.raw(index) or b"")
        if path.startswith("s3://"):
            return Locator(path)
        if root.startswith("s3://"):
            return Locator(root + path)
        return Locator(os.path.join(root, path))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Its arrays under ``prefix`` names, for the index cache."""
        out = {f"{prefix}.data": self.data, f"{prefix}.offsets": self.offsets, f"{prefix}.present": self.present}
        if self.starts is not None and self.lengths is not None:
            out[f"{prefix}.starts"] = self.starts
            out[f"{prefix}.lengths"] = self.lengths
        return out

    @classmethod
    def from_arrays(cls, kind: str, box_format: str, arrays: Mapping[str, np.ndarray], prefix: str) -> TargetColumn:
        """The column saved by :meth:`arrays`."""
        return cls(
            kind,
            arrays[f"{prefix}.data"],
            arrays[f"{prefix}.offsets"],
            arrays[f"{prefix}.present"].astype(bool),
            arrays.get(f"{prefix}.starts"),
            arrays.get(f"{prefix}.lengths"),
            box_format,
        )

    def digest_parts(self) -> list[bytes]:
        """What the dataset fingerprint covers of this column."""
        parts = [self.kind.encode(), self.box_format.encode(), self.data.tobytes(), self.present.tobytes()]
        parts.append(np.ascontiguousarray(self.offsets).astype("<i8").tobytes())
        for values in (self.starts, self.lengths):
            if values is not None:
                parts.append(np.ascontiguousarray(values).astype("<i8").tobytes())
        return parts


@dataclass
class ColumnBuilder:
    """Collects one field's raw values, sample by sample, in compact buffers."""

    kind: str
    ranged: bool = False
    box_format: str = "xyxy"
    _data: bytearray = field(default_factory=bytearray)
    _ends: array = field(default_factory=lambda: array("q"))
    _present: bytearray = field(default_factory=bytearray)
    _starts: array = field(default_factory=lambda: array("q"))
    _lengths: array = field(default_factory=lambda: array("q"))

    def add(self, value: bytes | None, start: int = -1, length: int = -1) -> None:
        """One sample's raw value (``None``: missing); a ranged column takes ``start``/``length``."""
        present = value is not None or (self.ranged and start >= 0)
        if value is not None:
            self._data += value
        self._ends.append(len(self._data))
        self._present.append(1 if present else 0)
        if self.ranged:
            self._starts.append(start)
            self._lengths.append(length)

    def add_json(self, value: object) -> None:
        """A JSON Lines field's value (absent: ``None``), kept as its JSON text (a text field: its string)."""
        if value is None:
            self.add(None)
        elif self.kind in ("text", "mask") and isinstance(value, str):
            self.add(value.encode("utf-8", "surrogateescape"))
        else:
            self.add(json.dumps(value, separators=(",", ":")).encode())

    def __len__(self) -> int:
        return len(self._present)

    def build(self) -> TargetColumn:
        """The frozen column."""
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64)
        return TargetColumn(
            self.kind,
            np.frombuffer(bytes(self._data), dtype=np.uint8),
            offsets,
            np.frombuffer(bytes(self._present), dtype=np.uint8).astype(bool),
            np.frombuffer(self._starts, dtype=np.int64).copy() if self.ranged else None,
            np.frombuffer(self._lengths, dtype=np.int64).copy() if self.ranged else None,
            self.box_format,
        )


def concatenate_columns(columns: Sequence[TargetColumn]) -> TargetColumn:
    """One column over several (shards' indexes, in order)."""
    first = columns[0]
    bases = np.cumsum([0] + [len(column.data) for column in columns])
    offsets = [column.offsets[:-1] + base for column, base in zip(columns, bases, strict=False)]
    ranged = first.starts is not None
    return TargetColumn(
        first.kind,
        np.concatenate([np.zeros(0, np.uint8), *[column.data for column in columns]]),
        np.concatenate([*offsets, bases[-1:]]).astype(np.int64),
        np.concatenate([np.zeros(0, bool), *[column.present for column in columns]]),
        np.concatenate([column.starts for column in columns]) if ranged else None,  # type: ignore[misc]
        np.concatenate([column.lengths for column in columns]) if ranged else None,  # type: ignore[misc]
        first.box_format,
    )
