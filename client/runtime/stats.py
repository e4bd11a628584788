"""What a client received and how long it waited for it: ``RemoteBatches.stats()`` and the progress
figures every request carries (the server's view of how much its clients stall)."""

from __future__ import annotations

import math
import time

from stoker.client.runtime.session import RawBatch

__all__ = ["Stats"]


class Stats:
    """Counters of delivered batches, images and image bytes, and the time spent waiting for them."""

    def __init__(self, weight: float | None = None) -> None:
        self.weight = weight
        """The share of the servers' worker time this client's job asks for (``None``: as declared)."""
        self.batches = 0
        self.images = 0
        self.bytes = 0
        self.wait_s = 0.0
        self._started = 0.0
        """When the first wait began (``time.monotonic()``), 0 before."""

    def wait_started(self) -> float:
        """Mark the start of a wait for a batch; pass the result to :meth:`delivered`."""
        now = time.monotonic()
        if not self._started:
            self._started = now
        return now

    def delivered(self, raw: RawBatch, waited_since: float) -> None:
        """``raw`` was handed out after a wait that began at ``waited_since``."""
        fields = raw.fields
        self.batches += 1
        self.images += len(fields["labels"])
        self.bytes += sum(math.prod(shape) for shape in fields.get("views", [fields["shape"]]))
        self.wait_s += time.monotonic() - waited_since

    def elapsed_s(self) -> float:
        """Seconds since the first wait began."""
        return (time.monotonic() - self._started) if self._started else 0.0

    def progress(self) -> dict[str, float]:
        """The figures sent with every request."""
        figures: dict[str, float] = {
            "waited_s": round(self.wait_s, 6),
            "elapsed_s": round(self.elapsed_s(), 6),
            "images": self.images,  # with the two above, the server's view of the loop's demand
        }
        if self.weight is not None:
            figures["weight"] = self.weight
        return figures

    def summary(self) -> dict[str, float | int]:
        """Batches, images and bytes received, seconds spent waiting for data and the wait share."""
        elapsed = self.elapsed_s()
        return {
            "batches": self.batches,
            "images": self.images,
            "bytes": self.bytes,
            "wait_s": round(self.wait_s, 6),
            "elapsed_s": round(elapsed, 6),
            "wait_share": round(self.wait_s / elapsed, 6) if elapsed > 0 else 0.0,
            "images_per_s": round(self.images / elapsed, 2) if elapsed > 0 else 0.0,
        }
