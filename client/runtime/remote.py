"""``RemoteBatches``: the torch ``IterableDataset`` a training loop iterates to get batches from stoker."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.keys import load_key_pair, load_public_key
from stoker.client.protocol.plan import Span, batches_per_rank, remaining_span, span_length
from stoker.client.runtime.buffers import PinnedPool
from stoker.client.runtime.endpoints import parse_endpoints
from stoker.client.runtime.links import ClientKeys
from stoker.client.runtime.session import JobInfo, RawBatch, Session
from stoker.client.runtime.stream import BatchStream
from stoker.client.runtime.tensors import Converter

__all__ = ["RemoteBatches", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STATE_VERSION = 1
_SPAN_STATE_VERSION = 2  # a state inside a resumed epoch: older clients must refuse it, not misread it


class _Resize(NamedTuple):
    """A position saved by ``world_size`` ranks, to re-plan over this client's ranks once the
    dataset's size is known (the first time the client talks to a server)."""

    epoch: int
    span: Span | None
    world_size: int
    position: int


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        default_rank, default_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        default_rank = int(os.environ.get("RANK", "0"))
        default_world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return rank, world_size


KeySource = str | os.PathLike[str] | None


def _client_keys(server_key: KeySource, client_key: KeySource) -> ClientKeys | None:
    """CURVE keys from the arguments, else ``STOKER_SERVER_KEY`` / ``STOKER_CLIENT_KEY_FILE``; ``None``
    when neither names any (a loader on loopback, or one that allows unauthenticated clients)."""
    server = server_key if server_key is not None else os.environ.get("STOKER_SERVER_KEY") or None
    client = client_key if client_key is not None else os.environ.get("STOKER_CLIENT_KEY_FILE") or None
    if server is None and client is None:
        return None
    if server is None or client is None:
        missing = "server_key (STOKER_SERVER_KEY)" if server is None else "client_key (STOKER_CLIENT_KEY_FILE)"
        raise ValueError(f"CURVE needs both the server's public key and this client's key pair: {missing} is missing")
    public, secret = load_key_pair(client)
    return ClientKeys(load_public_key(server), public, secret)


class RemoteBatches(IterableDataset):
    """Batches of a dataset declared on stoker servers, delivered on ``device`` in order.

    Each iteration yields one epoch (the rest of it after :meth:`load_state_dict`) as
    ``(images, labels)`` or ``(images, labels, indices)``; the next iteration continues with the
    following epoch. An epoch is over once its last batch is yielded, whether or not the iterator
    is then run to its end (loops that take exactly ``len()`` batches never do). Images are NCHW,
    contiguous like a DataLoader's (``memory_format=torch.channels_last`` for channels-last models),
    ``float32`` normalised with ``mean``/``std`` or ``uint8`` with ``normalize=False``. With a
    multi-view pipeline (self-supervised multi-crop) ``images`` is a list with one such tensor per
    view, in the order the server's pipeline declares them.

    With ``server_key`` (the server's public key: Z85 text or its ``NAME.key`` file) and
    ``client_key`` (this client's ``NAME.key_secret`` file), or ``STOKER_SERVER_KEY`` and
    ``STOKER_CLIENT_KEY_FILE``, every connection is authenticated and encrypted with CURVE; a server
    that refuses the client raises :class:`~stoker.client.AuthenticationError` within seconds.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        dataset: str,
        *,
        pipeline: str = "train",
        image_size: int = 224,
        batch_size: int = 64,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        prefetch: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        return_indices: bool = False,
        timeout_s: float = 60.0,
        resolve_interval_s: float = 10.0,
        memory_format: torch.memory_format = torch.contiguous_format,
        server_key: KeySource = None,
        client_key: KeySource = None,
    ) -> None:
        super().__init__()
        self._keys = _client_keys(server_key, client_key)
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        parse_endpoints(self.endpoints)  # a malformed endpoint is a ValueError now, not a timeout later
        if not resolve_interval_s > 0:
            raise ValueError(f"{resolve_interval_s=} must be > 0")
        self.resolve_interval_s = float(resolve_interval_s)
        self.rank, world_size = _distributed_defaults(rank, world_size)
        self.spec = JobSpec(dataset, pipeline, image_size, batch_size, seed, shuffle, drop_last, world_size)
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 1024:
            raise ValueError(f"{prefetch=} must be an int in [1, 1024]")
        if not timeout_s > 0:
            raise ValueError(f"{timeout_s=} must be > 0")
        self.prefetch = prefetch
        self.device = (
            torch.device(device)
            if device is not None
            else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        )
        self._converter = Converter(self.device, normalize, mean, std, memory_format)
        self.normalize, self.mean, self.std = normalize, self._converter.mean, self._converter.std
        self.memory_format = memory_format
        self.return_indices = return_indices
        self.timeout_s = float(timeout_s)
        self._epoch = 0
        self._position = 0
        self._span: Span | None = None
        """The part of the current epoch's order this client's ranks share (a resumed epoch), or ``None``."""
        self._resize: _Resize | None = None
        self._session: Session | None = None
        self._stream: BatchStream | None = None
        self._owner_pid = os.getpid()
        self._pinned: PinnedPool | None = None
        self._reset_stats()

    # -- public API ------------------------------------------------------------------------------

    @property
    def info(self) -> JobInfo:
        """The job as the servers describe it (connects on first use)."""
        return self._open()

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = label."""
        return self._open().classes

    @property
    def epoch(self) -> int:
        """The epoch the next iteration serves."""
        return self._epoch

    def __len__(self) -> int:
        """Batches of the current epoch for this rank: after :meth:`load_state_dict` of a state saved
        on another number of ranks, the batches this rank gets of what is left of that epoch."""
        self._open()
        return self._batches_in(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` next. Switching epochs restarts at its first batch; the same epoch keeps
        a resumed position, so ``set_epoch`` at the top of a loop does not undo ``load_state_dict``.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"{epoch=} must be an int >= 0")
        if epoch != self._epoch:
            self._epoch, self._position, self._span, self._resize = epoch, 0, None, None

    def state_dict(self) -> dict[str, Any]:
        """Progress to checkpoint with the model: the epoch and the next batch to yield (and, in an
        epoch resumed on another number of ranks, the part of it these ranks share)."""
        if self._resize is not None:
            self._open()  # the re-plan needs the dataset's size
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "job": self.spec.to_wire(),
            "rank": self.rank,
            "epoch": self._epoch,
            "next_batch": self._position,
        }
        if self._span is not None:
            state.update(version=_SPAN_STATE_VERSION, span=list(self._span))
        return state

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Continue from a :meth:`state_dict`: the next iteration yields the rest of its epoch.

        ``state`` may come from any rank of a job that ran on any number of ranks, as long as every
        other field of the job is the same: in DDP all ranks are at the same step, so one rank's
        state (rank 0's, saved with the model) describes the whole job. A list of every rank's state
        is accepted too, and refused if they disagree on the position. Saved on another number of
        ranks, what the old ranks had left of the epoch is planned again over this client's ranks
        (each sample exactly once, the same number of batches on every rank); later epochs are
        planned for this client's ranks.
        """
        states = [state] if isinstance(state, Mapping) else list(state)
        if not states:
            raise ValueError("no state to load")
        saved = [self._read_state(one) for one in states]
        first = saved[0]
        for one, other in zip(states[1:], saved[1:], strict=True):
            if other != first:
                raise ValueError(
                    f"states disagree on the position: rank {states[0].get('rank')} at {first}, "
                    f"rank {one.get('rank')} at {other}"
                )
        ranks = [one.get("rank") for one in states]
        for rank in ranks:
            if ranks.count(rank) > 1:
                raise ValueError(f"states of rank {rank} twice: pass one state, or one per old rank")
        if self._stream is not None:  # it may be heading for the same (epoch, k) of another plan
            self._stream.close()
            self._stream = None
        if first.world_size == self.spec.world_size or (first.position == 0 and first.span is None):
            # Nothing of the epoch was served yet (or the plan is the same): no re-plan needed.
            self._epoch, self._position, self._span, self._resize = first.epoch, first.position, first.span, None
        else:
            self._epoch, self._position, self._span, self._resize = first.epoch, 0, None, first
            if self._session is not None and self._session.info is not None:
                self._apply_resize(self._session.info)

    def _read_state(self, state: Mapping[str, Any]) -> _Resize:
        version = state.get("version")
        if version not in (_STATE_VERSION, _SPAN_STATE_VERSION):
            raise ValueError(f"state version {version!r} is not one of {_STATE_VERSION}, {_SPAN_STATE_VERSION}")
        saved = JobSpec.from_wire(dict(state["job"]))
        ours = replace(self.spec, world_size=saved.world_size)
        if saved != ours:
            diff = {k: (v, getattr(ours, k)) for k, v in saved.to_wire().items() if getattr(ours, k) != v}
            raise ValueError(f"state is for another job; differing fields (saved, current): {diff}")
        epoch, position = int(state["epoch"]), int(state["next_batch"])
        span = state.get("span")
        if epoch < 0 or position < 0 or (span is not None and (len(span) != 2 or not 0 <= span[0] < span[1])):
            raise ValueError(f"bad state: epoch={epoch}, next_batch={position}, span={span}")
        return _Resize(epoch, None if span is None else (int(span[0]), int(span[1])), saved.world_size, position)

    def _apply_resize(self, info: JobInfo) -> None:
        """Plan what the saved ranks left of the epoch over this client's ranks (a pure function of
        the job, the epoch, the saved position and both world sizes: every new rank agrees)."""
        resize, spec = self._resize, self.spec
        if resize is None:
            return
        self._resize = None
        span = remaining_span(
            info.samples, spec.batch_size, resize.world_size, spec.drop_last, resize.position, resize.span
        )
        left = span_length(span, info.samples)
        if batches_per_rank(left, spec.batch_size, spec.world_size, spec.drop_last) == 0:
            self._epoch, self._position, self._span = resize.epoch + 1, 0, None  # nothing of it is left
        else:
            self._epoch, self._position, self._span = resize.epoch, 0, span
        log.info(
            "resumed epoch %d saved on %d ranks at batch %d: %d samples left, planned over %d ranks",
            resize.epoch, resize.world_size, resize.position, left, spec.world_size,
        )  # fmt: skip

    def _batches_in(self, epoch: int) -> int:
        """Batches per rank of ``epoch``: of its resumed part, or of the whole epoch."""
        info = self._open()
        if epoch == self._epoch and self._span is not None:
            length = span_length(self._span, info.samples)
            return batches_per_rank(length, self.spec.batch_size, self.spec.world_size, self.spec.drop_last)
        return info.batches

    def stats(self) -> dict[str, float | int]:
        """Batches, images and bytes received, seconds spent waiting for data and the wait share."""
        elapsed = (time.monotonic() - self._started) if self._started else 0.0
        return {
            "batches": self._batches,
            "images": self._images,
            "bytes": self._bytes,
            "wait_s": round(self._wait_s, 6),
            "elapsed_s": round(elapsed, 6),
            "wait_share": round(self._wait_s / elapsed, 6) if elapsed > 0 else 0.0,
            "images_per_s": round(self._images / elapsed, 2) if elapsed > 0 else 0.0,
        }

    def close(self) -> None:
        """Release sockets and pinned buffers. Iterating again reconnects."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._pinned is not None:
            self._pinned.close()
            self._pinned = None

    def __enter__(self) -> RemoteBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader worker processes get a copy without live sockets; they reconnect on use.
        state = self.__dict__.copy()
        state.update(_session=None, _stream=None, _pinned=None)
        return state

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._open()
        epoch, start = self._epoch, self._position
        batches = self._batches_in(epoch)
        ks = range(start, batches)
        worker = get_worker_info()
        sharded = worker is not None and worker.num_workers > 1
        if sharded:
            # Inside DataLoader(num_workers=n): worker i takes every n-th batch, and DataLoader's
            # round-robin over workers restores the order. Progress is tracked per worker copy.
            ks = ks[worker.id :: worker.num_workers]
        elif not ks:  # resumed from a position at the very end of the epoch: nothing is left of it
            self._epoch, self._position, self._span = epoch + 1, 0, None
            return
        stream = self._stream_for(epoch, list(ks), lookahead=not sharded)
        for k in ks:
            waited = time.monotonic()
            if not self._started:
                self._started = waited
            out = self._deliver(stream.get((epoch, k)))
            self._wait_s += time.monotonic() - waited
            if sharded:
                self._position = k + 1
            else:
                self._delivered(stream, epoch, k, batches)
            yield out

    def _delivered(self, stream: BatchStream, epoch: int, k: int, batches: int) -> None:
        """Batch ``k`` of ``epoch`` is being handed out: the position moves past it.

        The last batch finishes the epoch here, before it is yielded, not when the iterator is
        resumed once more: loops that take exactly ``len()`` batches never resume it.
        """
        if k + 1 < batches:
            self._epoch, self._position = epoch, k + 1
            return
        self._epoch, self._position, self._span = epoch + 1, 0, None
        # Keep one whole epoch planned ahead of the consumer, so epochs flow without a gap.
        if stream.last_item is not None and stream.last_item[0] == epoch + 1:
            stream.extend([(epoch + 2, j) for j in range(self._open().batches)])

    def _stream_for(self, epoch: int, ks: list[int], lookahead: bool) -> BatchStream:
        """The stream already heading for ``(epoch, ks[0])``, or a new one (the old one is dropped)."""
        stream = self._stream
        first = (epoch, ks[0]) if ks else None
        if stream is not None and lookahead and first is not None and stream.next_item == first:
            return stream
        if stream is not None:
            stream.close()
        session = self._session
        if session is None:
            raise RuntimeError("not connected")  # unreachable: _open() just connected
        if self._span is not None:
            session.resume(epoch, replace(self.spec, span=self._span))
        items = [(epoch, k) for k in ks]
        if lookahead:
            items += [(epoch + 1, k) for k in range(self._open().batches)]
        self._stream = BatchStream(session, items, self._open().prefetch)
        return self._stream

    # -- internals -------------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._batches = self._images = self._bytes = 0
        self._wait_s = 0.0
        self._started = 0.0

    def _progress(self) -> dict[str, float]:
        elapsed = (time.monotonic() - self._started) if self._started else 0.0
        return {"waited_s": round(self._wait_s, 6), "elapsed_s": round(elapsed, 6)}

    def _open(self) -> JobInfo:
        if self._owner_pid != os.getpid():
            # A forked copy (DataLoader workers fork by default) inherits the parent's sockets, which
            # must not be used after fork: drop them unclosed and connect afresh.
            self._session, self._stream, self._pinned = None, None, None
            self._converter.forget_device_state()
            self._owner_pid = os.getpid()
        if self._session is None:
            cuda = self.device.type == "cuda"
            if cuda and self._pinned is None:
                self._pinned = PinnedPool(self.prefetch + 4)
            self._session = Session(
                self.endpoints,
                self.spec,
                self.rank,
                self.prefetch,
                self.timeout_s,
                progress=self._progress,
                receive_into=self._pinned_buffer if cuda else None,
                resolve_interval_s=self.resolve_interval_s,
                keys=self._keys,
            )
        if self._session.info is None:
            try:
                self._session.open()
            except BaseException:
                self.close()
                raise
        info: JobInfo = self._session.info  # type: ignore[assignment]
        if self._resize is not None:
            self._apply_resize(info)
        return info

    def _pinned_buffer(self, nbytes: int) -> tuple[memoryview, torch.Tensor]:
        if self._pinned is None:
            raise RuntimeError("pinned pool closed")  # unreachable while a CUDA session is open
        buffer = self._pinned.take(nbytes)
        return memoryview(buffer.numpy()), buffer

    def _deliver(self, raw: RawBatch) -> tuple[Any, ...]:
        fields = raw.fields
        shapes = fields.get("views", [fields["shape"]])
        views = self._converter.images(raw, self._pinned)
        labels = torch.tensor(fields["labels"], dtype=torch.int64).to(self.device, non_blocking=True)
        self._batches += 1
        self._images += len(fields["labels"])
        self._bytes += sum(math.prod(shape) for shape in shapes)
        images: Any = views if "views" in fields else views[0]  # a multi-view pipeline: one tensor per view
        if self.return_indices:
            return images, labels, torch.tensor(fields["indices"], dtype=torch.int64)
        return images, labels
