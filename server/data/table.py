"""The samples of one dataset as a few numpy arrays: where each sample's bytes are, and its label.

A sample is ``(locator, label)``. Locators share a few **containers** (a folder, an object prefix,
a tar shard): a sample names its container by number and adds its own name (a path relative to the
folder, a key under the prefix, a member of the shard) and, for a member of a shard, its byte range.
Names live in one ``uint8`` blob with ``int64`` offsets, so a million samples are a handful of arrays
instead of a million Python strings (no refcount churn, no copy-on-read growth in forked workers).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, islice

import numpy as np

from stoker.server.data.locators import Locator
from stoker.server.data.targets import ColumnBuilder, TargetColumn

__all__ = ["SampleTable", "TableBuilder"]


class SampleTable:
    """The samples of one dataset: containers, names, optional byte ranges, labels and class names."""

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        containers: Sequence[str],
        names: np.ndarray,
        name_offsets: np.ndarray,
        labels: np.ndarray,
        container_ids: np.ndarray | None = None,
        starts: np.ndarray | None = None,
        lengths: np.ndarray | None = None,
        fingerprint: str = "",
        targets: dict[str, TargetColumn] | None = None,
    ) -> None:
        self.name = name
        self.classes = tuple(classes)
        self.containers = tuple(containers)
        self._names = names
        self._offsets = name_offsets
        self.labels = labels
        self._container_ids = container_ids
        self._starts = starts
        self._lengths = lengths
        self.targets: dict[str, TargetColumn] = dict(targets or {})
        """Declared per-sample fields beyond the label (:mod:`.targets`), by name."""
        self.fingerprint = fingerprint or self._digest()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def root(self) -> str:
        """The first container (a folder dataset's root)."""
        return self.containers[0] if self.containers else ""

    def member(self, index: int) -> str:
        """The sample's own name: a relative path, a key or a shard member."""
        return os.fsdecode(self._names[self._offsets[index] : self._offsets[index + 1]].tobytes())

    def _container(self, index: int) -> str:
        return self.containers[int(self._container_ids[index]) if self._container_ids is not None else 0]

    def locator(self, index: int) -> Locator:
        """Where sample ``index``'s bytes are (what workers read)."""
        container, member = self._container(index), self.member(index)
        if self._starts is not None and self._lengths is not None:
            return Locator(container, int(self._starts[index]), int(self._lengths[index]))
        if not container or member.startswith("s3://"):
            return Locator(member)
        if container.startswith("s3://"):
            return Locator(container + member)
        return Locator(os.path.join(container, member))

    def target_locator(self, name: str, index: int) -> Locator | None:
        """Where sample ``index``'s mask field ``name`` is (a range of its shard, or a path)."""
        return self.targets[name].locator(index, self._container(index), self.root)

    def display_path(self, index: int) -> str:
        """The sample as people read it in logs and ``/status``: a path, a URL or ``shard:member``."""
        if self._starts is not None:
            return f"{self._container(index)}:{self.member(index)}"
        return self.locator(index).target

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything but the strings, for the index cache."""
        out = {"names": self._names, "name_offsets": self._offsets, "labels": self.labels}
        for key, value in (
            ("container_ids", self._container_ids),
            ("starts", self._starts),
            ("lengths", self._lengths),
        ):
            if value is not None:
                out[key] = value
        for name, column in self.targets.items():
            out.update(column.arrays(f"target.{name}"))
        return out

    def _digest(self) -> str:
        # Covers the whole listing: class names, containers, every sample's name, label and range, so
        # two servers agree on a fingerprint only when they would read the same bytes in the same order.
        digest = hashlib.blake2b(digest_size=16)
        digest.update("\0".join(self.classes).encode())
        if len(self.containers) > 1 or self._starts is not None:
            digest.update(b"\1" + "\0".join(self.containers).encode())
        for values in (self._offsets, self.labels, self._container_ids, self._starts, self._lengths):
            if values is not None:
                digest.update(np.ascontiguousarray(values).astype("<i8").tobytes())
        digest.update(self._names.tobytes())
        for name, column in sorted(self.targets.items()):  # none declared: the fingerprint it always had
            digest.update(b"\2" + name.encode())
            for part in column.digest_parts():
                digest.update(part)
        return digest.hexdigest()


@dataclass
class TableBuilder:
    """Collects ``(container, name, label[, start, length])`` rows, then freezes them into a table.
    Labels are ints, or class names turned into ints sorted like ImageFolder's. Rows go straight into
    compact buffers (a bytearray, typed arrays), so listing a million samples does not build a million
    Python objects first."""

    name: str
    containers: list[str]
    ranged: bool = False
    columns: dict[str, ColumnBuilder] | None = None
    """Declared targets' raw values, one builder per field, filled by the lister row by row."""
    unlabelled: bool = False
    """Rows may lack a label (``-1``): a dataset whose samples carry other targets, or none."""

    def __post_init__(self) -> None:
        self._names = bytearray()
        self._ends = array("q")
        self._ids = array("i")
        self._labels = array("q")
        self._starts = array("q")
        self._lengths = array("q")
        self._class_codes: dict[str, int] = {}
        self._kinds: set[type] = set()

    def add(self, container: int, name: str | bytes, label: int | str, start: int = 0, length: int = -1) -> None:
        """One sample."""
        self._names += os.fsencode(name)
        self._ends.append(len(self._names))
        self._ids.append(container)
        if isinstance(label, str):
            self._kinds.add(str)
            label = self._class_codes.setdefault(label, len(self._class_codes))
        else:
            self._kinds.add(int)
        self._labels.append(label)
        if self.ranged:
            self._starts.append(start)
            self._lengths.append(length)

    def add_many(self, container: int, names: Sequence[str], labels: Sequence[int | str]) -> None:
        """Many samples of one container at once (a manifest's chunk): the loop stays in C."""
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        base = len(self._names)
        self._names += b"".join(encoded)
        self._ends.extend(islice(accumulate((len(chunk) for chunk in encoded), initial=base), 1, None))
        self._ids.extend([container] * len(encoded))
        kinds = {type(label) for label in labels}
        self._kinds |= {str if kind is str else int for kind in kinds}
        if str in kinds:
            codes = self._class_codes
            self._labels.extend([codes.setdefault(label, len(codes)) for label in labels])  # type: ignore[arg-type]
        else:
            self._labels.extend(labels)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._ends)

    def build(self, classes: Sequence[str] | None = None) -> SampleTable:
        """The table; ``classes`` fixes the class names (else they come from the labels)."""
        labels, names = self._final_labels(classes)
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64)
        blob = np.frombuffer(bytes(self._names), dtype=np.uint8)
        ids = np.frombuffer(self._ids, dtype=np.int32).copy() if len(self.containers) > 1 else None
        starts = np.frombuffer(self._starts, dtype=np.int64).copy() if self.ranged else None
        lengths = np.frombuffer(self._lengths, dtype=np.int64).copy() if self.ranged else None
        targets = {name: column.build() for name, column in (self.columns or {}).items()}
        return SampleTable(
            self.name, names, self.containers, blob, offsets, labels, ids, starts, lengths, targets=targets
        )

    def _final_labels(self, classes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
        codes = np.frombuffer(self._labels, dtype=np.int64).copy()
        if self._kinds == {int, str}:
            raise ValueError("labels must be all integers or all class names, not a mix")
        if str in self._kinds:
            # Codes were handed out in order of appearance; class ids are the sorted names' positions.
            names = sorted(self._class_codes) if classes is None else list(classes)
            position = {name: i for i, name in enumerate(names)}
            remap = np.zeros(len(self._class_codes), dtype=np.int64)
            for name, code in self._class_codes.items():
                remap[code] = position[name]
            return remap[codes], names
        if classes is not None:
            return codes, list(classes)
        if self.unlabelled and len(codes) and codes.max() < 0:
            return codes, []
        if len(codes) and codes.min() < 0 and not self.unlabelled:
            raise ValueError("labels must be >= 0")
        top = int(codes.max()) if len(codes) else -1
        return codes, [str(i) for i in range(top + 1)]
