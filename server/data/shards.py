"""Tar shards in the WebDataset layout: expand a shard pattern, and index one shard in a single
sequential pass so that workers can later read any sample's image as a byte range of its shard.

A sample is a run of adjacent members sharing a key: ``<key>.jpg`` (or jpeg, png, webp) and
``<key>.cls`` (the label, an integer in ASCII). The index keeps offsets, never paths: a member name
is only a label inside its shard and is never joined with a filesystem path, so a hostile name such
as ``../x.jpg`` cannot make the server open a file outside the shard.
"""

from __future__ import annotations

import enum
import itertools
import logging
import re
import tarfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from stoker.server.data.locators import Locator
from stoker.server.data.targets import (
    MAX_INLINE_BYTES,
    ColumnBuilder,
    TargetColumn,
    TargetDecl,
    concatenate_columns,
    shard_extension,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PROBLEMS_KEPT",
    "MAX_SHARDS",
    "ProblemKind",
    "ShardIndex",
    "ShardProblem",
    "concatenate",
    "expand_pattern",
    "index_shard",
    "split_name",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
LABEL_EXTENSION = "cls"
MAX_SHARDS = 100_000
"""The most names one pattern may expand to: a typo such as ``{0..99999999}`` is refused, not listed."""
MAX_PROBLEMS_KEPT = 100
"""Problems kept per shard (all are counted): an unlabelled dataset must not become a million objects."""
_MAX_LABEL_BYTES = 64
_NAME_ENCODING = ("utf-8", "surrogateescape")  # what tarfile decodes with, so any name round-trips


# -- patterns -------------------------------------------------------------------------------------------

_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_pattern(pattern: str, max_names: int = MAX_SHARDS) -> list[str]:
    """Brace-expand a shard pattern as WebDataset does: ``{000..127}`` (zero padding kept: when a bound
    other than ``0`` starts with ``0``, every name is as wide as the wider bound), ``{a,b,c}``, several
    braces (their product, leftmost varying slowest). Raises ``ValueError`` naming the pattern for
    unbalanced or nested braces, a brace that is neither a list nor a numeric range, a reversed range,
    more than ``max_names`` names, or a name listed twice."""
    if not pattern:
        raise ValueError("empty shard pattern")
    parts: list[Sequence[str]] = []
    count = 1
    pos = 0
    while (start := pattern.find("{", pos)) >= 0:
        end = pattern.find("}", pos)
        if end < start:
            raise ValueError(f"shard pattern {pattern!r}: unbalanced braces")
        inner = pattern[start + 1 : end]
        if "{" in inner:
            raise ValueError(f"shard pattern {pattern!r}: nested braces are not supported")
        choices = _alternatives(pattern, inner, max_names)
        count *= len(choices)
        if count > max_names:
            raise ValueError(f"shard pattern {pattern!r} expands to more than {max_names} names")
        parts += [(pattern[pos:start],), choices]
        pos = end + 1
    if "}" in pattern[pos:]:
        raise ValueError(f"shard pattern {pattern!r}: unbalanced braces")
    parts.append((pattern[pos:],))
    names = ["".join(p) for p in itertools.product(*parts)]
    if len(set(names)) != len(names):
        raise ValueError(f"shard pattern {pattern!r} names a shard twice")
    return names


def _alternatives(pattern: str, inner: str, max_names: int) -> Sequence[str]:
    """The choices of one brace: a comma list (empty items allowed: ``x{,-b}``) or a numeric range."""
    if "," in inner:
        return inner.split(",")
    match = _RANGE.fullmatch(inner)
    if match is None:
        raise ValueError(f"shard pattern {pattern!r}: {{{inner}}} is neither a comma list nor a range N..M")
    low, high = match.groups()
    first, last = int(low), int(high)
    if first > last:
        raise ValueError(f"shard pattern {pattern!r}: range {{{inner}}} is reversed")
    if last - first + 1 > max_names:
        raise ValueError(f"shard pattern {pattern!r} expands to more than {max_names} names")
    padded = any(bound.startswith("0") and bound != "0" for bound in (low, high))
    width = max(len(low), len(high)) if padded else 0
    return [str(n).zfill(width) for n in range(first, last + 1)]


# -- the index ------------------------------------------------------------------------------------------


class ProblemKind(enum.StrEnum):
    """Why a member or a key was left out of the index."""

    MISSING_LABEL = "missing_label"
    """An image with no ``.cls`` member."""
    BAD_LABEL = "bad_label"
    """A ``.cls`` that is not a non-negative ASCII integer (or is larger than a label can be)."""
    TWO_LABELS = "two_labels"
    """A key with more than one ``.cls`` member."""
    MISSING_IMAGE = "missing_image"
    """A key with no image member (a label alone, or only other extensions)."""
    TWO_IMAGES = "two_images"
    """A key with more than one image member: which one is the sample is ambiguous."""
    SPLIT_KEY = "split_key"
    """A key whose members are not adjacent: it appeared earlier in the shard."""
    NOT_A_FILE = "not_a_file"
    """A link, device, FIFO or sparse member: it has no plain byte range to read (directories are
    skipped silently: tar tools write them for every folder)."""
    UNSAFE_NAME = "unsafe_name"
    """An absolute name or one with a ``..`` component: left out, even though names are never paths."""
    NO_EXTENSION = "no_extension"
    """A member name without the ``key.extension`` form."""


@dataclass(frozen=True, slots=True)
class ShardProblem:
    """One thing left out of a shard's index, with the member (or key) it is about."""

    shard: str
    member: str
    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.member}: {self.detail}"


@dataclass(frozen=True, eq=False, slots=True)
class ShardIndex:
    """The samples of one or more shards as flat numpy arrays (no per-sample Python objects), so that
    ``concatenate`` of 128 shard indexes is a handful of ``np.concatenate`` calls.

    Sample ``i`` is the image member ``names[name_offsets[i]:name_offsets[i + 1]]`` (UTF-8 bytes) of shard
    ``shards[shard_ids[i]]``; its key is the first ``key_lengths[i]`` bytes of that name; its bytes are
    ``sizes[i]`` bytes at ``data_offsets[i]`` of the shard file. ``problems`` keeps at most the first few
    problems of each shard; ``problem_count`` counts them all."""

    shards: tuple[str, ...]
    shard_ids: np.ndarray  # int32 [n]
    names: np.ndarray  # uint8 [total name bytes]
    name_offsets: np.ndarray  # int64 [n + 1]
    key_lengths: np.ndarray  # int32 [n]
    data_offsets: np.ndarray  # int64 [n]
    sizes: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    problems: tuple[ShardProblem, ...] = field(default=())
    problem_count: int = 0
    targets: dict[str, TargetColumn] = field(default_factory=dict)
    """Declared fields' raw members per sample (a mask: its byte range); ``labels`` is -1 where a
    sample has no ``.cls`` (allowed when labels are optional)."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("shard_ids", "key_lengths", "data_offsets", "sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ShardIndex.{name} has {len(getattr(self, name))} rows, labels has {n}")
        if len(self.name_offsets) != n + 1 or self.name_offsets[-1] != len(self.names):
            raise ValueError(f"ShardIndex.name_offsets does not span names ({len(self.names)} bytes, {n} rows)")
        # Shared read-only with the engine thread; a stray write would corrupt every later epoch.
        for name in ("shard_ids", "names", "name_offsets", "key_lengths", "data_offsets", "sizes", "labels"):
            getattr(self, name).setflags(write=False)

    def __len__(self) -> int:
        return len(self.labels)

    def member_name(self, index: int) -> str:
        """The image member's name inside its shard (a label for logs, never a filesystem path)."""
        raw = self.names[self.name_offsets[index] : self.name_offsets[index + 1]].tobytes()
        return raw.decode(*_NAME_ENCODING)

    def key(self, index: int) -> str:
        """The sample's key: its image member's name up to the first dot of the basename."""
        start = int(self.name_offsets[index])
        return self.names[start : start + int(self.key_lengths[index])].tobytes().decode(*_NAME_ENCODING)

    def locator(self, index: int) -> Locator:
        """Where the sample's image bytes are: its shard and their byte range."""
        return Locator(self.shards[int(self.shard_ids[index])], int(self.data_offsets[index]), int(self.sizes[index]))


def concatenate(indexes: Sequence[ShardIndex]) -> ShardIndex:
    """One index over several, in order, with shard ids and name offsets shifted; each array is copied once."""
    shard_base = np.cumsum([0] + [len(index.shards) for index in indexes], dtype=np.int32)
    name_base = np.cumsum([0] + [len(index.names) for index in indexes], dtype=np.int64)
    name_starts = [index.name_offsets[:-1] + base for index, base in zip(indexes, name_base, strict=False)]

    def joined(name: str, dtype: type, shifts: Sequence[int] | None = None) -> np.ndarray:
        parts = [getattr(index, name) for index in indexes]
        if shifts is not None:
            parts = [part + shift for part, shift in zip(parts, shifts, strict=False)]
        return np.concatenate([np.zeros(0, dtype), *parts]).astype(dtype, copy=False)

    return ShardIndex(
        shards=tuple(shard for index in indexes for shard in index.shards),
        shard_ids=joined("shard_ids", np.int32, shard_base),
        names=joined("names", np.uint8),
        name_offsets=np.concatenate([*name_starts, name_base[-1:]]),
        key_lengths=joined("key_lengths", np.int32),
        data_offsets=joined("data_offsets", np.int64),
        sizes=joined("sizes", np.int64),
        labels=joined("labels", np.int64),
        problems=tuple(problem for index in indexes for problem in index.problems),
        problem_count=sum(index.problem_count for index in indexes),
        targets={
            name: concatenate_columns([index.targets[name] for index in indexes])
            for name in (indexes[0].targets if indexes else {})
        },
    )


def split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: the key is the name up to the first dot of its basename, the extension is the
    rest (``a/b/c.seg.jpg`` is key ``a/b/c``, extension ``seg.jpg``). Only the LAST part of the extension
    decides a member's role (``c.seg.jpg`` is an image, ``c.x.cls`` a label), matched case-insensitively.
    ``None`` when the basename has no dot, starts with one, or ends with one."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot <= base or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :]


# -- indexing -------------------------------------------------------------------------------------------


class _DamagedHeader(tarfile.TarError):
    """A header that is neither a member nor the end-of-archive block (tarfile alone reads both as the end)."""


class _Header(tarfile.TarInfo):
    """tarfile stops quietly at a cut or damaged header as if the archive had ended; this TarInfo lets only
    the real end (a zero block) end it, so a truncated shard is an error, not a shorter dataset."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:
            raise _DamagedHeader(f"bad or cut tar header at byte {tarfile_.offset}: {exc}") from exc


def index_shard(
    stream: BinaryIO,
    shard_name: str,
    max_problems: int = MAX_PROBLEMS_KEPT,
    targets: tuple[TargetDecl, ...] | None = None,
    box_format: str = "xyxy",
) -> ShardIndex:
    """Index one uncompressed tar shard, reading ``stream`` once, front to back (no seeks: a network
    stream works). Samples come in member order; what is left out is in ``problems``. The caller keeps
    ownership of ``stream``. Raises ``ValueError`` naming the shard when it is not a whole tar (cut short,
    damaged header, compressed); I/O errors of the stream pass through unchanged.

    ``targets`` (``None``: labels required, as for a classification set): the declared fields, read
    from their members (a mask: its byte range); a key without ``.cls`` then gets label -1."""
    builder = _Builder(shard_name, max_problems, targets, box_format)
    try:
        # Stream mode ("r|") reads sequentially. Its default 10 KiB buffer stays: tarfile copies the
        # buffer's rest on every 512-byte header read, so a 1 MiB buffer made indexing twice as slow.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_Header, encoding="utf-8") as archive:
            while (member := archive.next()) is not None:
                # tarfile keeps every member it has read; nothing here needs them again.
                archive.members.clear()
                builder.add(member, archive)
    except tarfile.TarError as exc:
        raise ValueError(f"shard {shard_name}: not a whole uncompressed tar ({exc})") from exc
    index = builder.finish()
    log.debug("indexed %s: %d samples, %d problems", shard_name, len(index), index.problem_count)
    return index


class _Builder:
    """Groups adjacent members by key and appends each complete sample to flat arrays."""

    def __init__(
        self, shard: str, max_problems: int, targets: tuple[TargetDecl, ...] | None = None, box_format: str = "xyxy"
    ) -> None:
        self.decls = targets or ()
        self.labels_required = targets is None
        self.columns = {
            decl.name: ColumnBuilder(decl.kind, ranged=decl.kind == "mask", box_format=box_format)
            for decl in self.decls
        }
        self.members: dict[str, tuple[bytes | None, int, int]] = {}  # this key's target members
        self.shard = shard
        self.max_problems = max_problems
        self.problems: list[ShardProblem] = []
        self.problem_count = 0
        self.seen: set[str] = set()  # this shard's keys, to catch a key split into two runs
        self.names = bytearray()
        self.name_offsets = array("q", [0])
        self.key_lengths = array("i")
        self.data_offsets = array("q")
        self.sizes = array("q")
        self.labels = array("q")
        # The current key's run: its image members (name, offset, size) and raw labels (None: too big).
        self.key: str | None = None
        self.images: list[tuple[str, int, int]] = []
        self.label_data: list[bytes | None] = []
        self.others: list[str] = []

    def report(self, member: str, kind: ProblemKind, detail: str) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(ShardProblem(self.shard, member, kind, detail))

    def add(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        name = member.name
        if member.isdir():
            return
        if name.startswith("/") or ".." in name.split("/"):
            self.report(name, ProblemKind.UNSAFE_NAME, "absolute name or '..' component: left out")
            return
        if not member.isreg() or member.issparse():
            self.report(name, ProblemKind.NOT_A_FILE, "not a regular file (link, device or sparse): left out")
            return
        parts = split_name(name)
        if parts is None:
            self.report(name, ProblemKind.NO_EXTENSION, "name is not key.extension: left out")
            return
        key, extension = parts
        if key != self.key:
            self.close_run()
            self.key = key
        role = extension.rpartition(".")[2].lower()
        decl = shard_extension(self.decls, extension.lower()) if self.decls else None
        if decl is not None:
            if decl.name in self.members:
                self.report(name, ProblemKind.TWO_IMAGES, f"a second .{extension} member of this key: left out")
            elif decl.kind == "mask":
                self.members[decl.name] = (None, member.offset_data, member.size)
            else:
                reader = archive.extractfile(member) if member.size <= MAX_INLINE_BYTES else None
                # Too large to keep inline: kept as missing, so the sample is bad when it is read.
                self.members[decl.name] = (reader.read() if reader is not None else None, -1, -1)
        elif role in IMAGE_EXTENSIONS:
            self.images.append((name, member.offset_data, member.size))
        elif role == LABEL_EXTENSION:
            reader = archive.extractfile(member) if member.size <= _MAX_LABEL_BYTES else None
            self.label_data.append(reader.read() if reader is not None else None)
        else:
            self.others.append(name)

    def close_run(self) -> None:
        """Turn the finished run of one key into a sample or a problem."""
        key, images, label_data, others = self.key, self.images, self.label_data, self.others
        members, self.members = self.members, {}
        self.key, self.images, self.label_data, self.others = None, [], [], []
        if key is None:
            return
        if key in self.seen:
            self.report(key, ProblemKind.SPLIT_KEY, "members of this key are not adjacent: the later run is left out")
            return
        self.seen.add(key)
        if not images:
            found = ", ".join(others) or f"{key}.{LABEL_EXTENSION}"
            self.report(key, ProblemKind.MISSING_IMAGE, f"no image member (found {found})")
        elif len(images) > 1:
            found = ", ".join(name for name, _, _ in images)
            self.report(key, ProblemKind.TWO_IMAGES, f"several image members: {found}")
        elif not label_data and not self.labels_required:
            self.append(key, images[0], -1, members)
        elif not label_data:
            self.report(images[0][0], ProblemKind.MISSING_LABEL, f"no {key}.{LABEL_EXTENSION} member")
        elif len(label_data) > 1:
            self.report(key, ProblemKind.TWO_LABELS, f"{len(label_data)} .{LABEL_EXTENSION} members")
        elif label_data[0] is None:
            self.report(key, ProblemKind.BAD_LABEL, f"label member larger than {_MAX_LABEL_BYTES} bytes")
        elif (label := _parse_label(label_data[0])) is None:
            self.report(key, ProblemKind.BAD_LABEL, f"label {label_data[0]!r} is not an integer >= 0")
        else:
            self.append(key, images[0], label, members)

    def append(
        self, key: str, image: tuple[str, int, int], label: int, members: dict[str, tuple[bytes | None, int, int]]
    ) -> None:
        name, offset, size = image
        encoded = name.encode(*_NAME_ENCODING)
        self.names += encoded
        self.name_offsets.append(len(self.names))
        self.key_lengths.append(len(key.encode(*_NAME_ENCODING)))
        self.data_offsets.append(offset)
        self.sizes.append(size)
        self.labels.append(label)
        for field_name, column in self.columns.items():
            value, start, length = members.get(field_name, (None, -1, -1))
            column.add(value, start, length)

    def finish(self) -> ShardIndex:
        self.close_run()
        n = len(self.labels)
        return ShardIndex(
            shards=(self.shard,),
            shard_ids=np.zeros(n, np.int32),
            names=np.frombuffer(bytes(self.names), np.uint8),
            name_offsets=np.frombuffer(self.name_offsets, np.int64).copy(),
            key_lengths=np.frombuffer(self.key_lengths, np.int32).copy(),
            data_offsets=np.frombuffer(self.data_offsets, np.int64).copy(),
            sizes=np.frombuffer(self.sizes, np.int64).copy(),
            labels=np.frombuffer(self.labels, np.int64).copy(),
            problems=tuple(self.problems),
            problem_count=self.problem_count,
            targets={name: column.build() for name, column in self.columns.items()},
        )


def _parse_label(raw: bytes) -> int | None:
    """A label is ASCII digits with optional surrounding whitespace; at most 18 digits (fits int64)."""
    digits = raw.strip()
    if not digits.isdigit() or len(digits) > 18:
        return None
    return int(digits)
