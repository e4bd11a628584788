"""Example trainer: a small conv net fed by stoker loaders, checkpointed with its data position.

Configured from the environment (what the compose file and the Kubernetes Job set):

- ``STOKER_ENDPOINTS``: comma-separated loader endpoints, ``tcp://HOST:PORT`` or ``dns+tcp://NAME:PORT``
  (every address NAME resolves to, re-resolved while running). Default ``tcp://127.0.0.1:5555``.
- ``STOKER_DATASET``: a dataset declared on the loaders (default ``data``).
- ``EPOCHS``: train until this many epochs are done in total, resumed ones included (default 1).
- ``CHECKPOINT``: checkpoint path (default ``/tmp/ckpt.pt``); resumed from when it exists.
- ``IMAGE_SIZE`` (64), ``BATCH_SIZE`` (16), ``MAX_STEPS`` (stop, checkpointed, after this many steps
  in this run; default: no limit).
- ``STOKER_SERVER_KEY`` (the loaders' public key: a ``NAME.key`` file or its Z85 text) and
  ``STOKER_CLIENT_KEY_FILE`` (this trainer's ``NAME.key_secret``), for loaders that require CURVE
  keys, as every deploy file here sets them up: read by ``RemoteBatches`` itself, not by this script.

SIGTERM (a pod being evicted, ``docker stop``) ends the run after the current step, checkpointed, so a
restart continues with the next batch: ``state_dict()`` of ``RemoteBatches`` records the position.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from stoker.client import RemoteBatches


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def build_model(classes: int) -> nn.Module:
    """A small conv net: enough to show the loop, cheap enough for a CPU."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, batches: RemoteBatches) -> None:
    """Model, optimizer and data position in one file, written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": batches.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main() -> int:
    endpoints = [e.strip() for e in os.environ.get("STOKER_ENDPOINTS", "tcp://127.0.0.1:5555").split(",") if e.strip()]
    dataset = os.environ.get("STOKER_DATASET", "data")
    epochs = _env_int("EPOCHS", 1)
    max_steps = _env_int("MAX_STEPS", 0)
    checkpoint = Path(os.environ.get("CHECKPOINT", "/tmp/ckpt.pt"))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))

    batches = RemoteBatches(
        endpoints,
        dataset,
        pipeline="train",
        image_size=_env_int("IMAGE_SIZE", 64),
        batch_size=_env_int("BATCH_SIZE", 16),
        seed=0,
        device=device,
        timeout_s=60.0,
    )
    with batches:
        print(
            f"loaders {','.join(endpoints)}: dataset {dataset!r}, {len(batches)} batches per epoch, "
            f"{len(batches.classes)} classes, device {device}",
            flush=True,
        )
        model = build_model(len(batches.classes)).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["data"])
            print(f"resumed from {checkpoint}: epoch {batches.epoch}, batch {state['data']['next_batch']}", flush=True)
        loss_fn = nn.CrossEntropyLoss()
        steps = 0
        for epoch in range(batches.epoch, epochs):
            batches.set_epoch(epoch)  # keeps a resumed mid-epoch position
            before, started = batches.stats(), time.monotonic()
            total_loss, seen = 0.0, 0
            for images, labels in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(labels)
                seen += len(labels)
                steps += 1
                if stop or (max_steps and steps >= max_steps):
                    break
            after, elapsed = batches.stats(), time.monotonic() - started
            waited = after["wait_s"] - before["wait_s"]
            print(
                f"epoch {epoch}: {seen} images, loss {total_loss / max(seen, 1):.4f}, "
                f"{seen / elapsed if elapsed > 0 else 0.0:.1f} images/s, "
                f"data wait {100 * waited / elapsed if elapsed > 0 else 0.0:.0f}% "
                f"(run so far: {100 * after['wait_share']:.0f}%)",
                flush=True,
            )
            save(checkpoint, model, optimizer, batches)
            if stop or (max_steps and steps >= max_steps):
                print(
                    f"stopping after {steps} steps; checkpoint {checkpoint} continues at epoch "
                    f"{batches.epoch}, batch {batches.state_dict()['next_batch']}",
                    flush=True,
                )
                return 0
        print(f"done: {epochs} epochs, checkpoint {checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
