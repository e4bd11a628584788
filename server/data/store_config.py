"""How hard object storage is tried and how long it is waited for: a small record, without obstore, so
the settings can build it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StoreConfig"]


@dataclass(frozen=True)
class StoreConfig:
    """How hard to try and how long to wait. Retries back off from ``backoff_s``, doubling with
    jitter; no try starts after ``retry_timeout_s``. The values come from the settings (``s3_*``),
    where their defaults are declared."""

    tries: int
    backoff_s: float
    connect_timeout_s: float
    request_timeout_s: float
    """One request, its body included (get, head, a page of a list)."""
    read_timeout_s: float
    """The longest silence inside a stream (``open_stream`` has no overall limit)."""
    retry_timeout_s: float

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError(f"tries={self.tries} must be >= 1")
        for name in ("backoff_s", "connect_timeout_s", "request_timeout_s", "read_timeout_s", "retry_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
