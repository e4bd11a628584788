"""The ``stoker`` command: ``serve``, ``demo``, ``bench`` and ``status``.

Flags are a public contract (users' scripts call them): add freely, never rename or drop. Each
``serve`` flag maps to one field of :class:`~stoker.server.settings.ServerSettings`, which holds the
validation and the defaults; the environment (``STOKER_<FIELD>``) and ``--config`` feed it too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def _dataset_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="stoker", description="Data loading as a service for GPU training.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands.add_parser("serve", help="run a loader server"))
    _add_demo(commands.add_parser("demo", help="stream the bundled photos through a local server and client"))
    _add_bench(commands.add_parser("bench", help="compare stoker with torch's DataLoader on the same data and cores"))
    status = commands.add_parser("status", help="print a summary of a server's /status")
    status.add_argument("url", nargs="?", default="http://127.0.0.1:8080", help="the server's HTTP address")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument(
        "--token-file", help="file holding the bearer token (default: $STOKER_HTTP_TOKEN, or none on loopback)"
    )
    keys = commands.add_parser("keys", help="CURVE keys for the data plane")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = key_commands.add_parser(
        "generate", help="write a key pair: DIR/NAME.key (public, to share) and DIR/NAME.key_secret (keep it)"
    )
    generate.add_argument("folder", metavar="DIR")
    generate.add_argument("--name", default="stoker", help="file name of the pair (default: stoker)")
    generate.add_argument("--force", action="store_true", help="replace an existing pair")
    return parser


def _add_serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", type=Path, help="TOML file with settings, datasets and pipelines")
    serve.add_argument(
        "--dataset",
        action="append",
        type=_dataset_arg,
        default=[],
        metavar="NAME=PATH",
        help="declare a dataset: an ImageFolder directory or a CSV/TSV file list (repeatable)",
    )
    try:
        from stoker.server.settings import ServerSettings, add_setting_flags
    except ImportError:  # a client-only install: `stoker serve` will say what to install
        serve.add_argument("unavailable", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    else:
        # Every other flag comes from a field of the settings model: declared once, there.
        add_setting_flags(serve, ServerSettings, skip={"datasets", "pipelines", "mixtures"})


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    demo.add_argument(
        "--repeats", type=int, default=3, help="timed runs per loader, one after another; the median is shown"
    )
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--image-size", type=int, default=224)
    demo.add_argument("--workers", type=int, help="server workers (default: usable CPU cores)")
    demo.add_argument("--step-ms", type=float, default=0.0, help="simulated training step per batch")
    demo.add_argument("--device", help="client device (default: cuda if available, else cpu)")
    demo.add_argument("--no-compare", action="store_true", help="skip the torch DataLoader comparison")


def _add_bench(bench: argparse.ArgumentParser) -> None:
    bench.add_argument(
        "--data",
        required=True,
        help="an ImageFolder directory of JPEGs (every row), or any dataset path stoker serves: a manifest, "
        "a tar-shard pattern, an s3:// URL (stoker's rows)",
    )
    bench.add_argument(
        "--cache",
        nargs="?",
        const="4GiB",
        metavar="BYTES",
        help="add row (e): stoker with its decoded-sample cache (budget BYTES, default 4GiB), from epoch 2",
    )
    bench.add_argument(
        "--curve",
        action="store_true",
        help="add row (f): stoker with CURVE on the data plane, and the wire path with CURVE (the security's cost)",
    )
    bench.add_argument(
        "--reads-in-flight", type=int, help="stoker workers' reads in flight on object storage (server default 16)"
    )
    bench.add_argument(
        "--pipeline", default="train", help="a built-in pipeline (train, eval, resize) or one --config declares"
    )
    bench.add_argument("--config", type=Path, help="a server config whose [pipelines.*] tables declare --pipeline")
    bench.add_argument("--image-size", type=int, default=224)
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--workers", type=int, help="workers for every loader (default: usable CPU cores)")
    bench.add_argument("--seconds", type=float, default=10.0, help="timed window per run")
    bench.add_argument("--repeats", type=int, default=3, help="runs per row (the median is reported)")
    bench.add_argument(
        "--poll-status-ms",
        type=float,
        default=0.0,
        help="also run stoker with /status polled this often, to show the HTTP side's cost",
    )
    bench.add_argument(
        "--albumentations",
        action="store_true",
        help="add row (g): a DataLoader running the pipeline written with albumentations (installed apart)",
    )
    bench.add_argument(
        "--dali-python",
        metavar="PYTHON",
        help="add row (h): NVIDIA DALI's CPU DINO multi-crop pipeline (../shared/peers/dali_dino.py) run by "
        "this Python, whose environment has DALI",
    )
    bench.add_argument("--dali-script", type=Path, help="the DALI peer script (default: ../shared/peers/dali_dino.py)")
    bench.add_argument(
        "--mixture",
        action="store_true",
        help="also run stoker on a 3-source mixture of the data (0.6/0.3/0.1) against the one dataset: row (i)",
    )
    bench.add_argument(
        "--targets",
        choices=("detection", "captions"),
        help="targets rows instead: COCO boxes vs torchvision v2 + tv_tensors, or image-text shards vs "
        "webdataset's pipeline (both written from --data's JPEGs), and stoker without the targets",
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON")


def _serve(args: argparse.Namespace) -> int:
    from stoker.server.settings import given_settings, load_settings
    from stoker.server.tools.serve import ServeError, configure_logging, serve

    overrides = given_settings(args)
    overrides["datasets"] = {name: {"path": path} for name, path in args.dataset}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except (ValueError, OSError) as exc:
        print(f"stoker serve: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return serve(settings)
    except ServeError as exc:
        print(f"stoker serve: {exc}", file=sys.stderr)
        if exc.origin is not None:
            print(f"stoker serve: raised by:\n{exc.origin}", file=sys.stderr, end="")
        return 2


def _demo(args: argparse.Namespace) -> int:
    from stoker.server.tools.demo import DemoConfig, format_demo, run_demo

    try:
        config = DemoConfig(
            epochs=args.epochs,
            repeats=args.repeats,
            batch_size=args.batch_size,
            image_size=args.image_size,
            workers=args.workers,
            step_ms=args.step_ms,
            device=args.device,
            compare=not args.no_compare,
        )
    except ValueError as exc:
        print(f"stoker demo: {exc}", file=sys.stderr)
        return 2
    print(format_demo(config, run_demo(config, say=print)))
    return 0


def _bench_data(data: str) -> str:
    """A local path made absolute (the server runs elsewhere in the tree); a URL or pattern as given."""
    if data.startswith("s3://") or "{" in data:
        return data
    return str(Path(data).resolve())


def _bench(args: argparse.Namespace) -> int:
    from stoker.server.tools.bench import BenchConfig, dump_json, format_table, run_bench

    try:
        config = BenchConfig(
            data=_bench_data(args.data),
            pipeline=args.pipeline,
            image_size=args.image_size,
            batch_size=args.batch_size,
            workers=args.workers,
            seconds=args.seconds,
            repeats=args.repeats,
            poll_status_ms=args.poll_status_ms,
            config_file=args.config.resolve() if args.config else None,
            server_args=("--reads-in-flight", str(args.reads_in_flight)) if args.reads_in_flight else (),
            cache_bytes=args.cache,
            albumentations=args.albumentations,
            dali_python=args.dali_python,
            dali_script=args.dali_script.resolve() if args.dali_script else None,
            curve=args.curve,
            mixture=args.mixture,
            targets=args.targets,
        )
    except ValueError as exc:
        print(f"stoker bench: {exc}", file=sys.stderr)
        return 2
    result = run_bench(config, progress=sys.stderr.isatty() or not args.json)
    print(dump_json(result) if args.json else format_table(result))
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from stoker.server.tools.status import fetch_status, format_status

    token = os.environ.get("STOKER_HTTP_TOKEN") or None
    try:
        if args.token_file:
            token = Path(args.token_file).read_text().strip()
        status = fetch_status(args.url, token=token)
    except OSError as exc:
        print(f"stoker status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _keys(args: argparse.Namespace) -> int:
    # Only pyzmq: a trainer with the client alone (pip install stoker) makes its own key pair.
    from stoker.client.protocol.keys import generate

    try:
        public, secret = generate(args.folder, args.name, overwrite=args.force)
    except (OSError, ValueError) as exc:
        print(f"stoker keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"public key (give it to the other side): {public}")
    print(f"secret key (keep it, mode 0600):       {secret}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stoker`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "status":
            return _status(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "keys":
            return _keys(args)
    except ImportError as exc:
        print(f"stoker {args.command}: {exc}. The server side needs: pip install 'stoker[server]'", file=sys.stderr)
        return 2
    return 2
