"""Datasets declared by the operator: an ImageFolder tree or a CSV/TSV file list.

Clients name a dataset; they never name a path. Each dataset's file paths live in one ``uint8`` blob
with an ``int64`` offset array and its labels in an ``int64`` array, so a million samples are three
numpy arrays instead of a million Python strings (no refcount churn, no copy-on-read growth).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["DatasetDecl", "SampleTable", "Catalog", "IMAGE_EXTENSIONS", "load_dataset"]

log = logging.getLogger(__name__)

# The same extensions torchvision's ImageFolder accepts, matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True, slots=True)
class DatasetDecl:
    """An operator's declaration: ``image_folder`` (class = sub-folder) or ``file_list`` (path,label rows)."""

    name: str
    path: Path
    kind: Literal["image_folder", "file_list"] = "image_folder"
    root: Path | None = None
    """For a file list: the folder relative paths are read from (default: the list's folder)."""


class SampleTable:
    """The samples of one dataset: root, relative paths, labels and class names."""

    def __init__(self, name: str, root: Path, classes: list[str], rows: Iterable[tuple[bytes, int]]) -> None:
        self.name = name
        self.root = root
        self.classes = tuple(classes)
        offsets = [0]
        chunks: list[bytes] = []
        labels: list[int] = []
        digest = hashlib.blake2b(digest_size=16)
        digest.update("\0".join(self.classes).encode())
        for rel, label in rows:
            chunks.append(rel)
            offsets.append(offsets[-1] + len(rel))
            labels.append(label)
            digest.update(rel + b"\0" + label.to_bytes(8, "little", signed=True))
        # Build the arrays, then drop the temporary Python lists: only numpy arrays stay alive.
        self._blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.fingerprint = digest.hexdigest()
        self._root_bytes = os.fsencode(root)

    def __len__(self) -> int:
        return len(self.labels)

    def relative_path(self, index: int) -> bytes:
        """The sample's path relative to the dataset root, as bytes."""
        return self._blob[self._offsets[index] : self._offsets[index + 1]].tobytes()

    def path(self, index: int) -> bytes:
        """The sample's full path as bytes (what workers open)."""
        return os.path.join(self._root_bytes, self.relative_path(index))

    def display_path(self, index: int) -> str:
        """The sample's full path as text for logs and ``/status``."""
        return os.fsdecode(self.path(index))


def _scan_image_folder(name: str, root: Path) -> SampleTable:
    if not root.is_dir():
        raise ValueError(f"dataset {name!r}: {str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"dataset {name!r}: no class sub-folders in {str(root)!r}")

    def rows() -> Iterator[tuple[bytes, int]]:
        for label, cls in enumerate(classes):
            found = 0
            # Same walk order as torchvision's ImageFolder, so sample i and class ids match it.
            for folder, _, files in sorted(os.walk(root / cls, followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        found += 1
                        yield os.fsencode(os.path.relpath(os.path.join(folder, file), root)), label
            if not found:
                log.warning("dataset %r: class folder %r holds no images", name, cls)

    return SampleTable(name, root, classes, rows())


def _read_file_list(name: str, path: Path, root: Path | None) -> SampleTable:
    if not path.is_file():
        raise ValueError(f"dataset {name!r}: file list {str(path)!r} does not exist")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with path.open(newline="", encoding="utf-8") as handle:
        raw = [row for row in csv.reader(handle, delimiter=delimiter) if row and any(cell.strip() for cell in row)]
    if raw and raw[0][-1].strip().lower() in ("label", "class", "target"):
        raw = raw[1:]
    bad = [i for i, row in enumerate(raw) if len(row) != 2 or not row[0].strip()]
    if bad:
        raise ValueError(f"dataset {name!r}: rows {bad[:5]} of {str(path)!r} are not 'path,label'")
    labels_text = [row[1].strip() for row in raw]
    if all(text.lstrip("-").isdigit() for text in labels_text):
        numbers = [int(text) for text in labels_text]
        if numbers and min(numbers) < 0:
            raise ValueError(f"dataset {name!r}: labels must be >= 0")
        classes = [str(i) for i in range(max(numbers, default=-1) + 1)]
    else:
        classes = sorted(set(labels_text))
        index = {cls: i for i, cls in enumerate(classes)}
        numbers = [index[text] for text in labels_text]
    base = root if root is not None else path.parent
    rows = ((os.fsencode(row[0].strip()), label) for row, label in zip(raw, numbers, strict=False))
    return SampleTable(name, base, classes, rows)


def load_dataset(decl: DatasetDecl) -> SampleTable:
    """Scan or read a declared dataset; raise ``ValueError`` naming the dataset when it is unusable."""
    if decl.kind == "image_folder":
        table = _scan_image_folder(decl.name, decl.path)
    else:
        table = _read_file_list(decl.name, decl.path, decl.root)
    if len(table) == 0:
        raise ValueError(f"dataset {decl.name!r} at {str(decl.path)!r} has no images")
    log.info("dataset %r: %d samples, %d classes from %s", decl.name, len(table), len(table.classes), decl.path)
    return table


class Catalog(Mapping[str, SampleTable]):
    """The datasets this server may read, by name. Nothing else is ever opened."""

    def __init__(self, tables: Iterable[SampleTable]) -> None:
        self._tables = {table.name: table for table in tables}

    @classmethod
    def load(cls, decls: Iterable[DatasetDecl]) -> Catalog:
        """Load every declaration."""
        return cls(load_dataset(decl) for decl in decls)

    def __getitem__(self, name: str) -> SampleTable:
        return self._tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)
