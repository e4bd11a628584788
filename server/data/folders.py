"""Folder datasets: an ImageFolder tree (class = first-level folder), or a flat folder whose labels are
parsed from the file names; on local disk or under an object-storage prefix."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from stoker.server.data.declarations import IMAGE_EXTENSIONS
from stoker.server.data.table import SampleTable, TableBuilder

__all__ = ["scan_image_folder", "scan_flat_folder", "list_prefix_folder"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]
"""Called with the number of samples listed so far."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(name: str, root: Path, progress: Progress) -> SampleTable:
    """An ImageFolder tree, in torchvision's order, so sample ``i`` and class ids match it."""
    if not root.is_dir():
        raise ValueError(f"dataset {name!r}: {str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"dataset {name!r}: no class sub-folders in {str(root)!r}")
    builder = TableBuilder(name, [str(root)])
    for label, cls in enumerate(classes):
        found = 0
        for folder, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for file in sorted(files):
                if _is_image(file):
                    found += 1
                    builder.add(0, os.path.relpath(os.path.join(folder, file), root), label)
        if not found:
            log.warning("dataset %r: class folder %r holds no images", name, cls)
        progress(len(builder))
    return builder.build(classes)


def _label_of(pattern: re.Pattern[str], file: str) -> str | None:
    match = pattern.search(file)
    return match.group(1) if match is not None and match.group(1) is not None else None


def _flat_rows(name: str, files: Iterator[str], pattern: str, progress: Progress) -> tuple[list[str], list[str]]:
    regex = re.compile(pattern)
    kept, labels, unmatched = [], [], []
    for file in files:
        label = _label_of(regex, os.path.basename(file))
        if label is None:
            unmatched.append(file)
            continue
        kept.append(file)
        labels.append(label)
        if len(kept) % 10000 == 0:
            progress(len(kept))
    if unmatched:
        log.warning(
            "dataset %r: %d files do not match label_pattern %r and are left out, e.g. %s",
            name,
            len(unmatched),
            pattern,
            unmatched[:3],
        )
    return kept, labels


def _as_labels(labels: list[str]) -> list[int] | list[str]:
    """Integer labels when every label is a number, else class names (sorted like ImageFolder's)."""
    if labels and all(label.isdigit() for label in labels):
        return [int(label) for label in labels]
    return labels


def scan_flat_folder(name: str, root: Path, pattern: str, progress: Progress) -> SampleTable:
    """Every image directly in ``root``, sorted by name, labelled by ``pattern``'s group 1."""
    if not root.is_dir():
        raise ValueError(f"dataset {name!r}: {str(root)!r} is not a directory")
    files = sorted(entry.name for entry in os.scandir(root) if entry.is_file() and _is_image(entry.name))
    kept, labels = _flat_rows(name, iter(files), pattern, progress)
    builder = TableBuilder(name, [str(root)])
    for file, label in zip(kept, _as_labels(labels), strict=True):
        builder.add(0, file, label)
    return builder.build()


def _walk_order(key: str) -> tuple[str, str, str]:
    cls, rest = key.split("/", 1)
    folder, _, file = rest.rpartition("/")
    return cls, folder, file


def list_prefix_folder(
    name: str, url: str, keys: Iterator[str], pattern: str | None, progress: Progress
) -> SampleTable:
    """An ImageFolder (class = first key component under the prefix) or, with ``pattern``, a flat
    folder, from the keys under an object-storage prefix ``url`` (which ends with ``/``)."""
    images = sorted(key for key in keys if _is_image(key))
    if pattern is not None:
        flat = [key for key in images if "/" not in key]
        kept, labels = _flat_rows(name, iter(flat), pattern, progress)
        builder = TableBuilder(name, [url])
        for key, label in zip(kept, _as_labels(labels), strict=True):
            builder.add(0, key, label)
        return builder.build()
    # torchvision's walk order: by class, then folder (files of a folder before its sub-folders), then name.
    nested = sorted((key for key in images if "/" in key), key=_walk_order)
    classes = sorted({key.split("/", 1)[0] for key in nested})
    if not classes:
        raise ValueError(f"dataset {name!r}: no class folders under {url!r}")
    index = {cls: i for i, cls in enumerate(classes)}
    builder = TableBuilder(name, [url])
    for count, key in enumerate(nested, 1):
        builder.add(0, key, index[key.split("/", 1)[0]])
        if count % 10000 == 0:
            progress(count)
    return builder.build(classes)
