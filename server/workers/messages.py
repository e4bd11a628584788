"""What the pool and a worker say to each other over the worker's pipe: small frozen dataclasses,
each tagged with a :class:`Message` kind, so both ends read fields by name and a stray object is
recognised as one.

Parent -> worker: :class:`TaskMessage`, :class:`Forget`, :class:`Stop`.
Worker -> parent: :class:`Ready`, :class:`StartFailed`, :class:`TaskResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from stoker.server.cache.arena import ArenaHandle
from stoker.server.cache.entries import CacheEntry, CachePart, SampleHeader
from stoker.server.data.locators import Locator
from stoker.server.data.store_config import StoreConfig
from stoker.server.imaging.limits import DecodeLimits
from stoker.server.imaging.pipelines import Pipeline
from stoker.server.imaging.targets import RawTarget

__all__ = [
    "WorkerSetup",
    "SampleSpec",
    "Message",
    "Outcome",
    "TaskMessage",
    "Forget",
    "Stop",
    "Ready",
    "StartFailed",
    "SampleResult",
    "TaskResult",
]


class Message(IntEnum):
    """The kind of a pipe message."""

    TASK = 1
    """Parent -> worker: render some rows of a batch into its slot."""
    FORGET = 2
    """Parent -> worker: unmap a slot the engine destroyed."""
    STOP = 3
    """Parent -> worker: finish and exit."""
    READY = 4
    """Worker -> parent: initialised, serving."""
    START_FAILED = 5
    """Worker -> parent: initialisation raised; the worker exits."""
    RESULT = 6
    """Worker -> parent: the outcome of every sample of the oldest task."""


class Outcome(IntEnum):
    """What became of one sample."""

    OK = 0
    """Written into its row."""
    BAD = 1
    """The file cannot be used (unreadable, corrupt, too large): the sample is replaced or raised."""
    FAILED = 2
    """Something other than the file went wrong (a bug, an exhausted resource): the batch fails."""
    PIPELINE = 3
    """A post-op (torchvision transform or plugin) failed or returned a wrong image: the batch fails
    with a pipeline error naming the op."""
    UNAVAILABLE = 4
    """The sample's object store could not be reached (after retries): the batch fails, retryable;
    the sample is not marked bad."""


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is started with (the same for every worker of a pool): what it refuses to decode,
    how many object reads it keeps in flight, how it talks to object storage, and the decoded-sample
    arena (``None``: the server runs without one)."""

    limits: DecodeLimits
    reads_in_flight: int
    store: StoreConfig
    arena: ArenaHandle | None = None


@dataclass(frozen=True, slots=True)
class SampleSpec:
    """One sample of a task: its row, where its bytes are, its RNG key, and, on a cached dataset, its
    part in the decoded-sample cache (entries to read instead of decoding, whether to store)."""

    row: int
    locator: Locator
    key: int
    cache: CachePart | None = None
    targets: tuple[RawTarget, ...] = ()
    """The job's requested targets of this sample, raw (parsed and checked by the worker)."""


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """One unit of work: some rows of one batch."""

    kind: ClassVar[Message] = Message.TASK
    task_id: int
    slot: str
    rows: int
    """Rows of the batch in the slot (the slot may be larger)."""
    size: int
    """The job's image size (views without a size of their own use it)."""
    pipeline: Pipeline
    samples: tuple[SampleSpec, ...]
    decode_min_side: int = 0
    """The dataset's ``cache_min_side``: > 0 decodes every image at the reduction that keeps its shorter
    side at least this, whatever the crop; 0 reduces as far as the crop allows (the same rule on every
    server, cached or not)."""
    layout: str = "nhwc"
    """The job's layout of the rows: ``nhwc`` or ``nchw``."""
    mask_side: int = 0
    """> 0: the job carries a mask; its ``rows x side x side`` block follows the views in the slot."""
    min_box_visibility: float = 0.0
    """The dataset's ``min_box_visibility``."""


@dataclass(frozen=True, slots=True)
class Forget:
    """Unmap slot ``name``."""

    kind: ClassVar[Message] = Message.FORGET
    name: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Exit once the current task is done."""

    kind: ClassVar[Message] = Message.STOP


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker is up."""

    kind: ClassVar[Message] = Message.READY
    pid: int


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The worker could not initialise."""

    kind: ClassVar[Message] = Message.START_FAILED
    reason: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class SampleResult:
    """The outcome of one row; ``reason`` and ``traceback`` explain anything but ``OK``."""

    row: int
    outcome: Outcome
    reason: str = ""
    traceback: str = ""
    op: str = ""
    """For ``PIPELINE``: the op that failed."""
    decoded: bool = True
    """Whether the sample was decoded from its bytes (``False``: read from the decoded-sample cache)."""
    stored: CacheEntry | None = None
    """Where the worker wrote the decoded sample in the arena (only once the whole write is done)."""
    header: SampleHeader | None = None
    """The image's header, with ``stored``."""
    targets: dict | None = None
    """For ``OK`` with requested targets: the small ones' values (boxes as little-endian bytes)."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A finished task: one result per sample, and the seconds spent per stage."""

    kind: ClassVar[Message] = Message.RESULT
    task_id: int
    samples: tuple[SampleResult, ...]
    stages: tuple[tuple[str, float, int], ...]
    """``(stage, seconds, count)``: time spent per stage, summed over the task's samples."""
