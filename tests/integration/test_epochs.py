"""DESIGN invariants 1-3 against real servers: exactly once, reproducible, resumable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from stoker.client.protocol.plan import permutation
from tests.helpers import DEMO_DATA, LIMITS, fetch_epoch, open_client

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("batch_size", "drop_last"), [(5, False), (4, True), (7, False)])
def test_three_ranks_cover_an_epoch_exactly_once(cluster, batch_size: int, drop_last: bool) -> None:
    server = cluster.start()
    per_rank = {
        rank: fetch_epoch(
            server.data, image_size=32, batch_size=batch_size, drop_last=drop_last, rank=rank, world_size=3, seed=11
        )
        for rank in range(3)
    }
    counts = {rank: len(batches) for rank, batches in per_rank.items()}
    assert len(set(counts.values())) == 1, f"ranks got different batch counts: {counts}"
    seen = Counter(int(i) for batches in per_rank.values() for _, _, idx in batches for i in idx)
    if drop_last:
        assert all(len(idx) == batch_size for b in per_rank.values() for _, _, idx in b)
        assert sum(seen.values()) == (48 // (batch_size * 3)) * batch_size * 3
        assert max(seen.values()) == 1
    else:
        assert set(seen) == set(range(48)) and max(seen.values()) == 1  # 48 = 3 x 16: no padding
    targets = ImageFolder(str(DEMO_DATA)).targets
    for batches in per_rank.values():
        for images, labels, indices in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert labels.tolist() == [targets[i] for i in indices.tolist()]


def test_padding_follows_distributed_sampler_when_samples_do_not_divide(cluster, tmp_path: Path) -> None:
    images = sorted(DEMO_DATA.rglob("*.jpg"))[:47]
    listing = tmp_path / "list.csv"
    listing.write_text("".join(f"{p},{i % 3}\n" for i, p in enumerate(images)))
    server = cluster.start(datasets={"list": listing})
    per_rank = [fetch_epoch(server.data, "list", image_size=16, batch_size=6, world_size=2, rank=r) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 24 samples per rank: 6 + 6 + 6 + 6
    seen = Counter(int(i) for batches in per_rank for _, _, idx in batches for i in idx)
    assert set(seen) == set(range(47)) and sum(seen.values()) == 48  # one padded sample


def test_batches_are_byte_identical_whatever_the_worker_count(cluster) -> None:
    one, two = cluster.start(workers=1), cluster.start(workers=2)
    for epoch in (0, 3):
        options = dict(image_size=48, batch_size=8, seed=5, world_size=2, rank=1)
        a = fetch_epoch(one.data, epoch=epoch, **options)
        b = fetch_epoch(two.data, epoch=epoch, **options)
        assert len(a) == len(b) == 3
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb)
            assert torch.equal(xa, xb), "same job, epoch and rank must give the same bytes"
    assert not torch.equal(
        fetch_epoch(one.data, epoch=0, **options)[0][0], fetch_epoch(one.data, epoch=1, **options)[0][0]
    )


def test_state_dict_resumes_with_exactly_the_remaining_batches(cluster) -> None:
    server = cluster.start()
    options = dict(image_size=32, batch_size=5, seed=3)
    with open_client(server.data, **options) as reference:
        full = [list(reference), list(reference)]  # epochs 0 and 1
    with open_client(server.data, **options) as first:
        taken = []
        for batch in first:
            taken.append(batch)
            if len(taken) == 4:
                state = first.state_dict()
                break
    assert state["epoch"] == 0 and state["next_batch"] == 4
    with open_client(server.data, **options) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # a training loop's set_epoch must not undo the resume
        rest = list(resumed)
        following = list(resumed)
    assert len(taken) + len(rest) == len(full[0]) == 10
    for got, want in zip(taken + rest, full[0], strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    for got, want in zip(following, full[1], strict=True):
        assert torch.equal(got[0], want[0])


def test_state_dict_of_another_job_is_refused(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, batch_size=4) as a:
        state = a.state_dict()
    with open_client(server.data, batch_size=8) as b:
        with pytest.raises(ValueError, match="batch_size"):
            b.load_state_dict(state)


def test_normalized_channels_last_float_output_and_stats(cluster) -> None:
    server = cluster.start()
    # The trainer's defaults, not the tests': normalised float images and (images, labels) pairs.
    options = dict(batch_size=16, image_size=64, normalize=True, return_indices=False)
    with open_client(server.data, memory_format=torch.channels_last, **options) as b:
        assert len(b) == 3
        images, labels = next(iter(b))
        stats = b.stats()
    assert images.dtype == torch.float32 and images.shape == (16, 3, 64, 64)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    assert -3.0 < images.mean().item() < 3.0
    assert stats["batches"] == 1 and stats["images"] == 16 and stats["bytes"] == 16 * 64 * 64 * 3
    assert 0.0 <= stats["wait_share"] <= 1.0 and stats["wait_s"] > 0
    # The default layout is a DataLoader's: contiguous NCHW, normalised or not, with the same values.
    with open_client(server.data, **options) as b:
        default, _ = next(iter(b))
    assert default.is_contiguous() and torch.equal(default, images.contiguous())
    with open_client(server.data, **(options | {"normalize": False})) as b:
        raw, _ = next(iter(b))
    assert raw.dtype == torch.uint8 and raw.is_contiguous()
    with pytest.raises(ValueError, match="memory_format"):
        open_client(server.data, memory_format=torch.channels_last_3d)


def test_dataloader_wrapping_batch_size_none(cluster) -> None:
    server = cluster.start()
    with open_client(server.data, batch_size=8, image_size=32, shuffle=False) as batches:
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        got = list(loader)
        assert len(got) == len(batches) == 6
        assert torch.cat([idx for _, _, idx in got]).tolist() == list(range(48))  # shuffle=False keeps order
        # Two DataLoader workers share the epoch by batch number and DataLoader restores the order.
        batches.set_epoch(0)
        parallel = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
        assert [idx.tolist() for _, _, idx in parallel] == [idx.tolist() for _, _, idx in got]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(parallel, got, strict=True))


def test_taking_exactly_len_batches_finishes_each_epoch(cluster) -> None:
    """Loops that take exactly ``len()`` batches per epoch (PyTorch Lightning, ``for step in
    range(len(loader))``) never resume the iterator after the last batch; each epoch must still end
    there, so the next one is served in full, directly and through ``DataLoader(batch_size=None)``."""
    server = cluster.start()
    seed = 13
    with open_client(server.data, batch_size=8, image_size=16, seed=seed) as batches:
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        epochs, states = [], []
        for source in [batches] * 3 + [loader] * 3:
            epochs.append(_take_len(source))
            states.append(batches.state_dict())
    assert [(state["epoch"], state["next_batch"]) for state in states] == [(e, 0) for e in range(1, 7)]
    for epoch, indices in enumerate(epochs):
        assert len(indices) == 6
        served = [i for batch in indices for i in batch]
        assert sorted(served) == list(range(48)), f"epoch {epoch} is not every sample once"
        assert served == permutation(48, seed, epoch, shuffle=True).tolist(), f"epoch {epoch} is another epoch"


def _take_len(source) -> list[list[int]]:
    """One epoch as a ``len()``-bounded training loop takes it: the iterator is never run to its end."""
    iterator = iter(source)
    return [next(iterator)[2].tolist() for _ in range(len(source))]


def test_eval_pipeline_matches_torchvision_and_imagefolder(cluster) -> None:
    from torchvision import transforms

    server = cluster.start()
    reference = ImageFolder(
        str(DEMO_DATA), transform=transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    )
    batches = fetch_epoch(server.data, pipeline="eval", image_size=224, batch_size=16, shuffle=False)
    for images, labels, indices in batches:
        for image, label, index in zip(images, labels, indices.tolist(), strict=True):
            picture, target = reference[index]
            theirs = torch.from_numpy(np.array(picture)).permute(2, 0, 1).to(torch.int16)
            assert (image.to(torch.int16) - theirs).abs().float().mean().item() < 2.0
            assert label.item() == target


def test_breaking_out_and_iterating_again_continues_where_it_stopped(cluster) -> None:
    server = cluster.start()
    options = dict(image_size=16, batch_size=6, seed=9)
    with open_client(server.data, **options) as reference:
        epochs = [[idx.tolist() for _, _, idx in reference] for _ in range(2)]
    with open_client(server.data, **options) as batches:
        got = []
        for _, _, idx in batches:
            got.append(idx.tolist())
            if len(got) == 3:
                break
        got += [idx.tolist() for _, _, idx in batches]  # the rest of epoch 0
        assert batches.epoch == 1
        following = [idx.tolist() for _, _, idx in batches]
    assert got == epochs[0] and following == epochs[1]


def test_batches_over_16_mib_arrive_in_several_frames_in_order(cluster) -> None:
    from stoker.client.protocol.plan import sample_seed
    from stoker.server.imaging.pipelines import BUILTIN_PIPELINES
    from stoker.server.imaging.render import StageTimes, render_sample

    server = cluster.start()
    # 48 x 352 x 352 x 3 = 17.8 MB: two frames on the wire, gathered into one tensor.
    ((images, _, indices),) = fetch_epoch(
        server.data, batch_size=48, image_size=352, seed=4, memory_format=torch.channels_last
    )
    assert images.shape == (48, 3, 352, 352) and images.is_contiguous(memory_format=torch.channels_last)
    paths = [path for path, _ in ImageFolder(str(DEMO_DATA)).samples]
    for row in (0, 23, 47):  # first frame, boundary, second frame
        expected = np.zeros((352, 352, 3), np.uint8)
        index = int(indices[row])
        render_sample(
            paths[index].encode(),
            sample_seed(4, 0, index),
            BUILTIN_PIPELINES["train"],
            352,
            expected,
            LIMITS,
            StageTimes(),
        )
        assert torch.equal(images[row].permute(1, 2, 0), torch.from_numpy(expected)), row
