"""A few DDP training steps of a plain ResNet-18 fed by stoker, run by the tests under torchrun.

    torchrun --nproc-per-node=2 ddp_steps.py ENDPOINT STEPS [channels_last]

Rank and world size come from torchrun's environment (RemoteBatches reads them from the process
group). Prints one JSON line per rank: the sample indices it trained on.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torchvision

from stoker.client import RemoteBatches


def main() -> None:
    endpoint, steps = sys.argv[1], int(sys.argv[2])
    layout = torch.channels_last if "channels_last" in sys.argv[3:] else torch.contiguous_format
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torchvision.models.resnet18(num_classes=6))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: list[int] = []
    with RemoteBatches(
        endpoint, "demo", batch_size=4, image_size=64, device="cpu", return_indices=True, memory_format=layout
    ) as batches:
        for step, (images, labels, indices) in enumerate(batches):
            if step == steps:
                break
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimiser.step()
            seen += indices.tolist()
    print(json.dumps({"rank": dist.get_rank(), "indices": seen}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
