"""Manifests: a list of ``(path, label)`` rows in CSV/TSV (``path,label``, an optional header) or JSON
Lines (``{"path": ..., "label": ...}``). Paths are relative to ``root`` (default: the manifest's own
folder or prefix), or absolute; labels are integers or class names (sorted like ImageFolder's).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator

from stoker.server.data.table import SampleTable, TableBuilder
from stoker.server.data.targets import ColumnBuilder, TargetDecl

__all__ = ["read_manifest", "manifest_format"]

Progress = Callable[[int], None]
_CHUNK = 65536
_SHAPE = '{"path": str, "label": int or str}'
_HEADER_LABELS = ("label", "class", "target")


def manifest_format(location: str) -> str:
    """``jsonl``, ``tsv`` or ``csv`` from the manifest's name."""
    lower = location.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "tsv" if lower.endswith((".tsv", ".tab")) else "csv"


def _csv_rows(name: str, lines: Iterable[str], delimiter: str) -> Iterator[tuple[str, str]]:
    first = True
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), 1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if first and row[-1].strip().lower() in _HEADER_LABELS:
            first = False
            continue
        first = False
        if len(row) != 2 or not row[0].strip():
            raise ValueError(f"dataset {name!r}: row {number} {row[:3]} is not 'path,label'")
        yield row[0].strip(), row[1].strip()


def _jsonl_chunks(
    name: str, lines: Iterable[str], labels_optional: bool = False
) -> Iterator[tuple[list[str], list[int | str], list[object]]]:
    """``(paths, labels, entries)`` per chunk of lines: a chunk is parsed as one JSON array, in C, rather
    than line by line (a million-line manifest in seconds). ``labels_optional``: a line without a
    ``label`` gets ``-1`` (a dataset declaring other targets)."""
    first = 1
    for chunk in _batched((line for line in lines if line.strip()), _CHUNK):
        try:
            entries = json.loads("[" + ",".join(chunk) + "]")
        except ValueError:  # find the line at fault, to name it
            entries = [_parse_line(name, first + offset, line) for offset, line in enumerate(chunk)]
        paths = [entry.get("path") if isinstance(entry, dict) else None for entry in entries]
        labels = [entry.get("label") if isinstance(entry, dict) else None for entry in entries]
        if labels_optional:
            labels = [-1 if label is None else label for label in labels]
        for offset, (path, label) in enumerate(zip(paths, labels, strict=True)):
            if not isinstance(path, str) or not path or isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ValueError(f"dataset {name!r}: line {first + offset} must be {_SHAPE}")
        first += len(chunk)
        yield paths, labels, entries  # type: ignore[misc]


def _parse_line(name: str, number: int, line: str) -> object:
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValueError(f"dataset {name!r}: line {number} is not JSON: {exc}") from None


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _label(text: int | str) -> int | str:
    if isinstance(text, int):
        return text
    return int(text) if text.lstrip("-").isdigit() else text


def read_manifest(
    name: str,
    lines: Iterable[str],
    fmt: str,
    root: str,
    progress: Progress,
    targets: tuple[TargetDecl, ...] = (),
    box_format: str = "xyxy",
) -> SampleTable:
    """The table of a manifest whose text is ``lines``; relative paths are joined to ``root`` (a local
    folder or an ``s3://`` prefix). ``targets``: JSON Lines fields kept per sample (their raw JSON)."""
    if targets and fmt != "jsonl":
        raise ValueError(f"dataset {name!r}: targets need a JSON Lines manifest (other fields of each line)")
    columns = {decl.name: ColumnBuilder(decl.kind, box_format=box_format) for decl in targets}
    builder = TableBuilder(name, [root], columns=columns or None, unlabelled=bool(targets))
    if fmt == "jsonl":
        for paths, labels, entries in _jsonl_chunks(name, lines, bool(targets)):
            builder.add_many(0, paths, labels)
            for field_name, column in columns.items():
                for entry in entries:
                    column.add_json(entry.get(field_name))  # type: ignore[union-attr]
            progress(len(builder))
    else:
        for count, (path, label) in enumerate(_csv_rows(name, lines, "\t" if fmt == "tsv" else ","), 1):
            builder.add(0, path, _label(label))
            if count % 100000 == 0:
                progress(count)
    if not len(builder):
        raise ValueError(f"dataset {name!r}: the manifest lists no images")
    try:
        return builder.build()
    except ValueError as exc:
        raise ValueError(f"dataset {name!r}: {exc}") from None


def text_lines(binary: io.BufferedIOBase | io.RawIOBase) -> Iterator[str]:
    """The lines of a UTF-8 byte stream (a local file or an object being downloaded)."""
    yield from io.TextIOWrapper(binary, encoding="utf-8", newline="")  # type: ignore[arg-type]


def default_root(location: str) -> str:
    """A manifest's own folder (or prefix): where its relative paths point by default."""
    if location.startswith("s3://"):
        return location.rsplit("/", 1)[0] + "/"
    return os.path.dirname(os.path.abspath(location))
