"""A small LightningModule fit on stoker's batches with ``Trainer(strategy="ddp", accelerator="cpu")``,
run by the tests as a script (Lightning starts the other ranks by running it again).

    python lightning_fit.py ENDPOINT WORKDIR DEVICES MAX_EPOCHS MAX_STEPS [RESUME_CHECKPOINT]

Lightning starts the ranks and the process group; ``RemoteBatches`` takes rank and world size from
it. The data position travels in the checkpoint through the module's ``on_save_checkpoint`` /
``on_load_checkpoint``. Each rank appends ``{"epoch", "step", "indices"}`` per training step to
``WORKDIR/seen-RANK.jsonl``; checkpoints go to ``WORKDIR/checkpoints`` every 2 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from stoker.client import RemoteBatches


class Classifier(L.LightningModule):
    def __init__(self, endpoint: str, workdir: Path) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 6)
        self.endpoint, self.workdir = endpoint, workdir
        self.batches: RemoteBatches | None = None
        self.data_state: dict[str, Any] | None = None

    def train_dataloader(self) -> RemoteBatches:
        self.batches = RemoteBatches(
            self.endpoint, "demo", batch_size=4, image_size=32, device="cpu", return_indices=True, timeout_s=60
        )
        if self.data_state is not None:
            self.batches.load_state_dict(self.data_state)
        return self.batches

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels, indices = batch
        line = {"epoch": self.current_epoch, "step": self.global_step + 1, "indices": indices.tolist()}
        with open(self.workdir / f"seen-{self.global_rank}.jsonl", "a") as log:
            log.write(json.dumps(line) + "\n")
        return nn.functional.cross_entropy(self.head(self.net(images)), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.batches is not None:
            checkpoint["stoker"] = self.batches.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_state = checkpoint.get("stoker")


def main() -> None:
    endpoint, workdir, devices, max_epochs, max_steps = sys.argv[1:6]
    resume = sys.argv[6] if len(sys.argv) > 6 else None
    workdir_path = Path(workdir)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=int(devices),
        max_epochs=int(max_epochs),
        max_steps=int(max_steps),
        callbacks=[
            ModelCheckpoint(
                dirpath=workdir_path / "checkpoints", filename="{step}", every_n_train_steps=2, save_top_k=-1
            )
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Classifier(endpoint, workdir_path), ckpt_path=resume)


if __name__ == "__main__":
    main()
