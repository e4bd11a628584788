"""The datasets this server may read, by name. Clients name a dataset; they never name a path.

Each declared dataset is listed once at start (:func:`~stoker.server.data.listing.list_dataset`),
possibly for minutes, while the server already answers ``/healthz``: the catalog shows each dataset's
state and progress, a job on a dataset still loading is answered ``NOT_READY`` (the client waits and
asks again), and readiness waits for every dataset.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from stoker.server.data.declarations import IMAGE_EXTENSIONS, DatasetDecl
from stoker.server.data.index_cache import IndexCache
from stoker.server.data.mixtures import MixtureDecl
from stoker.server.data.table import SampleTable

__all__ = ["Catalog", "DatasetDecl", "DatasetEntry", "SampleTable", "IMAGE_EXTENSIONS", "load_dataset"]

log = logging.getLogger(__name__)
_TRACEBACK_CHARS = 4000


@dataclass(eq=False)
class DatasetEntry:
    """One declared dataset as the catalog knows it. Written by the thread listing it; other threads
    read single attributes (each assignment is atomic), and ``table`` is set before ``state``."""

    decl: DatasetDecl
    state: str = "loading"
    """``loading``, ``ready`` or ``failed``."""
    listed: int = 0
    """Samples listed so far."""
    table: SampleTable | None = None
    error: str | None = None
    traceback: str | None = None
    """The last frames of a failed listing, the operator's own code (a plugin) included."""
    from_cache: bool = False
    seconds: float = 0.0


def load_dataset(
    decl: DatasetDecl, progress: Callable[[int], None] | None = None, cache: IndexCache | None = None
) -> SampleTable:
    """List one declared dataset now; ``ValueError`` names the dataset when it is unusable."""
    from stoker.server.data.listing import list_dataset

    started = time.monotonic()
    table = list_dataset(decl.resolved(), progress or (lambda count: None), cache)
    if len(table) == 0:
        raise ValueError(f"dataset {decl.name!r} at {decl.location!r} has no images")
    log.info(
        "dataset %r: %d samples, %d classes from %s in %.1f s",
        decl.name,
        len(table),
        len(table.classes),
        decl.location or decl.plugin,
        time.monotonic() - started,
    )
    return table


class Catalog(Mapping[str, SampleTable]):
    """Declared datasets by name; as a mapping, the ones ready to serve."""

    def __init__(
        self,
        tables: Iterable[SampleTable] = (),
        decls: Iterable[DatasetDecl] = (),
        index_dir: str | None = None,
        mixtures: Iterable[MixtureDecl] = (),
    ) -> None:
        self.cache = IndexCache(index_dir)
        self.mixtures = {mixture.name: mixture for mixture in mixtures}
        """Declared mixtures by name (checked against the datasets at start)."""
        self._entries: dict[str, DatasetEntry] = {}
        for table in tables:
            self._entries[table.name] = DatasetEntry(DatasetDecl(table.name, table.root), "ready", len(table), table)
        for decl in decls:
            self._entries[decl.name] = DatasetEntry(decl)

    @classmethod
    def load(cls, decls: Iterable[DatasetDecl]) -> Catalog:
        """List every declaration now (tests, tools); raises on the first unusable one."""
        return cls(load_dataset(decl) for decl in decls)

    def load_declared(self, progress_log_s: float = 10.0) -> bool:
        """List every dataset still loading, one after another, in this thread; ``False`` if one
        failed (its entry says why)."""
        ok = True
        for entry in self.entries:
            if entry.state == "loading":
                ok = self._load(entry, progress_log_s) and ok
        return ok

    def _load(self, entry: DatasetEntry, progress_log_s: float) -> bool:
        started = last_log = time.monotonic()

        def progress(count: int) -> None:
            nonlocal last_log
            entry.listed = count
            if time.monotonic() - last_log >= progress_log_s:
                last_log = time.monotonic()
                log.info("dataset %r: %d samples listed so far", entry.decl.name, count)

        try:
            table = load_dataset(entry.decl, progress, self.cache)
        except Exception as exc:  # whatever stops a listing (a store, a plugin) fails that dataset, with why
            reason = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
            entry.traceback = "".join(traceback.format_exception(exc))[-_TRACEBACK_CHARS:]
            entry.error, entry.state = reason, "failed"
            log.error("dataset %r cannot be served: %s", entry.decl.name, reason, exc_info=exc)
            return False
        entry.seconds = time.monotonic() - started
        entry.from_cache = getattr(table, "from_cache", False)
        entry.listed, entry.table = len(table), table
        entry.state = "ready"
        return True

    # -- reading (any thread) --------------------------------------------------------------------

    @property
    def entries(self) -> list[DatasetEntry]:
        """Every declared dataset."""
        return list(self._entries.values())

    def entry(self, name: str) -> DatasetEntry | None:
        """A declared dataset's entry, ready or not."""
        return self._entries.get(name)

    @property
    def declared(self) -> list[str]:
        """Every declared name, sorted."""
        return sorted(self._entries)

    @property
    def ready(self) -> bool:
        """Every dataset listed."""
        return all(entry.state == "ready" for entry in self._entries.values())

    @property
    def failed(self) -> list[DatasetEntry]:
        """Datasets that could not be listed."""
        return [entry for entry in self._entries.values() if entry.state == "failed"]

    def __getitem__(self, name: str) -> SampleTable:
        entry = self._entries.get(name)
        if entry is None or entry.table is None:
            raise KeyError(name)
        return entry.table

    def __iter__(self) -> Iterator[str]:
        return (name for name, entry in self._entries.items() if entry.table is not None)

    def __len__(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.table is not None)
