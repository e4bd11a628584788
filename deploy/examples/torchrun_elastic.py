"""Elastic DDP training fed by stoker: checkpoint the model and the data position together, resume on
any number of ranks.

    torchrun --nproc-per-node=2 deploy/examples/torchrun_elastic.py     # killed or preempted ...
    torchrun --nproc-per-node=3 deploy/examples/torchrun_elastic.py     # ... resumes on 3 ranks

Rank and world size come from torchrun (``RemoteBatches`` reads them from the process group). Every
``CHECKPOINT_EVERY`` steps rank 0 writes one file with the model, the optimizer and the data
position: in DDP every rank is at the same step, so rank 0's ``state_dict()`` describes the whole
job. On start, every rank loads it; ``load_state_dict`` re-plans what the old ranks had left of the
epoch over the new ranks, so each sample of the epoch is trained on exactly once however many ranks
come back. Uses gloo on CPU, nccl on GPU.

Configured from the environment:

- ``STOKER_ENDPOINTS`` (comma-separated, default ``tcp://127.0.0.1:5555``), ``STOKER_DATASET`` (``data``)
- ``CHECKPOINT`` (``/tmp/elastic.pt``), ``CHECKPOINT_EVERY`` (steps, default 10), ``EPOCHS`` (1)
- ``IMAGE_SIZE`` (64), ``BATCH_SIZE`` (8), ``MAX_STEPS`` (stop after this many steps in this run; 0: no limit)
- ``SEEN_LOG``: a folder; each rank appends ``{"step", "epoch", "indices"}`` to ``rank-N.jsonl``
  there as each step starts (what the tests check exactly-once with: a step up to the checkpoint's
  is in every rank's log, since rank 0 saves only after every rank took part in that step)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from stoker.client import RemoteBatches


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def build_model(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def save(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, batches: RemoteBatches) -> None:
    """Rank 0 writes model, optimizer, data position and step in one file, atomically."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": batches.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    endpoints = [e.strip() for e in os.environ.get("STOKER_ENDPOINTS", "tcp://127.0.0.1:5555").split(",") if e.strip()]
    checkpoint = Path(os.environ.get("CHECKPOINT", "/tmp/elastic.pt"))
    every, epochs, max_steps = _env_int("CHECKPOINT_EVERY", 10), _env_int("EPOCHS", 1), _env_int("MAX_STEPS", 0)
    seen_log = os.environ.get("SEEN_LOG")
    batches = RemoteBatches(
        endpoints,
        os.environ.get("STOKER_DATASET", "data"),
        image_size=_env_int("IMAGE_SIZE", 64),
        batch_size=_env_int("BATCH_SIZE", 8),
        device=device,
        return_indices=True,
    )
    with batches:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(build_model(len(batches.classes)).to(device))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = 0
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            model.module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["data"])  # saved by any number of ranks: re-planned here
            step = state["step"]
            if rank == 0:
                left = len(batches)
                print(f"resumed at step {step}: epoch {batches.epoch}, {left} batches left per rank", flush=True)
        log = open(Path(seen_log) / f"rank-{rank}.jsonl", "a") if seen_log else None  # noqa: SIM115
        run_steps = 0
        try:
            for epoch in range(batches.epoch, epochs):
                batches.set_epoch(epoch)
                for images, labels, indices in batches:
                    step, run_steps = step + 1, run_steps + 1
                    if log is not None:  # before the step: a step in a checkpoint is always in every log
                        log.write(json.dumps({"step": step, "epoch": epoch, "indices": indices.tolist()}) + "\n")
                        log.flush()
                    optimizer.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(images), labels).backward()
                    optimizer.step()
                    if step % every == 0 and rank == 0:
                        save(checkpoint, step, model.module, optimizer, batches)
                    if max_steps and run_steps >= max_steps:
                        return
            if rank == 0:
                save(checkpoint, step, model.module, optimizer, batches)
                print(f"done: {epochs} epochs, {step} steps", flush=True)
        finally:
            if log is not None:
                log.close()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
