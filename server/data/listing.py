"""Listing a declared dataset: one function per kind of source, all returning a :class:`SampleTable`.

Local folders are walked each start (the walk is the listing). Manifests and tar shards, which can
be large and remote, are read once and their table kept in the index cache (:mod:`.index_cache`),
keyed by what identifies their content (paths, sizes, modification times or ETags), so a restarted
server is ready in seconds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from stoker.server.data.custom import list_with_plugin
from stoker.server.data.declarations import DatasetDecl
from stoker.server.data.folders import scan_flat_folder, scan_image_folder
from stoker.server.data.index_cache import IndexCache, content_key
from stoker.server.data.manifests import default_root, manifest_format, read_manifest
from stoker.server.data.table import SampleTable

__all__ = ["list_dataset"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


def list_dataset(decl: DatasetDecl, progress: Progress, cache: IndexCache | None = None) -> SampleTable:
    """The table of a declared (and resolved) dataset."""
    cache = cache or IndexCache(None)
    location = decl.location
    if decl.kind == "plugin":
        return list_with_plugin(decl.name, decl.plugin or "", dict(decl.kwargs), progress)
    if decl.kind == "shards":
        from stoker.server.data.sharded import list_shards

        return list_shards(decl.name, location, progress, cache, decl.target_decls(), decl.box_format)
    if decl.kind == "coco":
        from stoker.server.data.coco import list_coco

        return list_coco(decl, progress, cache)
    if decl.remote:
        from stoker.server.data.remote import list_remote

        return list_remote(decl, progress, cache)
    if decl.kind == "flat":
        return scan_flat_folder(decl.name, Path(location), decl.label_pattern or "", progress)
    if decl.kind == "image_folder":
        return scan_image_folder(decl.name, Path(location), progress)
    return _local_manifest(decl, progress, cache)


def _local_manifest(decl: DatasetDecl, progress: Progress, cache: IndexCache) -> SampleTable:
    location = decl.location
    try:
        info = os.stat(location)
    except OSError:
        raise ValueError(f"dataset {decl.name!r}: file list {location!r} does not exist") from None
    root = str(Path(decl.root).expanduser()) if decl.root else default_root(location)
    fmt = manifest_format(location)

    def build() -> SampleTable:
        with open(location, encoding="utf-8", newline="") as lines:
            return read_manifest(decl.name, lines, fmt, root, progress, decl.target_decls(), decl.box_format)

    parts: list[object] = [os.path.abspath(location), info.st_size, info.st_mtime_ns, root, fmt]
    if decl.targets:  # only then: the key of a manifest without targets stays the one it had
        parts += [sorted(decl.targets.items()), decl.box_format]
    key = content_key("manifest", *parts)
    return cache.cached(key, decl.name, build)
