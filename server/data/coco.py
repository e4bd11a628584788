"""COCO instances files (``kind = "coco"``): every image of ``images`` is a sample read from ``root``
(its ``file_name``), its target ``boxes`` the ``bbox`` (``x, y, w, h`` in pixels) and ``category_id``
of its annotations; ``iscrowd`` annotations are left out unless the dataset says ``crowd = true``.
Boxes are kept raw here and checked by the worker (a box outside its image or with a negative size is
a bad sample under ``on_error``), like any other target.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stoker.server.data.declarations import DatasetDecl
from stoker.server.data.index_cache import IndexCache, content_key
from stoker.server.data.manifests import default_root
from stoker.server.data.table import SampleTable, TableBuilder
from stoker.server.data.targets import ColumnBuilder

__all__ = ["list_coco", "read_coco"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


def read_coco(name: str, document: Any, root: str, crowd: bool, progress: Progress) -> SampleTable:
    """The table of a parsed COCO instances document; ``ValueError`` names what is malformed."""
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ValueError(f"dataset {name!r}: a COCO instances file is an object with an 'images' list")
    annotations = document.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError(f"dataset {name!r}: 'annotations' must be a list")
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for number, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            raise ValueError(f"dataset {name!r}: annotation {number} has no image_id")
        if annotation.get("iscrowd") and not crowd:
            continue
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    column = ColumnBuilder("boxes", box_format="xywh")
    builder = TableBuilder(name, [root], columns={"boxes": column}, unlabelled=True)
    known = set()
    for number, image in enumerate(document["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise ValueError(f"dataset {name!r}: image {number} needs 'id' and 'file_name'")
        known.add(image["id"])
        found = by_image.get(image["id"], [])
        # Raw as given: the worker checks each bbox (four numbers, sizes >= 0, inside the image).
        value = {"boxes": [a.get("bbox") for a in found], "labels": [a.get("category_id") for a in found]}
        builder.add(0, image["file_name"], -1)
        column.add(json.dumps(value, separators=(",", ":")).encode())
        if number % 100000 == 0:
            progress(number)
    orphans = sum(len(found) for image_id, found in by_image.items() if image_id not in known)
    if orphans:
        log.warning("dataset %r: %d annotations name an image id the file does not list; left out", name, orphans)
    if not len(builder):
        raise ValueError(f"dataset {name!r}: the COCO file lists no images")
    return builder.build()


def list_coco(decl: DatasetDecl, progress: Progress, cache: IndexCache) -> SampleTable:
    """The table of a COCO instances file, local or on object storage, through the index cache."""
    location = decl.location
    root = str(decl.root) if decl.root else default_root(location)
    if decl.remote:
        from stoker.server.data.stores import parse_s3_url, store_for

        if root.startswith("s3://") and not root.endswith("/"):
            root += "/"
        bucket, key = parse_s3_url(location)
        store = store_for(bucket)
        identity: list[object] = [location, store.head(key).etag]

        def load() -> Any:
            with store.open_stream(key) as stream:
                return json.load(stream)
    else:
        root = str(Path(root).expanduser())
        try:
            info = os.stat(location)
        except OSError:
            raise ValueError(f"dataset {decl.name!r}: COCO file {location!r} does not exist") from None
        identity = [os.path.abspath(location), info.st_size, info.st_mtime_ns]

        def load() -> Any:
            with open(location, encoding="utf-8") as handle:
                return json.load(handle)

    def build() -> SampleTable:
        try:
            document = load()
        except ValueError as exc:
            raise ValueError(f"dataset {decl.name!r}: {location} is not JSON: {exc}") from None
        return read_coco(decl.name, document, root, decl.crowd, progress)

    return cache.cached(content_key("coco", *identity, root, decl.crowd), decl.name, build)
