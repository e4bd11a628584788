"""The trainer-side CPU of receiving: process CPU seconds per image of a ``RemoteBatches`` client on
the CPU (its server is a child process, not counted), for each memory format, with and without
normalisation. ``--profile`` prints where the client's CPU goes (cProfile, by own time).

    python -m stoker.server.tools.bench.client_cpu --data DIR [--epochs 4] [--batch-size 64] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

from stoker.server.tools.launcher import loopback_args, start_server

__all__ = ["client_cpu_ms_per_image", "main"]

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def client_cpu_ms_per_image(endpoint: str, epochs: int, batch_size: int, size: int, **options: object) -> float:
    """Client process CPU milliseconds per image over ``epochs`` epochs (after a warm-up epoch)."""
    from stoker.client import RemoteBatches

    with RemoteBatches(endpoint, "bench", image_size=size, batch_size=batch_size, device="cpu", **options) as batches:
        for _ in batches:  # a warm-up epoch: connections, the server's workers, first page faults
            pass
        images, started = 0, time.process_time()
        for _ in range(epochs):
            for views, _labels in batches:
                images += (views[0] if isinstance(views, list) else views).shape[0]
        return (time.process_time() - started) * 1000 / images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    with start_server(loopback_args("bench", args.data.resolve(), args.workers)) as server:
        for normalize in (False, True):
            for name, memory_format in FORMATS.items():
                ms = client_cpu_ms_per_image(
                    server.data, args.epochs, args.batch_size, args.image_size,
                    memory_format=memory_format, normalize=normalize,
                )  # fmt: skip
                print(f"client CPU: {ms:.4f} ms/image  ({name}, normalize={normalize})")
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            client_cpu_ms_per_image(server.data, args.epochs, args.batch_size, args.image_size, normalize=False)
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
