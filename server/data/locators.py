"""Where a sample's bytes are: a locator is a local path or an object URL, with an optional byte range
(a member of a tar shard is its shard plus the member's offset and size). Everything above the locator
(planner, render, exactly-once) is the same whatever the source."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Locator", "ObjectMissing", "StoreUnavailable"]


@dataclass(frozen=True, slots=True)
class Locator:
    """``target`` is a local path or ``s3://bucket/key``; ``length`` -1 means to the end."""

    target: str
    start: int = 0
    length: int = -1

    @property
    def remote(self) -> bool:
        """Whether reading it is a network request."""
        return self.target.startswith("s3://")

    def __str__(self) -> str:
        return self.target if self.length < 0 and not self.start else f"{self.target}[{self.start}:+{self.length}]"


class ObjectMissing(Exception):
    """The object (or local file) does not exist: the sample is bad."""


class StoreUnavailable(Exception):
    """The store could not be reached after the bounded retries: the batch fails, the sample is not
    marked bad (an outage must not silently replace a dataset)."""
