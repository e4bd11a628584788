"""The client's place in the job: the epoch it serves, the next batch of it, and the part of the epoch
a resumed job plans (its span). This is the only place those change, each by a named transition.

```mermaid
stateDiagram-v2
    [*] --> Serving: (epoch 0, batch 0)
    Serving --> Serving: advance_past(k) / finish_epoch / select_epoch
    Serving --> Serving: resume(saved on as many ranks, or before any batch)
    Serving --> Pending: resume(saved mid-epoch on another number of ranks)
    Pending --> Serving: apply_replan(dataset size), once the first server describes the job
    Pending --> Serving: select_epoch(another epoch)
```

While a re-plan is pending the position is not known yet: what the saved ranks left depends on the
dataset's size, which only a server can tell.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.plan import Span, batches_per_rank, remaining_span, span_length

__all__ = ["Position", "SavedPosition"]

log = logging.getLogger(__name__)


class SavedPosition(NamedTuple):
    """A position as a checkpoint holds it: on ``world_size`` ranks, ``next_batch`` of ``epoch`` (of
    its ``span`` when that epoch was itself resumed) is the next batch each rank yields."""

    epoch: int
    next_batch: int
    span: Span | None
    world_size: int
    reweights: tuple = ()
    """A mixture job's changes of weight so far (its spec's ``reweights``)."""


class Position:
    """Where this client's ranks are in the job's epochs (the job's ``batch_size``, ``world_size`` and
    ``drop_last`` turn a saved position into this client's plan)."""

    def __init__(self, spec: JobSpec) -> None:
        self._spec = spec
        self._epoch = 0
        self._next_batch = 0
        self._span: Span | None = None
        self._pending: SavedPosition | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next iteration serves."""
        return self._epoch

    @property
    def next_batch(self) -> int:
        """The next batch of :attr:`epoch` to yield (of its span, when it has one)."""
        return self._next_batch

    @property
    def span(self) -> Span | None:
        """The part of the current epoch's order this client's ranks share (a resumed epoch), or ``None``."""
        return self._span

    @property
    def replan_pending(self) -> bool:
        """Whether a saved position waits for the dataset's size to be planned over these ranks."""
        return self._pending is not None

    def batches(self, samples: int, whole_epoch: int) -> int:
        """Batches per rank of the current epoch: of its span, or ``whole_epoch`` (the servers' count)."""
        if self._span is None:
            return whole_epoch
        spec = self._spec
        return batches_per_rank(span_length(self._span, samples), spec.batch_size, spec.world_size, spec.drop_last)

    def saved(self) -> SavedPosition:
        """The position to checkpoint; a pending re-plan must be applied first (it needs the dataset's size)."""
        if self._pending is not None:
            raise RuntimeError("the saved position is not planned over these ranks yet: apply_replan first")
        return SavedPosition(self._epoch, self._next_batch, self._span, self._spec.world_size)

    # -- transitions -----------------------------------------------------------------------------

    def select_epoch(self, epoch: int) -> None:
        """Serve ``epoch`` next: another epoch starts at its first batch; the current one keeps a
        resumed position (``set_epoch`` at the top of a loop must not undo ``load_state_dict``)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"{epoch=} must be an int >= 0")
        if epoch != self._epoch:
            self._move(epoch, 0, None)

    def advance_past(self, epoch: int, k: int) -> None:
        """Batch ``k`` of ``epoch`` is handed out: the next one is ``k + 1``."""
        self._move(epoch, k + 1, self._span)

    def finish_epoch(self, epoch: int) -> None:
        """Nothing of ``epoch`` is left: the next epoch starts at its first batch, whole."""
        self._move(epoch + 1, 0, None)

    def resume(self, saved: SavedPosition) -> None:
        """Continue from ``saved``. Saved on another number of ranks in the middle of an epoch, the
        rest of that epoch is planned over these ranks by :meth:`apply_replan`."""
        if saved.world_size == self._spec.world_size or (saved.next_batch == 0 and saved.span is None):
            self._move(saved.epoch, saved.next_batch, saved.span)  # the plan is the same: no re-plan
        else:
            self._move(saved.epoch, 0, None)
            self._pending = saved

    def apply_replan(self, samples: int) -> None:
        """Plan what the saved ranks left of their epoch over these ranks, now that the dataset has
        ``samples``: a pure function of the job, the epoch, the saved position and both world sizes,
        so every new rank computes the same. No-op without a pending re-plan."""
        saved, spec = self._pending, self._spec
        if saved is None:
            return
        span = remaining_span(samples, spec.batch_size, saved.world_size, spec.drop_last, saved.next_batch, saved.span)
        left = span_length(span, samples)
        if batches_per_rank(left, spec.batch_size, spec.world_size, spec.drop_last) == 0:
            self._move(saved.epoch + 1, 0, None)  # nothing of it is left
        else:
            self._move(saved.epoch, 0, span)
        log.info(
            "resumed epoch %d saved on %d ranks at batch %d: %d samples left, planned over %d ranks",
            saved.epoch, saved.world_size, saved.next_batch, left, spec.world_size,
        )  # fmt: skip

    def _move(self, epoch: int, next_batch: int, span: Span | None) -> None:
        self._epoch, self._next_batch, self._span, self._pending = epoch, next_batch, span, None
