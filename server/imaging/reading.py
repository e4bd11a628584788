"""A worker's reads: a sample's bytes from its locator (a local file, a member of a local tar shard, an
object or a byte range of one on object storage), with several reads in flight for remote samples so
that a store's latency overlaps instead of adding up."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from stoker.server.data.locators import Locator, ObjectMissing, StoreUnavailable
from stoker.server.imaging.decode import BadImage
from stoker.server.imaging.limits import DecodeLimits

__all__ = ["Reader", "read_local"]


def read_local(locator: Locator, limits: DecodeLimits) -> bytes:
    """A local file, or ``length`` bytes of it from ``start``; :class:`BadImage` when unusable."""
    length = locator.length
    if length > limits.max_file_bytes:
        raise BadImage(f"member larger than max_file_bytes={limits.max_file_bytes}")
    try:
        with open(locator.target, "rb") as handle:
            if length < 0:
                # Check the size first: read(n) would reserve n bytes up front, whatever the file holds.
                if os.fstat(handle.fileno()).st_size > limits.max_file_bytes:
                    raise BadImage(f"file larger than max_file_bytes={limits.max_file_bytes}")
                data = handle.read()
            else:
                handle.seek(locator.start)
                data = handle.read(length)
    except OSError as exc:
        raise BadImage(f"cannot read: {exc.strerror or exc}") from None
    if length >= 0 and len(data) != length:
        raise BadImage(f"truncated: {len(data)} of {length} bytes at offset {locator.start}")
    if not data:
        raise BadImage("empty file")
    return data


def _read_remote(locator: Locator, limits: DecodeLimits) -> bytes:
    from stoker.server.data.stores import parse_s3_url, store_for  # only workers reading objects load it

    if locator.length > limits.max_file_bytes:
        raise BadImage(f"member larger than max_file_bytes={limits.max_file_bytes}")
    bucket, key = parse_s3_url(locator.target)
    try:
        data = store_for(bucket).get(key, locator.start, locator.length)
    except ObjectMissing as exc:
        raise BadImage(f"cannot read: {exc}") from None
    if locator.length >= 0 and len(data) != locator.length:
        raise BadImage(f"truncated: {len(data)} of {locator.length} bytes at offset {locator.start}")
    if not data:
        raise BadImage("empty object")
    if len(data) > limits.max_file_bytes:
        raise BadImage(f"object larger than max_file_bytes={limits.max_file_bytes}")
    return data


class Reader:
    """Reads the samples of a task; remote ones ``in_flight`` at a time on a small thread pool (the
    reads wait on the network without the GIL while the worker decodes what has arrived)."""

    def __init__(self, limits: DecodeLimits, in_flight: int) -> None:
        self.limits = limits
        self.in_flight = in_flight
        self._pool: ThreadPoolExecutor | None = None

    def read(self, locator: Locator) -> bytes:
        """One sample's bytes; :class:`BadImage` for a missing or unusable sample,
        :class:`StoreUnavailable` when the store cannot be reached."""
        return _read_remote(locator, self.limits) if locator.remote else read_local(locator, self.limits)

    def read_all(self, locators: Sequence[Locator]) -> Iterator[bytes | BadImage | StoreUnavailable]:
        """Each locator's bytes (or the error reading it), in order, with remote reads overlapped."""
        if self.in_flight <= 1 or not any(locator.remote for locator in locators):
            for locator in locators:
                yield self._attempt(locator)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="stoker-read")
        futures: list[Future[bytes | BadImage | StoreUnavailable]] = [
            self._pool.submit(self._attempt, locator) for locator in locators
        ]
        for future in futures:
            yield future.result()

    def _attempt(self, locator: Locator) -> bytes | BadImage | StoreUnavailable:
        try:
            return self.read(locator)
        except (BadImage, StoreUnavailable) as exc:
            return exc

    def close(self) -> None:
        """Stop the read threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
