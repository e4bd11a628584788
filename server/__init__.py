"""stoker's loader server: decodes, augments and batches images and serves them over ZeroMQ.

Heavy parts (the engine, FastAPI, torch) load only when used, so ``stoker status`` and ``--help`` are
fast and the console script can explain a missing ``stoker[server]`` install.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> int:
    """Run the ``stoker`` command line."""
    from stoker.server.tools.cli import main as cli_main

    return cli_main()
