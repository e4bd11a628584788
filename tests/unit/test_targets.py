"""Targets without a server: declarations, shard members read with the sample (webdataset's own writer),
images-alone shards, boxes mapped like torchvision v2 maps ``BoundingBoxes`` under the same crop, masks
never blended, and job ids unchanged for jobs without targets."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.rng import SampleRng
from stoker.server.data.index_cache import IndexCache
from stoker.server.data.sharded import list_shards
from stoker.server.data.targets import resolve_targets
from stoker.server.imaging.decode import ImageInfo
from stoker.server.imaging.geometry import SampleGeometry, plan_geometry
from stoker.server.imaging.pipelines import View
from stoker.server.imaging.targets import BadTarget, RawTarget, parse_targets
from tests.targets_data import _jpeg, _png


def test_declared_targets_take_kinds_or_member_extensions() -> None:
    decls = {
        d.name: (d.kind, d.extension) for d in resolve_targets({"caption": "txt", "meta": "json", "seg": "seg.png"})
    }
    assert decls == {"caption": ("text", "txt"), "meta": ("json", "json"), "seg": ("mask", "seg.png")}
    assert {d.name: d.kind for d in resolve_targets({"mask": "mask", "caption": "text"})} == {
        "mask": "mask",
        "caption": "text",
    }
    with pytest.raises(ValueError, match="not a kind"):
        resolve_targets({"x": "docx"})
    with pytest.raises(ValueError, match="at most one"):
        resolve_targets({"a": "mask", "b": "png"})


def write_pairs(path: Path, labelled: bool, mask: bool = True) -> None:
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for key in range(3):
            sample = {
                "__key__": f"k{key}",
                "jpg": _jpeg(Image.new("RGB", (16, 12), (key, 0, 0))),
                "txt": f"caption {key}",
            }
            if mask:
                sample["seg.png"] = _png(Image.new("L", (16, 12), key))
            if labelled:
                sample["cls"] = str(key)
            sink.write(sample)


def test_shard_members_are_kept_with_their_sample_and_labels_are_optional(tmp_path: Path) -> None:
    write_pairs(tmp_path / "a.tar", labelled=False)
    targets = resolve_targets({"caption": "txt", "seg": "seg.png"})
    table = list_shards("pairs", str(tmp_path / "a.tar"), lambda n: None, IndexCache(str(tmp_path / "idx")), targets)
    assert len(table) == 3 and table.labels.tolist() == [-1, -1, -1]
    assert [table.targets["caption"].raw(i) for i in range(3)] == [b"caption 0", b"caption 1", b"caption 2"]
    locator = table.target_locator("seg", 2)
    with open(locator.target, "rb") as shard:
        shard.seek(locator.start)
        assert np.asarray(Image.open(__import__("io").BytesIO(shard.read(locator.length)))).max() == 2
    again = list_shards("pairs", str(tmp_path / "a.tar"), lambda n: None, IndexCache(str(tmp_path / "idx")), targets)
    assert getattr(again, "from_cache", False) and again.fingerprint == table.fingerprint
    assert again.targets["caption"].raw(1) == b"caption 1", "targets survive the index cache"
    # No targets declared and no .cls anywhere: images alone (self-supervised), not "unlabelled".
    write_pairs(tmp_path / "b.tar", labelled=False, mask=False)
    alone = list_shards("alone", str(tmp_path / "b.tar"), lambda n: None, IndexCache(None))
    assert len(alone) == 3 and not alone.targets


def test_a_png_mask_member_is_not_taken_for_a_second_image(tmp_path: Path) -> None:
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "m.tar")) as sink:
        sink.write({"__key__": "k", "jpg": _jpeg(Image.new("RGB", (8, 8))), "png": _png(Image.new("L", (8, 8)))})
    table = list_shards("m", str(tmp_path / "m.tar"), lambda n: None, IndexCache(None), resolve_targets({"m": "png"}))
    assert len(table) == 1 and table.member(0) == "k.jpg"


def torchvision_map(boxes: np.ndarray, plan, width: int, height: int) -> torch.Tensor:
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    out = tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width))
    left, top, right, bottom = plan.box
    out = F.resized_crop(out, top, left, bottom - top, right - left, list(plan.resize))
    if plan.crop is not None:
        c_left, c_top, c_right, c_bottom = plan.crop
        if c_left >= 0 and c_top >= 0:
            out = F.crop(out, c_top, c_left, c_bottom - c_top, c_right - c_left)
        else:
            out = F.pad(out, [-c_left, -c_top, c_right - plan.resize[1], c_bottom - plan.resize[0]])
    if plan.flip:
        out = F.horizontal_flip(out)
    return F.clamp_bounding_boxes(out).as_subclass(torch.Tensor)


@pytest.mark.parametrize("geometry", ["random_resized_crop", "resize_center_crop", "letterbox", "resize"])
def test_boxes_move_exactly_as_torchvision_moves_bounding_boxes(geometry: str) -> None:
    rng = random.Random(1)
    view = View(geometry, hflip=0.5)
    for key in range(40):
        width, height = rng.randint(40, 300), rng.randint(40, 300)
        rows = []
        for _ in range(5):
            x0, y0 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
            rows.append([x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height), rng.randint(0, 9)])
        raw = RawTarget("boxes", "boxes", str(rows).encode())
        info = ImageInfo(width, height, 1, True)
        plan = plan_geometry(width, height, 48, view, SampleRng(key))
        targets = parse_targets((raw,), info, None, 0.0)
        source = targets.boxes.copy()
        targets.place(plan, info, 48)
        expected = torchvision_map(source, plan, width, height)
        kept = ((expected[:, 2] - expected[:, 0]) * (expected[:, 3] - expected[:, 1])) > 0
        assert torch.allclose(torch.from_numpy(targets.boxes), expected[kept], atol=0.5)
        assert targets.box_labels.tolist() == [row[4] for row, k in zip(rows, kept.tolist(), strict=True) if k]


def test_min_box_visibility_drops_boxes_mostly_cropped_away() -> None:
    info = ImageInfo(100, 100, 1, True)
    plan = SampleGeometry((40, 40, 90, 90), (50, 50), None, False)  # a crop of the lower right
    half_in = [[30, 40, 50, 60, 1], [40, 40, 60, 60, 2]]
    for visibility, classes in ((0.0, [1, 2]), (0.6, [2])):
        targets = parse_targets((RawTarget("boxes", "boxes", str(half_in).encode()),), info, None, visibility)
        targets.place(plan, info, 50)
        assert targets.box_labels.tolist() == classes


@pytest.mark.parametrize(
    ("raw", "fmt", "reason"),
    [
        (b"[[0, 0, 500, 10, 1]]", "xyxy", "outside"),
        (b"[[30, 30, 10, 10, 1]]", "xyxy", "negative size"),
        (b'{"boxes": [[1, 1, -4, 5]], "labels": [1]}', "xywh", "negative size"),
        (b'{"boxes": [[1, 1, 4]], "labels": [1]}', "xyxy", "4 finite numbers"),
        (b"[[1, 1, 4, 5, 1.5]]", "xyxy", "not an integer"),
        (b"{nope", "xyxy", "not valid JSON"),
    ],
)
def test_bad_boxes_are_bad_targets(raw: bytes, fmt: str, reason: str) -> None:
    with pytest.raises(BadTarget, match=reason):
        parse_targets((RawTarget("boxes", "boxes", raw, box_format=fmt),), ImageInfo(100, 80, 1, True), None, 0.0)


def test_text_json_and_mask_checks() -> None:
    info = ImageInfo(16, 12, 1, True)
    with pytest.raises(BadTarget, match="UTF-8"):
        parse_targets((RawTarget("c", "text", b"\xff"),), info, None, 0.0)
    with pytest.raises(BadTarget, match="missing"):
        parse_targets((RawTarget("c", "text", None),), info, None, 0.0)
    with pytest.raises(BadTarget, match="mask is 8x8"):
        parse_targets((RawTarget("m", "mask"),), info, _png(Image.new("L", (8, 8))), 0.0)
    with pytest.raises(BadTarget, match="single-channel"):
        parse_targets((RawTarget("m", "mask"),), info, _png(Image.new("RGB", (16, 12))), 0.0)
    ok = parse_targets((RawTarget("c", "text", "é".encode()), RawTarget("j", "json", b'{"a": [1]}')), info, None, 0.0)
    assert ok.values == {"c": "é", "j": '{"a": [1]}'}


def test_a_mask_is_resized_nearest_and_flipped_with_the_image() -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 0:20] = 3
    info = ImageInfo(60, 40, 1, False)
    targets = parse_targets((RawTarget("m", "mask"),), info, _png(Image.fromarray(mask)), 0.0)
    view = View("resize", hflip=1.0)
    plan = plan_geometry(60, 40, 30, view, SampleRng(0))
    targets.place(plan, info, 30)
    assert set(np.unique(targets.mask).tolist()) == {0, 3}, "classes are never interpolated"
    expected = np.zeros((30, 30), np.uint8)
    expected[8:22, 20:30] = 3  # rows 10..30 of 40 -> 7.5..22.5; columns 0..20 of 60 -> 0..10, flipped
    assert (targets.mask != expected).mean() < 0.04


def test_job_ids_of_jobs_without_targets_do_not_change() -> None:
    plain = JobSpec("demo")
    assert plain.job_id == JobSpec("demo", targets=()).job_id and "targets" not in plain.to_wire()
    with_targets = JobSpec("demo", targets=("caption",))
    assert with_targets.job_id != plain.job_id
    assert JobSpec.from_wire(with_targets.to_wire()) == with_targets
    with pytest.raises(ValueError, match="targets"):
        JobSpec("demo", targets="caption")  # type: ignore[arg-type]


@pytest.mark.parametrize("into", [False, True])
def test_image_frames_then_the_target_frames_are_received_apart(into: bool) -> None:
    """The image bytes (into a caller's buffer, as pinned memory on CUDA, or as frames) stop where the
    images end; the mask and targets frames stay for the session to read."""
    import zmq

    from stoker.client.runtime.framing import receive_payload

    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        port = sender.bind_to_random_port("tcp://127.0.0.1")
        receiver.connect(f"tcp://127.0.0.1:{port}")
        receiver.setsockopt(zmq.RCVTIMEO, 10_000)
        # Frames of whole samples; a batch under 16 MiB comes in one frame (the server's rule).
        images = [b"a" * 6, b"b" * 6] if into else [b"a" * 6 + b"b" * 6]
        sender.send_multipart([b"header", *images, b"mask", b"targets"])
        assert receiver.recv() == b"header"
        buffer = bytearray(12)
        receive_into = (lambda n: (memoryview(buffer)[:n], buffer)) if into else None
        data, received = receive_payload(receiver, 12, receive_into, tail=True)
        assert received == 12 and receiver.getsockopt(zmq.RCVMORE)
        assert bytes(buffer if into else data.buffer) == b"a" * 6 + b"b" * 6
        assert receiver.recv() == b"mask" and receiver.recv() == b"targets"
    finally:
        sender.close(0)
        receiver.close(0)
        context.term()


def test_a_state_resumes_whatever_targets_the_resumed_job_asks_for() -> None:
    from stoker.client.runtime.checkpoint import read_state, state_dict
    from stoker.client.runtime.position import Position

    plain = JobSpec("demo", batch_size=4)
    state = state_dict(plain, 0, Position(plain).saved())
    assert read_state(state, JobSpec("demo", batch_size=4, targets=("caption",))).epoch == 0
    with pytest.raises(ValueError, match="another job"):
        read_state(state, JobSpec("demo", batch_size=8, targets=("caption",)))


@pytest.mark.parametrize(
    "op",
    [
        {"op": "torchvision.RandomRotation", "degrees": 30},
        {"op": "torchvision.RandomAffine", "degrees": 15, "translate": [0.1, 0.1], "scale": [0.8, 1.2]},
        {"op": "torchvision.RandomPerspective", "distortion_scale": 0.4, "p": 1.0},
    ],
)
def test_geometric_post_ops_move_boxes_and_mask_with_the_image(op: dict) -> None:
    from stoker.server.imaging.pipelines import pipeline_from_ops
    from stoker.server.imaging.targets import SampleTargets, run_ops_with_targets

    pipeline = pipeline_from_ops(f"geo{len(op)}", [{"op": "resize"}, op])
    for key in range(5):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:40, 20:48] = 2
        image = torch.from_numpy(np.repeat(mask[None] * 100, 3, axis=0))
        targets = SampleTargets(
            boxes=np.array([[20, 16, 48, 40]], np.float32), box_labels=np.array([7]), mask=mask, boxes_name="boxes"
        )
        out = run_ops_with_targets(pipeline.name, 0, pipeline.views[0].post_ops, image, targets, key, 64, {})
        foreground = targets.mask > 0
        drawn = (out[0] > 100).numpy()  # more than half of the square's 200 (perspective is bilinear)
        assert (foreground & drawn).sum() / (foreground | drawn).sum() >= 0.95, "the mask moved as the image"
        ys, xs = np.nonzero(foreground)
        (x0, y0, x1, y1), (label,) = targets.boxes[0], targets.box_labels
        assert label == 7 and x0 - 1 <= xs.min() and xs.max() + 1 <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1
