"""Datasets on object storage: an ImageFolder (or, with ``label_pattern``, a flat folder) under an
``s3://bucket/prefix/``, or a manifest object whose relative paths are keys under ``root`` (default:
the manifest's own prefix). Tar shards on object storage are :mod:`.sharded`'s."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from stoker.server.data.declarations import DatasetDecl
from stoker.server.data.folders import list_prefix_folder
from stoker.server.data.index_cache import IndexCache, content_key
from stoker.server.data.locators import ObjectMissing, StoreUnavailable
from stoker.server.data.manifests import default_root, manifest_format, read_manifest, text_lines
from stoker.server.data.stores import parse_s3_url, store_for
from stoker.server.data.table import SampleTable

__all__ = ["list_remote"]

Progress = Callable[[int], None]


def list_remote(decl: DatasetDecl, progress: Progress, cache: IndexCache) -> SampleTable:
    """The table of a dataset under an ``s3://`` URL; ``ValueError`` names the dataset and the cause."""
    try:
        if decl.kind in ("image_folder", "flat"):
            return _prefix_folder(decl, progress)
        return _manifest_object(decl, progress, cache)
    except (ObjectMissing, StoreUnavailable) as exc:
        raise ValueError(f"dataset {decl.name!r}: {exc}") from None


def _prefix_folder(decl: DatasetDecl, progress: Progress) -> SampleTable:
    url = decl.location if decl.location.endswith("/") else decl.location + "/"
    bucket, prefix = parse_s3_url(url)
    store = store_for(bucket)

    def keys() -> Iterator[str]:
        for count, info in enumerate(store.list(prefix), 1):
            if count % 10000 == 0:
                progress(count)
            yield info.key[len(prefix) :]

    return list_prefix_folder(decl.name, url, keys(), decl.label_pattern, progress)


def _manifest_object(decl: DatasetDecl, progress: Progress, cache: IndexCache) -> SampleTable:
    location = decl.location
    bucket, key = parse_s3_url(location)
    store = store_for(bucket)
    info = store.head(key)
    root = str(decl.root) if decl.root else default_root(location)
    if root.startswith("s3://") and not root.endswith("/"):
        root += "/"  # keys are joined to it as they are
    fmt = manifest_format(location)

    def build() -> SampleTable:
        with store.open_stream(key) as stream:
            return read_manifest(
                decl.name, text_lines(stream), fmt, root, progress, decl.target_decls(), decl.box_format
            )

    parts: list[object] = [location, info.size, info.etag, root, fmt]
    if decl.targets:  # only then: the key of a manifest without targets stays the one it had
        parts += [sorted(decl.targets.items()), decl.box_format]
    return cache.cached(content_key("manifest", *parts), decl.name, build)
