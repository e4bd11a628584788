"""Command-line tools, run in the parent process: ``stoker serve``, ``demo``, ``bench``, ``status``."""

from stoker.server.tools.cli import main

__all__ = ["main"]
