"""Targets beyond the class label on a real server: COCO boxes moved exactly like the image (checked
against torchvision v2's own transform of ``BoundingBoxes`` under the same crop), masks aligned with
their image through crops, flips and a ``RandomRotation``, image-text shards written by ``webdataset``
with every caption on its image exactly once over 2 ranks, byte-identical targets across worker counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stoker.client import BadSampleError, InvalidJobError
from stoker.client.protocol.plan import sample_seed
from stoker.server.imaging.decode import probe
from stoker.server.imaging.pipelines import pipeline_from_ops
from stoker.server.imaging.render import plan_views
from tests.helpers import DEMO_DATA, LIMITS, Cluster, fetch_epoch, fetch_epochs, http_json, interrupted_epoch
from tests.targets_data import broken_datasets, caption_shards, coco_dataset, key_of_colour, square_dataset

pytestmark = pytest.mark.slow

PHOTOS = sorted((DEMO_DATA / "scenes").glob("*.jpg"))[:6]
DETECTION_OPS = {
    "detect": [{"op": "random_resized_crop", "scale": [0.3, 1.0]}, {"op": "hflip"}],
    "yolo": [{"op": "letterbox", "fill": 114}, {"op": "hflip"}],
}
CONFIG = """
[pipelines.detect]
ops = [{{op = "random_resized_crop", scale = [0.3, 1.0]}}, {{op = "hflip"}}]

[pipelines.yolo]
ops = [{{op = "letterbox", fill = 114}}, {{op = "hflip"}}]

[pipelines.rotate]
ops = [
  {{op = "random_resized_crop", scale = [0.5, 1.0]}}, {{op = "hflip"}},
  {{op = "torchvision.RandomRotation", degrees = 25}},
]

[datasets.coco]
kind = "coco"
path = "{coco}"
root = "{root}"

[datasets.squares]
path = "{squares}"
targets = {{mask = "mask", caption = "text"}}
cache = true

[datasets.pairs]
path = "{pairs}"
targets = {{caption = "txt", meta = "json"}}

[datasets.broken_rows]
path = "{broken_rows}"
targets = {{mask = "mask", caption = "text", boxes = "boxes"}}

[datasets.broken_pairs]
path = "{broken_pairs}"
targets = {{caption = "txt", meta = "json"}}

[datasets.broken_coco]
kind = "coco"
path = "{broken_coco}"
root = "{root}"
"""
OPTIONS = dict(batch_size=4, image_size=48, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path | str]:
    folder = tmp_path_factory.mktemp("targets")
    squares = square_dataset(folder / "squares")
    broken = broken_datasets(folder / "broken", squares.parent, PHOTOS, DEMO_DATA)
    return {
        "folder": folder,
        "coco": coco_dataset(folder, PHOTOS, DEMO_DATA),
        "squares": squares,
        "pairs": caption_shards(folder / "pairs"),
        "broken_rows": broken["manifest"],
        "broken_pairs": broken["shards"],
        "broken_coco": broken["coco"],
        "bad": broken["bad"],
        "bad_indices": {"broken_rows": [1, 2, 3, 4, 6], "broken_pairs": [1, 2, 3], "broken_coco": [2]},
    }


@pytest.fixture(scope="module")
def servers(data) -> tuple:
    folder = data["folder"]
    config = folder / "stoker.toml"
    paths = {name: data[name] for name in ("coco", "squares", "pairs", "broken_rows", "broken_pairs", "broken_coco")}
    config.write_text(CONFIG.format(root=DEMO_DATA, **paths))
    cluster = Cluster(folder)
    try:
        yield (
            cluster.start("--config", str(config), "--cache-bytes", "64MiB", datasets={}, workers=1),
            cluster.start("--config", str(config), datasets={}, workers=2),
        )
    finally:
        cluster.close()


def torchvision_boxes(boxes: torch.Tensor, photo: Path, index: int, pipeline: str, size: int) -> torch.Tensor:
    """The boxes torchvision v2 gives for the same crop parameters as the server planned."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    data = photo.read_bytes()
    info = probe(data, LIMITS)
    declared = pipeline_from_ops(pipeline, DETECTION_OPS[pipeline])
    plan, _ = plan_views(info, sample_seed(OPTIONS["seed"], 0, index), declared, size)[0]
    out = tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(info.height, info.width))
    out = F.convert_bounding_box_format(out, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    left, top, right, bottom = plan.box
    out = F.resized_crop(out, top, left, bottom - top, right - left, list(plan.resize))
    if plan.crop is not None:  # letterbox: the padding torchvision's Pad adds
        c_left, c_top, c_right, c_bottom = plan.crop
        out = F.pad(out, [-c_left, -c_top, c_right - plan.resize[1], c_bottom - plan.resize[0]])
    if plan.flip:
        out = F.horizontal_flip(out)
    return F.clamp_bounding_boxes(out).as_subclass(torch.Tensor)


@pytest.mark.parametrize("pipeline", ["detect", "yolo"])
def test_coco_boxes_match_torchvision_under_the_same_crop(servers, data, pipeline: str) -> None:
    one, two = servers
    document = json.loads(Path(data["coco"]).read_text())
    batches = fetch_epoch(one.data, "coco", pipeline=pipeline, targets=["boxes"], **OPTIONS)
    seen = 0
    for images, targets, indices in batches:
        assert images.shape[1:] == (3, 48, 48)
        assert set(targets) == {"boxes", "box_labels"}
        for row, index in enumerate(indices.tolist()):
            entry = document["images"][index]
            annotations = [a for a in document["annotations"] if a["image_id"] == entry["id"] and not a.get("iscrowd")]
            source = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
            classes = torch.tensor([a["category_id"] for a in annotations])
            expected = torchvision_boxes(source, DEMO_DATA / entry["file_name"], index, pipeline, 48)
            kept = ((expected[:, 2] - expected[:, 0]) * (expected[:, 3] - expected[:, 1])) > 0
            got = targets["boxes"][row]
            assert got.dtype == torch.float32 and got.shape == (int(kept.sum()), 4)
            assert torch.allclose(got, expected[kept], atol=0.5), (got, expected[kept])
            assert torch.equal(targets["box_labels"][row], classes[kept]), "dropped boxes drop their classes"
            seen += 1
    assert seen == len(PHOTOS)
    again = fetch_epoch(two.data, "coco", pipeline=pipeline, targets=["boxes"], **OPTIONS)
    for (i1, t1, _), (i2, t2, _) in zip(batches, again, strict=True):
        assert torch.equal(i1, i2)
        assert all(torch.equal(a, b) for a, b in zip(t1["boxes"], t2["boxes"], strict=True)), "1 vs 2 workers"


def test_masks_stay_aligned_through_crops_flips_and_rotation(servers) -> None:
    one, two = servers
    options = {**OPTIONS, "image_size": 64}  # at 48 px a square's edge pixel is too much of its area
    # Server one keeps the squares in its decoded-sample cache: its second epoch renders from it.
    epochs = fetch_epochs(one.data, 2, "squares", pipeline="rotate", targets="all", **options)
    batches = epochs[0] + epochs[1]
    count = 0
    for images, targets, indices in batches:
        mask = targets["mask"]
        assert mask.dtype == torch.uint8 and mask.shape == (images.shape[0], 64, 64)
        assert targets["caption"] == [f"square {i}" for i in indices.tolist()]
        for row, index in enumerate(indices.tolist()):
            image = images[row].int()
            red = (image[0] - image[1]) > 127  # more than half red: R - G is 255 x the red share of a blend
            foreground = mask[row] > 0
            assert set(mask[row].unique().tolist()) <= {0, 1 + index % 3}, "nearest: classes never blend"
            union = (red | foreground).sum().item()
            if union == 0:
                continue  # the crop missed the square: nothing to compare
            iou = (red & foreground).sum().item() / union
            assert iou >= 0.95, f"sample {index}: IoU {iou:.3f}"
            count += 1
    assert count >= 8
    again = fetch_epochs(two.data, 2, "squares", pipeline="rotate", targets="all", **options)
    for a, b in zip(batches, again[0] + again[1], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["mask"], b[1]["mask"]), "cached or not, 1 or 2 workers"
        assert a[1]["caption"] == b[1]["caption"]
    assert http_json(one.http + "/status")[1]["cache"]["hits"] >= 8, "the second epoch rendered from the cache"


def test_image_text_shards_every_caption_with_its_image_exactly_once_over_two_ranks(servers) -> None:
    one, two = servers
    keys = []
    for rank, server in enumerate((one, two)):
        for images, targets, _ in fetch_epoch(
            server.data, "pairs", pipeline="resize", targets=["caption", "meta"], rank=rank, world_size=2, **OPTIONS
        ):
            for row, caption in enumerate(targets["caption"]):
                key = int(caption.rsplit(" ", 1)[1])
                assert targets["meta"][row] == {"key": key, "tags": ["flat", "colour"]}
                assert key_of_colour(images[row][0].float().mean().item()) == key, "the caption is its image's"
                keys.append(key)
    assert sorted(keys) == list(range(12)), "every sample exactly once over 2 ranks"


def test_without_targets_the_client_yields_labels_as_always(servers) -> None:
    one, _ = servers
    images, labels, indices = fetch_epoch(one.data, "pairs", pipeline="resize", **OPTIONS)[0]
    assert labels.dtype == torch.int64 and labels.tolist() == [-1] * len(indices)
    with pytest.raises(InvalidJobError, match="no target 'nope'"):
        fetch_epoch(one.data, "pairs", pipeline="resize", targets=["nope"], **OPTIONS)


def test_a_resumed_epoch_carries_the_same_targets(servers) -> None:
    one, two = servers
    options = dict(pipeline="detect", targets="all", **OPTIONS)
    whole = fetch_epoch(one.data, "coco", **options)
    resumed = interrupted_epoch(two.data, "coco", stop_after=1, **options)
    assert len(whole) == len(resumed)
    for (xa, ta, ia), (xb, tb, ib) in zip(whole, resumed, strict=True):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
        assert all(torch.equal(a, b) for a, b in zip(ta["boxes"], tb["boxes"], strict=True))


@pytest.mark.parametrize("dataset", ["broken_rows", "broken_pairs", "broken_coco"])
def test_bad_targets_are_skipped_or_raised_by_policy_and_named_in_status(servers, data, dataset: str) -> None:
    one, _ = servers
    bad = data["bad"][dataset]
    pipeline = "detect" if dataset != "broken_pairs" else "resize"
    delivered = []
    for _, targets, indices in fetch_epoch(one.data, dataset, pipeline=pipeline, targets="all", **OPTIONS):
        delivered += indices.tolist()
        if "caption" in targets:
            assert all(isinstance(caption, str) for caption in targets["caption"])
    status = http_json(one.http + "/status")[1]
    reasons = {entry["path"]: entry["reason"] for entry in status["bad_samples"]["recent"]}
    for name, word in bad.items():
        (path,) = [path for path in reasons if path.endswith(name)]
        assert word in reasons[path], (name, reasons[path])
    assert not set(delivered) & set(data["bad_indices"][dataset]), "no bad target is ever delivered"
    assert http_json(one.http + "/config", "PATCH", {"on_error": "raise"})[0] == 200
    try:
        with pytest.raises(BadSampleError) as info:
            fetch_epoch(one.data, dataset, pipeline=pipeline, targets="all", **{**OPTIONS, "seed": 11})
        assert any(info.value.path.endswith(name) for name in bad) and info.value.reason
    finally:
        assert http_json(one.http + "/config", "PATCH", {"on_error": "skip"})[0] == 200
