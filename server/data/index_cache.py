"""The index cache: a dataset's table saved after its first listing, found again by a key that names
its content (every listed file's path with its size and modification time, or an object's ETag), so a
restarted server loads a million-sample manifest or shard index in a second instead of reading it all.

A cache file is ``<index_dir>/<key>.npz``: the table's numpy arrays plus a small JSON record (name,
class names, containers, fingerprint, format version). It is written to a temporary name and renamed,
so a reader never sees half a file; one that cannot be read is ignored (and rewritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from stoker.server.data.table import SampleTable
from stoker.server.data.targets import TargetColumn

__all__ = ["IndexCache", "content_key"]

log = logging.getLogger(__name__)
_FORMAT = 1


def content_key(kind: str, *parts: Any) -> str:
    """A key for a listing made from ``parts`` (JSON-able values that change with the content)."""
    text = json.dumps([_FORMAT, kind, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class IndexCache:
    """Tables by content key in ``directory`` (created on first save); ``None`` disables caching."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory

    def _path(self, key: str) -> str:
        return os.path.join(self.directory or "", f"{key}.npz")

    def load(self, key: str, name: str) -> SampleTable | None:
        """The cached table for ``key`` (renamed to ``name``), or ``None``."""
        if not self.directory or not os.path.exists(self._path(key)):
            return None
        try:
            with np.load(self._path(key), allow_pickle=False) as saved:
                meta = json.loads(bytes(saved["meta"]).decode())
                if meta.get("format") != _FORMAT:
                    return None
                arrays = {k: saved[k] for k in saved.files if k != "meta"}
        except (OSError, ValueError, KeyError) as exc:
            log.warning("index cache %s unreadable (%s); listing again", self._path(key), exc)
            return None
        table = SampleTable(
            name,
            meta["classes"],
            meta["containers"],
            arrays["names"],
            arrays["name_offsets"],
            arrays["labels"],
            arrays.get("container_ids"),
            arrays.get("starts"),
            arrays.get("lengths"),
            meta["fingerprint"],
            targets={
                name: TargetColumn.from_arrays(kind, box_format, arrays, f"target.{name}")
                for name, (kind, box_format) in meta.get("targets", {}).items()
            },
        )
        table.from_cache = True  # type: ignore[attr-defined]
        return table

    def save(self, key: str, table: SampleTable) -> None:
        """Keep ``table`` under ``key``; a failure to write is logged, never fatal."""
        if not self.directory:
            return
        meta = {
            "format": _FORMAT,
            "classes": list(table.classes),
            "containers": list(table.containers),
            "fingerprint": table.fingerprint,
        }
        if table.targets:
            meta["targets"] = {name: [column.kind, column.box_format] for name, column in table.targets.items()}
        try:
            os.makedirs(self.directory, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                np.savez(out, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **table.arrays())
            os.replace(temporary, self._path(key))
        except OSError as exc:
            log.warning("cannot write the index cache in %s: %s", self.directory, exc)

    def cached(self, key: str, name: str, build: Callable[[], SampleTable]) -> SampleTable:
        """The table for ``key`` from the cache, or built now and saved."""
        table = self.load(key, name)
        if table is not None:
            log.info("dataset %r: index read from the cache (%d samples)", name, len(table))
            return table
        table = build()
        self.save(key, table)
        return table
