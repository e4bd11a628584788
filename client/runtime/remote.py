"""``RemoteBatches``: the torch ``IterableDataset`` a training loop iterates to get batches from stoker.

It composes parts with one job each: a :class:`~stoker.client.runtime.connection.Connection` (the
session with the servers, pinned buffers, fork safety), a :class:`~stoker.client.runtime.feed.Feed`
(which batches to ask for: look-ahead, DataLoader-worker shares), a
:class:`~stoker.client.runtime.position.Position` (epoch, next batch, span, a pending re-plan) saved
and loaded in the :mod:`~stoker.client.runtime.checkpoint` format, a
:class:`~stoker.client.runtime.output.BatchOutput` (a received batch to the yielded tuple) and
:class:`~stoker.client.runtime.stats.Stats`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import IterableDataset

from stoker.client.protocol.job import JobSpec
from stoker.client.runtime import checkpoint
from stoker.client.runtime.connection import Connection, KeySource, client_keys
from stoker.client.runtime.endpoints import parse_endpoints
from stoker.client.runtime.feed import Feed, worker_share
from stoker.client.runtime.mixing import check_weights, mixture_state, planned_weights, reweights_after
from stoker.client.runtime.output import BatchOutput
from stoker.client.runtime.position import Position
from stoker.client.runtime.session import JobInfo
from stoker.client.runtime.stats import Stats
from stoker.client.runtime.tensors import Converter

__all__ = ["RemoteBatches", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    ``targets=["caption", "boxes"]`` (or ``"all"``: every field the dataset declares) yields
    ``(images, targets)`` instead, ``targets`` a dict: ``label`` fields as ``int64`` tensors on the
    device, ``text`` as a list of ``str``, ``json`` as a list of Python values, ``boxes`` as a list of
    per-sample ``float32 N_i x 4`` ``xyxy`` tensors in output pixels plus ``box_labels`` (a list of
    ``int64`` tensors), ``mask`` as one ``uint8 B x H x W`` tensor on the device. Boxes and mask
    follow the first view's geometry and post-ops. With ``return_indices`` the indices still come last.

    With ``server_key`` (the server's public key: Z85 text or its ``NAME.key`` file) and
    ``client_key`` (this client's ``NAME.key_secret`` file), or ``STOKER_SERVER_KEY`` and
    ``STOKER_CLIENT_KEY_FILE``, every connection is authenticated and encrypted with CURVE; a server
    that refuses the client raises :class:`~stoker.client.AuthenticationError` within seconds.

    ``weight`` asks the servers for this share of their worker time among contending jobs (the
    operator's ``weight`` of the dataset is the most a client gets; ``None`` takes it as declared).

    A pickled or forked copy (DataLoader workers) never uses the original's sockets: it connects on first use.
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
        return_sources: bool = False,
        timeout_s: float = 60.0,
        resolve_interval_s: float = 10.0,
        memory_format: torch.memory_format = torch.contiguous_format,
        server_key: KeySource = None,
        client_key: KeySource = None,
        weight: float | None = None,
        targets: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__()
        keys = client_keys(server_key, client_key)
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        parse_endpoints(self.endpoints)  # a malformed endpoint is a ValueError now, not a timeout later
        if not resolve_interval_s > 0:
            raise ValueError(f"{resolve_interval_s=} must be > 0")
        self.resolve_interval_s = float(resolve_interval_s)
        self.rank, world_size = _distributed_defaults(rank, world_size)
        # The workers write rows in the layout the loop gets, so receiving copies nothing.
        layout = "nchw" if memory_format == torch.contiguous_format else "nhwc"
        if isinstance(targets, str) and targets != "all":
            raise ValueError(f"targets={targets!r} must be 'all' or a list of field names")
        wanted = ("all",) if targets == "all" else tuple(targets or ())
        self.spec = JobSpec(
            dataset,
            pipeline,
            image_size,
            batch_size,
            seed,
            shuffle,
            drop_last,
            world_size,
            layout=layout,
            targets=wanted,
        )
        if not isinstance(prefetch, int) or not 1 <= prefetch <= 1024:
            raise ValueError(f"{prefetch=} must be an int in [1, 1024]")
        if not timeout_s > 0:
            raise ValueError(f"{timeout_s=} must be > 0")
        if weight is not None and not (isinstance(weight, int | float) and 0 < weight <= 1000):
            raise ValueError(f"{weight=} must be a number in (0, 1000]")
        self.weight = None if weight is None else float(weight)
        self.prefetch = prefetch
        self.device = (
            torch.device(device)
            if device is not None
            else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        )
        converter = Converter(self.device, normalize, mean, std, memory_format)
        self.normalize, self.mean, self.std = normalize, converter.mean, converter.std
        self.memory_format = memory_format
        self.return_indices = return_indices
        self.timeout_s = float(timeout_s)
        self.return_sources = return_sources
        self._output = BatchOutput(converter, return_indices, return_sources)
        self._stats = Stats(self.weight)
        self._keys = keys
        self._bind(self.spec)

    def _bind(self, spec: JobSpec) -> None:
        """Position, feed and connection for ``spec`` (again when a mixture is re-weighted: a new job)."""
        self.spec = spec
        self._position = Position(spec)
        self._feed = Feed(spec)
        self._connection = Connection(
            self.endpoints,
            spec,
            self.rank,
            prefetch=self.prefetch,
            timeout_s=self.timeout_s,
            resolve_interval_s=self.resolve_interval_s,
            keys=self._keys,
            device=self.device,
            progress=self._stats.progress,
        )

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
        return self._position.epoch

    def __len__(self) -> int:
        """Batches of the current epoch for this rank: after :meth:`load_state_dict` of a state saved
        on another number of ranks, the batches this rank gets of what is left of that epoch."""
        info = self._open()
        return self._position.batches(info.samples, info.batches)

    def set_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` next. Switching epochs restarts at its first batch; the same epoch keeps
        a resumed position, so ``set_epoch`` at the top of a loop does not undo ``load_state_dict``.
        """
        self._position.select_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Progress to checkpoint with the model: the epoch and the next batch to yield (and, in an
        epoch resumed on another number of ranks, the part of it these ranks share)."""
        if self._position.replan_pending:
            self._open()  # the re-plan needs the dataset's size
        saved = self._position.saved()
        info = self._connection.info
        mixture = None
        if info is not None and info.mixture is not None:
            mixture = mixture_state(self.spec, info.mixture, saved)
        return checkpoint.state_dict(self.spec, self.rank, saved, mixture)

    def mixture_state(self) -> dict[str, Any]:
        """Where each source of a mixture stands at the current position: ``{"sources": {name:
        {"weight", "pass", "position"}}}`` (connects on first use; raises ``ValueError`` for a dataset)."""
        info = self._open()
        if info.mixture is None:
            raise ValueError(f"{self.spec.dataset!r} is a dataset, not a mixture")
        return mixture_state(self.spec, info.mixture, self._position.saved())

    def load_state_dict(
        self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]], weights: Mapping[str, float] | None = None
    ) -> None:
        """Continue from a :meth:`state_dict`: the next iteration yields the rest of its epoch.

        ``state`` may come from any rank of a job that ran on any number of ranks, as long as every
        other field of the job is the same: in DDP all ranks are at the same step, so one rank's
        state (rank 0's, saved with the model) describes the whole job. A list of every rank's state
        is accepted too, and refused if they disagree on the position. Saved on another number of
        ranks, what the old ranks had left of the epoch is planned again over this client's ranks
        (each sample exactly once, the same number of batches on every rank); later epochs are
        planned for this client's ranks.

        For a mixture, ``weights`` (source -> weight, every source named) changes the proportions from
        the saved position on: each source continues its current pass where it stopped, and the rest
        of the epoch and the following ones follow the new weights. Weights changed in the servers'
        TOML since the state was saved are taken the same way, from the saved position on.
        """
        saved = checkpoint.read_states(state, self.spec)
        self._rebind(saved.reweights)
        before = planned_weights(state)
        if weights is not None:
            info = self._open()
            if info.mixture is None:
                raise ValueError(f"weights given, but {self.spec.dataset!r} is a dataset, not a mixture")
            check_weights(info.mixture, weights)
        elif before is not None:
            info = self._open()  # what the servers declare now
            now = dict(zip(info.mixture["sources"], info.mixture["weights"], strict=True)) if info.mixture else None
            if now is not None and any(abs(now.get(k, -1.0) - v) > 1e-12 for k, v in before.items()):
                weights = now  # the TOML changed: its weights hold from the saved position on
        self._rebind(reweights_after(saved, self.spec.batch_size, before, weights))
        self._feed.drop()  # it may be heading for the same (epoch, k) of another plan
        self._position.resume(saved)
        info = self._connection.info
        if info is not None:
            self._position.apply_replan(info.samples)

    def _rebind(self, reweights: tuple) -> None:
        if reweights != self.spec.reweights:
            self._feed.drop()
            self._connection.close()
            self._bind(replace(self.spec, reweights=reweights))  # another job: its own id, plan and info

    def stats(self) -> dict[str, float | int]:
        """Batches, images and bytes received, seconds spent waiting for data and the wait share."""
        return self._stats.summary()

    def close(self) -> None:
        """Release sockets and pinned buffers. Iterating again reconnects."""
        self._feed.drop()
        self._connection.close()

    def __enter__(self) -> RemoteBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = self._open()
        position = self._position
        epoch = position.epoch
        batches = position.batches(info.samples, info.batches)
        ks, sharded = worker_share(range(position.next_batch, batches))
        if not ks and not sharded:  # resumed at the very end of the epoch: nothing is left of it
            position.finish_epoch(epoch)
            return
        session = self._connection.session
        if session is None:
            raise RuntimeError("not connected")  # unreachable: _open() just connected
        stream = self._feed.stream(session, epoch, list(ks), position.span, info.batches, lookahead=not sharded)
        for k in ks:
            waited_since = self._stats.wait_started()
            raw = stream.get((epoch, k))
            out = self._output(raw, self._connection.pinned)
            self._stats.delivered(raw, waited_since)
            # The last batch finishes the epoch here, before it is yielded, not when the iterator is
            # resumed once more: loops that take exactly len() batches never resume it. A DataLoader
            # worker's copy only tracks its own share (its position is not the one checkpointed).
            if sharded or k + 1 < batches:
                position.advance_past(epoch, k)
            else:
                position.finish_epoch(epoch)
                self._feed.epoch_finished(epoch, info.batches)
            yield out

    def _open(self) -> JobInfo:
        """Connect on first use (afresh in a forked copy) and apply a pending re-plan."""
        if self._connection.left_behind_by_fork():
            self._feed.forget()
            self._output.forget_device_state()
        info = self._connection.open()
        self._position.apply_replan(info.samples)
        self._output.kinds = (info.targets or {}) if self.spec.targets else None
        return info
