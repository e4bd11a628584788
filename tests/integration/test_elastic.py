"""Elastic resume against a real server: a job saved on W1 ranks finishes its epoch on W2 ranks, each
sample exactly once and with the bytes an uninterrupted run gives it; later epochs plan for W2."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from stoker.client import RemoteBatches
from stoker.client.protocol.plan import batches_per_rank
from stoker.server.tools.measure import process_tree
from tests.helpers import Batch, fetch_epoch, open_client, wait_until

pytestmark = pytest.mark.slow

SAMPLES = 48  # the demo dataset
BATCH = 4


def take(batches: RemoteBatches, count: int | None = None) -> list[Batch]:
    """The next ``count`` batches of the current epoch (all that is left of it for ``None``)."""
    return list(islice(iter(batches), count))


def indices(batches: list[Batch]) -> list[int]:
    return [int(i) for batch in batches for i in batch[2]]


def by_index(batches: list[Batch]) -> dict[int, torch.Tensor]:
    return {int(i): image for images, _, idx in batches for image, i in zip(images, idx, strict=True)}


def resume(endpoint: str, state: dict | list[dict], world_size: int, rank: int, **options) -> RemoteBatches:
    client = open_client(endpoint, world_size=world_size, rank=rank, **options)
    client.load_state_dict(state)
    return client


def assert_each_sample_once(served: list[int], padding: int) -> None:
    """Every sample of the epoch served once, plus ``padding`` repeats (the last batches' padding)."""
    counts = Counter(served)
    assert set(counts) == set(range(SAMPLES)), f"missing {sorted(set(range(SAMPLES)) - set(counts))}"
    assert sum(counts.values()) - SAMPLES == padding, f"repeated: {sorted(i for i, c in counts.items() if c > 1)}"


def test_two_ranks_resume_on_three_and_then_on_one(cluster) -> None:
    server = cluster.start()
    endpoint = server.data
    reference = [fetch_epoch(endpoint, world_size=2, rank=r) for r in range(2)]
    reference_bytes = by_index([batch for rank in reference for batch in rank])

    # Two ranks train two steps each and checkpoint; the job comes back with three ranks.
    old = [open_client(endpoint, world_size=2, rank=r) for r in range(2)]
    before = [take(client, 2) for client in old]
    states = [client.state_dict() for client in old]
    for client in old:
        client.close()
    assert [s["next_batch"] for s in states] == [2, 2]
    served_before = indices([batch for rank in before for batch in rank])
    assert sorted(served_before) == sorted(indices([b for rank in reference for b in rank[:2]]))

    # Rank 0's state (saved with the model) or every rank's states: the same re-plan either way.
    new = [resume(endpoint, states[0] if r else states, 3, r) for r in range(3)]
    left = SAMPLES - 2 * 2 * BATCH
    assert [len(client) for client in new] == [batches_per_rank(left, BATCH, 3, False)] * 3 == [3, 3, 3]
    after = [take(client) for client in new]
    assert len({len(rank) for rank in after}) == 1, "every new rank gets as many batches"
    assert_each_sample_once(served_before + indices([b for rank in after for b in rank]), padding=33 - left)
    for index, image in by_index([b for rank in after for b in rank]).items():
        assert torch.equal(image, reference_bytes[index]), f"sample {index} changed bytes after the resize"

    # The resumed epoch is over: the next one is planned for three ranks from its start.
    assert all(client.epoch == 1 for client in new)
    assert [len(client) for client in new] == [4, 4, 4]
    following = [take(client) for client in new]
    assert_each_sample_once(indices([b for rank in following for b in rank]), padding=0)
    for client in new:
        client.close()

    # Again from the two-rank checkpoint: three ranks take one step each, and one rank finishes.
    three = [resume(endpoint, states[0], 3, r) for r in range(3)]
    middle = [take(client, 1) for client in three]
    three_state = three[1].state_dict()  # any rank's state describes the job
    for client in three:
        client.close()
    with resume(endpoint, three_state, 1, 0) as alone:
        assert len(alone) == batches_per_rank(left - 3 * BATCH, BATCH, 1, False) == 5
        rest = take(alone)
        assert alone.epoch == 1
    served = served_before + indices([b for rank in middle for b in rank]) + indices(rest)
    assert_each_sample_once(served, padding=0)
    for index, image in by_index(rest).items():
        assert torch.equal(image, reference_bytes[index])


def test_a_resume_that_drops_the_last_batch_keeps_drop_last(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, world_size=3, rank=0, drop_last=True) as first:
        take(first, 1)
        state = first.state_dict()
    # 48 - 12 = 36 left; on 5 ranks of 4, one global batch of 20: 16 samples are dropped.
    ranks = [resume(server.data, state, 5, r, drop_last=True) for r in range(5)]
    assert [len(client) for client in ranks] == [1] * 5
    served = indices([b for client in ranks for b in take(client)])
    assert len(served) == len(set(served)) == 20
    for client in ranks:
        client.close()


def test_states_that_disagree_on_the_position_are_refused() -> None:
    clients = [RemoteBatches("tcp://127.0.0.1:1", "demo", world_size=2, rank=r, device="cpu") for r in range(2)]
    states = [client.state_dict() for client in clients]
    states[1]["next_batch"] = 3
    with pytest.raises(ValueError, match="disagree"):
        RemoteBatches("tcp://127.0.0.1:1", "demo", world_size=3, rank=0, device="cpu").load_state_dict(states)
    states[1] = dict(states[0], rank=0)
    with pytest.raises(ValueError, match="rank 0 twice"):
        RemoteBatches("tcp://127.0.0.1:1", "demo", world_size=3, rank=0, device="cpu").load_state_dict(states)
    with pytest.raises(ValueError, match="batch_size"):
        RemoteBatches("tcp://127.0.0.1:1", "demo", batch_size=8, device="cpu").load_state_dict(states[0])


ELASTIC = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "torchrun_elastic.py"


def torchrun(ranks: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``torchrun --standalone --nproc-per-node=RANKS`` of the elastic example."""
    launcher = Path(sys.executable).parent / "torchrun"
    command = [str(launcher) if launcher.exists() else shutil.which("torchrun") or "torchrun"]
    command += ["--standalone", f"--nproc-per-node={ranks}", str(ELASTIC)]
    with open(log, "ab") as out:
        return subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=out)


def kill_tree(process: subprocess.Popen[bytes], signum: int) -> None:
    """Signal torchrun and every process under it (its workers run in sessions of their own)."""
    for pid in reversed(list(process_tree(process.pid))):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def steps_logged(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("rank-*.jsonl")) for line in path.read_text().splitlines()]


def test_torchrun_job_killed_on_two_ranks_resumes_on_three_exactly_once(cluster, tmp_path: Path) -> None:
    server = cluster.start()
    checkpoint, first_log, second_log = tmp_path / "ckpt.pt", tmp_path / "run1", tmp_path / "run2"
    first_log.mkdir(), second_log.mkdir()
    env = {
        "STOKER_ENDPOINTS": server.data,
        "STOKER_DATASET": "demo",
        "CHECKPOINT": str(checkpoint),
        "CHECKPOINT_EVERY": "2",
        "EPOCHS": "8",
        "BATCH_SIZE": "1",
        "IMAGE_SIZE": "96",
        "OMP_NUM_THREADS": "1",
    }
    first = torchrun(2, env | {"SEEN_LOG": str(first_log)}, tmp_path / "torchrun-1.log")
    try:
        # Crash the job mid-run, a step after its first checkpoint: freeze every rank, then kill them.
        wait_until(
            lambda: len(steps_logged(first_log)) >= 2 * 3 or first.poll() is not None, timeout_s=180, what="3 steps"
        )
        kill_tree(first, signal.SIGSTOP)
        assert first.poll() is None, (tmp_path / "torchrun-1.log").read_text()[-3000:]
    finally:
        kill_tree(first, signal.SIGKILL)
        first.wait(30)
    saved = torch.load(checkpoint, weights_only=True)
    committed = [line for line in steps_logged(first_log) if line["step"] <= saved["step"]]
    assert sorted(line["step"] for line in committed) == sorted(list(range(1, saved["step"] + 1)) * 2), "both ranks"

    second = torchrun(3, env | {"SEEN_LOG": str(second_log)}, tmp_path / "torchrun-2.log")
    assert second.wait(240) == 0, (tmp_path / "torchrun-2.log").read_text()[-3000:]
    resumed = steps_logged(second_log)
    assert len(resumed) % 3 == 0 and resumed, "every new rank takes the same steps"
    data = saved["data"]
    assert data["job"]["world_size"] == 2 and data["epoch"] < 8
    for epoch in range(8):
        served = [i for line in committed + resumed if line["epoch"] == epoch for i in line["indices"]]
        if epoch == data["epoch"] and data["next_batch"] > 0:  # resumed mid-epoch: the rest over 3 ranks
            left = SAMPLES - data["next_batch"] * 2
            padding = -(-left // 3) * 3 - left
        else:  # whole epochs on 2 or on 3 ranks: 48 divides evenly
            padding = 0
        assert_each_sample_once(served, padding)


LIGHTNING_FIT = Path(__file__).resolve().parents[1] / "scripts" / "lightning_fit.py"


def lightning_fit(endpoint: str, workdir: Path, max_steps: int, resume: Path | None = None) -> list[dict]:
    """Fit the test module with ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` for up to
    three epochs; the steps each rank logged."""
    workdir.mkdir()
    command = [sys.executable, str(LIGHTNING_FIT), endpoint, str(workdir), "2", "3", str(max_steps)]
    result = subprocess.run(
        [*command, *([str(resume)] if resume else [])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for path in sorted(workdir.glob("seen-*.jsonl")) for line in path.read_text().splitlines()]


def test_lightning_ddp_fits_three_epochs_exactly_once_and_resumes_from_its_checkpoint(cluster, tmp_path) -> None:
    pytest.importorskip("lightning")
    server = cluster.start()
    # Stopped after 9 steps (an epoch is 6 steps of 4 samples on each of 2 ranks); checkpoints every 2.
    first = lightning_fit(server.data, tmp_path / "first", max_steps=9)
    checkpoint = tmp_path / "first" / "checkpoints" / "step=8.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["stoker"]
    assert (saved["epoch"], saved["next_batch"], saved["job"]["world_size"]) == (1, 2, 2)
    second = lightning_fit(server.data, tmp_path / "second", max_steps=-1, resume=checkpoint)
    steps = [line for line in first if line["step"] <= 8] + second
    for epoch in range(3):
        assert_each_sample_once([i for line in steps if line["epoch"] == epoch for i in line["indices"]], padding=0)
