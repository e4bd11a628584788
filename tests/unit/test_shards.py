"""Tar shards: pattern expansion, and an index whose byte ranges read back the exact member bytes."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import sys
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

from stoker.server.data.shards import (
    ProblemKind,
    ShardIndex,
    concatenate,
    expand_pattern,
    index_shard,
    split_name,
)
from tests.helpers import DEMO_DATA

PHOTOS = sorted(DEMO_DATA.rglob("*.jpg"))[:6]

# -- patterns -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/d/train.tar", ["/d/train.tar"]),
        ("t-{000..002}.tar", ["t-000.tar", "t-001.tar", "t-002.tar"]),
        ("t-{8..10}.tar", ["t-8.tar", "t-9.tar", "t-10.tar"]),
        ("t-{0..2}.tar", ["t-0.tar", "t-1.tar", "t-2.tar"]),
        ("t-{08..10}.tar", ["t-08.tar", "t-09.tar", "t-10.tar"]),
        ("t-{7..007}.tar", ["t-007.tar"]),
        ("{a,b,c}.tar", ["a.tar", "b.tar", "c.tar"]),
        ("train{,-extra}.tar", ["train.tar", "train-extra.tar"]),
        (
            "s3://b/{x,y}/s-{00..01}.tar",
            ["s3://b/x/s-00.tar", "s3://b/x/s-01.tar", "s3://b/y/s-00.tar", "s3://b/y/s-01.tar"],
        ),
    ],
)
def test_expand_pattern(pattern: str, expected: list[str]) -> None:
    assert expand_pattern(pattern) == expected
    assert expand_pattern(pattern) == list(braceexpand(pattern))  # the expander WebDataset uses


def test_expand_pattern_keeps_the_width_of_a_full_dataset() -> None:
    names = expand_pattern("/data/shards/train-{000000..000127}.tar")
    assert len(names) == 128
    assert names[0] == "/data/shards/train-000000.tar"
    assert names[-1] == "/data/shards/train-000127.tar"


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        ("", "empty"),
        ("t-{0..3.tar", "unbalanced"),
        ("t-0..3}.tar", "unbalanced"),
        ("t-{0..3}}.tar", "unbalanced"),
        ("t-{{0..3}.tar", "nested"),
        ("t-{a,{b,c}}.tar", "nested"),
        ("t-{}.tar", "neither"),
        ("t-{x}.tar", "neither"),
        ("t-{a..c}.tar", "neither"),
        ("t-{-1..3}.tar", "neither"),
        ("t-{0..9..2}.tar", "neither"),
        ("t-{3..1}.tar", "reversed"),
        ("t-{0..100000}.tar", "more than 100000"),
        ("t-{0..999}-{0..999}.tar", "more than 100000"),
        ("t-{a,b,a}.tar", "twice"),
    ],
)
def test_malformed_patterns_are_refused_by_name(pattern: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        expand_pattern(pattern)
    assert repr(pattern) in str(info.value) or not pattern


def test_the_expansion_limit_is_a_parameter() -> None:
    assert len(expand_pattern("{0..9}{0..9}", max_names=100)) == 100
    with pytest.raises(ValueError, match="more than 99"):
        expand_pattern("{0..9}{0..9}", max_names=99)


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b/c.seg.jpg", ("a/b/c", "seg.jpg")),
        ("c.JPG", ("c", "JPG")),
        ("./a.jpg", ("./a", "jpg")),
        ("a.b/c.cls", ("a.b/c", "cls")),
        ("README", None),
        (".hidden", None),
        ("a/.x.jpg", None),
        ("a.", None),
    ],
)
def test_split_name_follows_webdataset(name: str, parts: tuple[str, str] | None) -> None:
    assert split_name(name) == parts


# -- building shards ------------------------------------------------------------------------------------


def add_member(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = data.decode()
        archive.addfile(info)
    elif kind == tarfile.DIRTYPE:
        archive.addfile(info)
    else:
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def photo_shard(path: Path, *, extension: str = "jpg", extra: bool = True) -> list[tuple[str, bytes, int]]:
    """A shard of the demo photos, each with a label (and a .json neighbour); returns (key, bytes, label)."""
    expected = []
    with tarfile.open(path, mode="w") as archive:
        for i, photo in enumerate(PHOTOS):
            key = f"{photo.parent.name}/{i:06d}"
            data = photo.read_bytes()
            add_member(archive, f"{key}.{extension}", data)
            add_member(archive, f"{key}.cls", f"{i % 3}\n".encode())
            if extra:
                add_member(archive, f"{key}.json", b'{"source": "demo"}')
            expected.append((key, data, i % 3))
    return expected


def read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(size)


def index_file(path: Path, **kwargs: int) -> ShardIndex:
    with open(path, "rb") as stream:
        return index_shard(stream, str(path), **kwargs)


class ForwardOnly:
    """A stream with ``read`` and nothing else, as a network body is."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw = raw
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        return self._raw.read(size)


# -- indexing -------------------------------------------------------------------------------------------


def test_index_reads_back_the_exact_member_bytes(tmp_path: Path) -> None:
    shard = tmp_path / "train-000000.tar"
    expected = photo_shard(shard, extension="seg.JPG")
    index = index_file(shard)
    assert len(index) == len(expected)
    assert index.problems == () and index.problem_count == 0
    for i, (key, data, label) in enumerate(expected):
        assert index.key(i) == key
        assert index.member_name(i) == f"{key}.seg.JPG"
        assert index.labels[i] == label
        locator = index.locator(i)
        assert locator.target == str(shard) and locator.length == len(data)
        assert read_range(shard, locator.start, locator.length) == data


def test_index_is_flat_read_only_numpy(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    photo_shard(shard)
    index = index_file(shard)
    dtypes = {name: getattr(index, name).dtype for name in ("shard_ids", "names", "name_offsets", "key_lengths")}
    assert dtypes == {"shard_ids": np.int32, "names": np.uint8, "name_offsets": np.int64, "key_lengths": np.int32}
    for name in ("data_offsets", "sizes", "labels"):
        assert getattr(index, name).dtype == np.int64
        with pytest.raises(ValueError, match="read-only"):
            getattr(index, name)[0] = 1


def test_forward_only_stream_gives_the_same_index(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    photo_shard(shard)
    seekable = index_file(shard)
    with open(shard, "rb") as file:
        stream = ForwardOnly(file)
        forward = index_shard(stream, str(shard))  # type: ignore[arg-type]
        assert not file.closed  # the caller owns its stream
    assert stream.reads > 0
    for name in ("names", "name_offsets", "key_lengths", "data_offsets", "sizes", "labels"):
        assert np.array_equal(getattr(forward, name), getattr(seekable, name)), name


def test_same_samples_as_webdataset(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    photo_shard(shard, extension="seg.JPG")
    index = index_file(shard)
    with open(shard, "rb") as stream:
        theirs = list(group_by_keys(tar_file_expander([{"url": str(shard), "stream": stream}])))
    assert len(theirs) == len(index)
    for i, sample in enumerate(theirs):
        assert sample["__key__"] == index.key(i)
        assert int(sample["cls"]) == index.labels[i]
        locator = index.locator(i)
        assert sample["seg.jpg"] == read_range(shard, locator.start, locator.length)


def test_concatenated_indexes_point_into_their_own_shards(tmp_path: Path) -> None:
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    photo_shard(first)
    expected = photo_shard(second, extension="png", extra=False)
    both = concatenate([index_file(first), index_file(second)])
    n = len(PHOTOS)
    assert both.shards == (str(first), str(second))
    assert both.shard_ids.tolist() == [0] * n + [1] * n
    for i, (key, data, label) in enumerate(expected):
        locator = both.locator(n + i)
        assert locator.target == str(second)
        assert read_range(second, locator.start, locator.length) == data
        assert both.key(n + i) == key and both.member_name(n + i) == f"{key}.png"
        assert both.labels[n + i] == label
    assert len(concatenate([])) == 0


def test_an_index_survives_pickling(tmp_path: Path) -> None:
    """A process pool indexing shards in parallel sends indexes back pickled."""
    shard = tmp_path / "s.tar"
    photo_shard(shard)
    index = index_file(shard)
    copy = pickle.loads(pickle.dumps(index))
    assert copy.shards == index.shards and len(copy) == len(index)
    assert [copy.locator(i) for i in range(len(copy))] == [index.locator(i) for i in range(len(index))]


# -- problems -------------------------------------------------------------------------------------------

SECRET = b"not part of any shard"


@contextmanager
def no_file_opened(forbidden: list[Path]) -> Iterator[None]:
    """Fails the test if anything opens one of ``forbidden`` (the audit hook sees every open, however made)."""
    opened: list[str] = []
    watched = {os.path.realpath(path) for path in forbidden}

    def hook(event: str, args: tuple[object, ...]) -> None:
        path = args[0] if watching and event == "open" else None
        if isinstance(path, str | bytes) and os.path.realpath(os.fsdecode(path)) in watched:
            opened.append(os.fsdecode(path))

    # Audit hooks cannot be removed: this one goes quiet when the block ends.
    watching = True
    sys.addaudithook(hook)
    try:
        yield
    finally:
        watching = False
    assert not opened, f"opened {opened}"


def test_problems_are_reported_and_left_out(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    shard = tmp_path / "shards" / "s.tar"
    evil = tmp_path / "evil.jpg"  # where "../evil.jpg" would land if a name were joined to the shard's folder
    evil.write_bytes(SECRET)
    image = PHOTOS[0].read_bytes()
    with tarfile.open(shard, mode="w") as archive:
        add_member(archive, "good.jpg", image)
        add_member(archive, "good.cls", b"7")
        add_member(archive, "folder", kind=tarfile.DIRTYPE)
        add_member(archive, "nolabel.jpg", image)
        add_member(archive, "noimage.cls", b"1")
        add_member(archive, "twice.jpg", image)
        add_member(archive, "twice.png", image)
        add_member(archive, "twice.cls", b"1")
        add_member(archive, "word.jpg", image)
        add_member(archive, "word.cls", b"seven")
        add_member(archive, "negative.jpg", image)
        add_member(archive, "negative.cls", b"-1")
        add_member(archive, "huge.jpg", image)
        add_member(archive, "huge.cls", b"1" * 100)
        add_member(archive, "link.jpg", str(evil).encode(), kind=tarfile.SYMTYPE)
        add_member(archive, "link.cls", b"1")
        add_member(archive, "../evil.jpg", image)
        add_member(archive, "../evil.cls", b"1")
        add_member(archive, "/abs.jpg", image)
        add_member(archive, "/abs.cls", b"1")
        add_member(archive, "README", b"hello")
        add_member(archive, "split.jpg", image)
        add_member(archive, "other.jpg", image)
        add_member(archive, "other.cls", b"2")
        add_member(archive, "split.cls", b"3")
        add_member(archive, "last.webp", image)
        add_member(archive, "last.CLS", b" 4 \n")
    with no_file_opened([evil, Path("/abs.jpg")]):
        index = index_file(shard)
    assert [index.key(i) for i in range(len(index))] == ["good", "other", "last"]
    assert index.labels.tolist() == [7, 2, 4]
    for i in range(len(index)):
        locator = index.locator(i)
        assert read_range(shard, locator.start, locator.length) == image != SECRET
    found = {(problem.kind, problem.member) for problem in index.problems}
    assert found == {
        (ProblemKind.MISSING_LABEL, "nolabel.jpg"),
        (ProblemKind.MISSING_IMAGE, "noimage"),
        (ProblemKind.TWO_IMAGES, "twice"),
        (ProblemKind.BAD_LABEL, "word"),
        (ProblemKind.BAD_LABEL, "negative"),
        (ProblemKind.BAD_LABEL, "huge"),
        (ProblemKind.NOT_A_FILE, "link.jpg"),
        (ProblemKind.MISSING_IMAGE, "link"),
        (ProblemKind.UNSAFE_NAME, "../evil.jpg"),
        (ProblemKind.UNSAFE_NAME, "../evil.cls"),
        (ProblemKind.UNSAFE_NAME, "/abs.jpg"),
        (ProblemKind.UNSAFE_NAME, "/abs.cls"),
        (ProblemKind.NO_EXTENSION, "README"),
        (ProblemKind.MISSING_LABEL, "split.jpg"),
        (ProblemKind.SPLIT_KEY, "split"),
    }
    assert index.problem_count == len(index.problems)
    assert all(str(problem).startswith(f"{shard}: ") for problem in index.problems)


def test_problems_kept_are_bounded_but_all_counted(tmp_path: Path) -> None:
    shard = tmp_path / "unlabelled.tar"
    with tarfile.open(shard, mode="w") as archive:
        for i in range(10):
            add_member(archive, f"{i}.jpg", b"x")
    index = index_file(shard, max_problems=3)
    assert len(index) == 0
    assert len(index.problems) == 3 and index.problem_count == 10


# -- broken shards --------------------------------------------------------------------------------------


def whole_shard(tmp_path: Path) -> bytes:
    shard = tmp_path / "whole.tar"
    photo_shard(shard, extra=False)
    return shard.read_bytes()


def end_of_members(raw: bytes) -> int:
    """Where the end-of-archive blocks start: after the last member's data, rounded to a block."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as archive:
        last = archive.getmembers()[-1]
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda raw: len(raw) // 2, id="inside-a-member"),
        pytest.param(lambda raw: end_of_members(raw) - 3, id="inside-the-padding"),
        pytest.param(lambda raw: end_of_members(raw), id="no-end-marker"),
        pytest.param(lambda raw: end_of_members(raw) + 100, id="inside-the-end-marker"),
        pytest.param(lambda raw: 300, id="inside-the-first-header"),
        pytest.param(lambda raw: 0, id="empty"),
    ],
)
def test_a_truncated_shard_is_a_clear_error(tmp_path: Path, cut: Callable[[bytes], int]) -> None:
    raw = whole_shard(tmp_path)
    cut_raw = raw[: cut(raw)]
    with pytest.raises(ValueError, match="shard s3://b/cut.tar: not a whole uncompressed tar"):
        index_shard(io.BytesIO(cut_raw), "s3://b/cut.tar")


def test_the_padding_after_the_end_marker_is_not_needed(tmp_path: Path) -> None:
    raw = whole_shard(tmp_path)
    index = index_shard(io.BytesIO(raw[: end_of_members(raw) + 2 * tarfile.BLOCKSIZE]), "s.tar")
    assert len(index) == len(PHOTOS)


def test_a_compressed_shard_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shard s\.tar\.gz: not a whole uncompressed tar"):
        index_shard(io.BytesIO(gzip.compress(whole_shard(tmp_path))), "s.tar.gz")


def test_stream_errors_pass_through() -> None:
    class Failing(io.RawIOBase):
        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        index_shard(Failing(), "s3://b/s.tar")  # type: ignore[arg-type]
