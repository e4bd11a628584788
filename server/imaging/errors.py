"""Errors raised while rendering a sample that are not the file's fault, in a module without torch so
the worker pool's parent process can name them."""

from __future__ import annotations

__all__ = ["PostOpError"]


class PostOpError(Exception):
    """A post-op failed or returned something that is not the view's image: a pipeline error, not a
    bad file. ``op`` names the op, ``reason`` says what happened, ``trace`` is the worker's traceback."""

    def __init__(self, op: str, reason: str, trace: str = "") -> None:
        super().__init__(f"{op}: {reason}")
        self.op, self.reason, self.trace = op, reason, trace
