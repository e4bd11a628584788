"""An operator's dataset-listing plugin for the tests (on the server's PYTHONPATH): the bundled demo
photos as ``(path, class name)`` pairs, in ImageFolder's order; optionally it waits for a file to
appear first, standing in for a listing that takes minutes."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "server" / "demo-data"


def list_demo(split: str = "train", wait_for: str | None = None, timeout_s: float = 120.0) -> list[tuple[str, str]]:
    """Every demo photo with its folder as the label; ``split="odd"`` keeps every other one."""
    if wait_for is not None:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(wait_for):  # the test creates the file when it has seen the wait
            if time.monotonic() > deadline:
                raise TimeoutError(f"{wait_for} never appeared")
            time.sleep(0.02)
    photos = sorted(DEMO.rglob("*.jpg"), key=lambda p: (p.parent.name, p.name))
    pairs = [(str(path), path.parent.name) for path in photos]
    return pairs[1::2] if split == "odd" else pairs


def list_from_a_broken_index(index: str = "index.db") -> list[tuple[str, str]]:
    """An operator's listing that fails inside its own helper: the traceback must show this file."""
    return _read_index(index)


def _read_index(index: str) -> list[tuple[str, str]]:
    raise RuntimeError(f"cannot open the operator's index {index!r}")
