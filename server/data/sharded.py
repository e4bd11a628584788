"""Tar-shard datasets (the WebDataset layout), on local disk or object storage: every shard indexed
once (member, offset, size, label), the index cached, and samples read by offset, so shuffling stays
global and per sample. Keys without an image or without a label are reported here, when the dataset
is opened, not in the middle of an epoch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from stoker.server.data.index_cache import IndexCache, content_key
from stoker.server.data.shards import ProblemKind, ShardIndex, concatenate, expand_pattern, index_shard
from stoker.server.data.table import SampleTable
from stoker.server.data.targets import TargetDecl

__all__ = ["list_shards", "table_of"]

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


def _identity(shard: str) -> tuple[str, int, str]:
    """What changes when a shard's content does: its size and modification time, or its ETag."""
    if shard.startswith("s3://"):
        from stoker.server.data.stores import parse_s3_url, store_for

        bucket, key = parse_s3_url(shard)
        info = store_for(bucket).head(key)
        return shard, info.size, info.etag
    try:
        stat = os.stat(shard)
    except OSError as exc:
        raise ValueError(f"shard {shard!r}: {exc.strerror}") from None
    return shard, stat.st_size, str(stat.st_mtime_ns)


@contextmanager
def _opened(shard: str) -> Iterator[BinaryIO]:
    if shard.startswith("s3://"):
        from stoker.server.data.stores import parse_s3_url, store_for

        bucket, key = parse_s3_url(shard)
        stream = store_for(bucket).open_stream(key)
        try:
            yield stream
        finally:
            stream.close()
    else:
        with open(shard, "rb", buffering=1 << 20) as stream:
            yield stream


def table_of(name: str, index: ShardIndex) -> SampleTable:
    """The sample table of a (concatenated) shard index: one container per shard, samples by range."""
    top = int(index.labels.max()) if len(index) else -1
    return SampleTable(
        name,
        [str(i) for i in range(top + 1)],
        list(index.shards),
        index.names,
        index.name_offsets,
        index.labels,
        index.shard_ids,
        index.data_offsets,
        index.sizes,
        targets=index.targets,
    )


def list_shards(
    name: str,
    pattern: str,
    progress: Progress,
    cache: IndexCache,
    targets: tuple[TargetDecl, ...] = (),
    box_format: str = "xyxy",
) -> SampleTable:
    """The table of every shard ``pattern`` names, from the cache when the shards have not changed.

    Labels (``.cls``) are optional in a dataset declaring other targets, or one whose keys have no
    label at all (images alone): their samples get label -1. Otherwise a key without one is left out."""
    try:
        shards = expand_pattern(pattern)
    except ValueError as exc:
        raise ValueError(f"dataset {name!r}: {exc}") from None
    identities = [_identity(shard) for shard in shards]

    def index_all(labels_optional: bool) -> tuple[ShardIndex, list[ShardIndex]]:
        indexes, listed = [], 0
        for shard in shards:
            with _opened(shard) as stream:
                declared = targets if labels_optional else None
                index = index_shard(stream, shard, targets=declared, box_format=box_format)
            indexes.append(index)
            listed += len(index)
            progress(listed)
        return concatenate(indexes), indexes

    def build() -> SampleTable:
        # Without declared targets a shard needs its .cls as always, unless no key has one at all:
        # then the dataset is images alone (self-supervised), read again with labels optional.
        combined, indexes = index_all(bool(targets))
        if not targets and not len(combined) and _labels_missing(indexes):
            combined, indexes = index_all(True)
        for index in indexes:
            if index.problem_count:
                examples = "; ".join(str(problem) for problem in index.problems[:3])
                log.warning(
                    "dataset %r: %d problems in %s, e.g. %s", name, index.problem_count, index.shards[0], examples
                )
        if not len(combined):
            raise ValueError(f"dataset {name!r}: no complete sample (image + .cls) in {len(shards)} shards")
        return table_of(name, combined)

    parts: list[object] = [identities]
    if targets:  # only then: the key of shards without targets stays the one it had
        parts += [[(t.name, t.kind, t.extension) for t in targets], box_format]
    return cache.cached(content_key("shards", *parts), name, build)


def _labels_missing(indexes: list[ShardIndex]) -> bool:
    """Whether images were left out for want of a label (with no sample listed, no key had one)."""
    return any(problem.kind is ProblemKind.MISSING_LABEL for index in indexes for problem in index.problems)
