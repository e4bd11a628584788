"""Bad samples: skipped with deterministic stand-ins (batches keep their shape), or raised with the
path; counted, listed with reasons in /status, and never decoded twice."""

from __future__ import annotations

import pytest
import torch
from torchvision.datasets import ImageFolder

from stoker.client import BadSampleError
from tests.helpers import fetch_epochs, http_json, make_bad_dataset, metrics, open_client

pytestmark = pytest.mark.slow


def test_skip_replaces_bad_samples_deterministically_and_reports_them(cluster, tmp_path) -> None:
    root, bad_names = make_bad_dataset(tmp_path / "mixed")
    server = cluster.start(datasets={"mixed": root})
    other = cluster.start(datasets={"mixed": root}, workers=1)
    samples = ImageFolder(str(root)).samples
    bad_indices = {i for i, (path, _) in enumerate(samples) if path.rsplit("/", 1)[1] in bad_names}
    assert len(bad_indices) == 5 and len(samples) == 35

    options = dict(batch_size=6, image_size=48, seed=1)
    with open_client(server.data, "mixed", **options) as batches:
        epochs = [list(batches)]
        # Batches in flight together may both meet a file before it is known bad; never a later epoch.
        decoded_bad = metrics(server.http)["stoker_samples_decoded_total|outcome=bad"]
        assert 5 <= decoded_bad <= 7
        epochs.append(list(batches))
        assert metrics(server.http)["stoker_samples_decoded_total|outcome=bad"] == decoded_bad
    for epoch in epochs:
        assert [len(idx) for _, _, idx in epoch] == [6] * 5 + [5], "batches keep their shape"
        returned = [int(i) for _, _, idx in epoch for i in idx]
        assert not bad_indices & set(returned), "no bad sample is ever delivered"
        assert set(range(35)) - bad_indices <= set(returned), "every good sample is delivered"
    status = http_json(server.http + "/status")[1]
    assert status["bad_samples"]["count"] == 5
    listed = {b["path"].rsplit("/", 1)[1]: b["reason"] for b in status["bad_samples"]["recent"]}
    assert set(listed) == set(bad_names)
    assert "empty file" in listed["zero_bytes.jpg"]
    assert "corrupt" in listed["corrupt_scan_data_coffee.jpg"]
    assert "not a decodable image" in listed["text_file.jpg"]
    assert metrics(server.http)["stoker_bad_samples_total|dataset=mixed"] == 5

    # Another server (one worker, no knowledge of the bad files) makes the same stand-ins, same bytes.
    again = fetch_epochs(other.data, 2, "mixed", **options)
    for mine, theirs in zip(epochs, again, strict=True):
        for (xa, ya, ia), (xb, yb, ib) in zip(mine, theirs, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_raise_policy_fails_the_batch_with_the_path(cluster, tmp_path) -> None:
    root, bad_names = make_bad_dataset(tmp_path / "mixed")
    server = cluster.start("--on-error", "raise", datasets={"mixed": root})
    with pytest.raises(BadSampleError) as info:
        fetch_epochs(server.data, 1, "mixed", batch_size=6, image_size=32, seed=1)
    error = info.value
    assert error.path.rsplit("/", 1)[1] in bad_names and error.reason
    assert error.path in str(error)
    assert http_json(server.http + "/status")[1]["errors"]["BAD_SAMPLE"] >= 1


def test_policy_can_change_live(cluster, tmp_path) -> None:
    root, _ = make_bad_dataset(tmp_path / "mixed")
    server = cluster.start("--on-error", "raise", datasets={"mixed": root})
    with pytest.raises(BadSampleError):
        fetch_epochs(server.data, 1, "mixed", batch_size=6, image_size=32)
    assert http_json(server.http + "/config", "PATCH", {"on_error": "skip"})[0] == 200
    (epoch,) = fetch_epochs(server.data, 1, "mixed", batch_size=6, image_size=32)
    assert sum(len(idx) for _, _, idx in epoch) == 35
