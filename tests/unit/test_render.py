"""Per-sample work run in-process: geometry, decoding of real odd files, EXIF orientation, output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from stoker.client.protocol.rng import SampleRng
from stoker.server.imaging.geometry import plan_geometry
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, Pipeline, View
from stoker.server.imaging.render import StageTimes, render_sample
from tests.helpers import DEMO_DATA, LIMITS, ODD_DATA


def render(path, pipeline: str | Pipeline = "resize", size: int = 64, key: int = 0) -> np.ndarray:
    out = np.zeros((size, size, 3), np.uint8)
    spec = BUILTIN_PIPELINES[pipeline] if isinstance(pipeline, str) else pipeline
    render_sample(str(path).encode(), key, spec, size, out, LIMITS, StageTimes())
    return out


@pytest.mark.parametrize(("width", "height"), [(500, 320), (320, 500), (64, 64), (2000, 100), (100, 2000)])
def test_random_resized_crop_boxes_follow_torchvision_rules(width: int, height: int) -> None:
    train = BUILTIN_PIPELINES["train"].views[0]
    flips = 0
    for key in range(300):
        geometry = plan_geometry(width, height, 224, train, SampleRng(key))
        left, top, right, bottom = geometry.box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        ratio = w / h
        # Sampled boxes obey scale and ratio (up to rounding); fallback boxes are centred.
        if not (abs(left - (width - w) // 2) <= 0 and abs(top - (height - h) // 2) <= 0):
            assert 0.08 * width * height * 0.9 <= w * h <= width * height
            assert 3 / 4 * 0.9 <= ratio <= 4 / 3 * 1.1
        assert geometry.resize == (224, 224) and geometry.crop is None
        flips += geometry.flip
    assert 100 < flips < 200


def test_same_key_same_geometry_different_key_different_geometry() -> None:
    train = BUILTIN_PIPELINES["train"].views[0]
    assert plan_geometry(500, 320, 224, train, SampleRng(5)) == plan_geometry(500, 320, 224, train, SampleRng(5))
    assert len({plan_geometry(500, 320, 224, train, SampleRng(k)).box for k in range(50)}) > 40


@pytest.mark.parametrize(("width", "height"), [(500, 320), (320, 500), (451, 300), (256, 256)])
def test_eval_geometry_matches_torchvision_resize_then_center_crop(width: int, height: int) -> None:
    geometry = plan_geometry(width, height, 224, BUILTIN_PIPELINES["eval"].views[0], SampleRng(0))
    reference = v2.Compose([v2.Resize(256), v2.CenterCrop(224)])
    resized = v2.Resize(256)(torch.zeros(3, height, width))
    assert tuple(resized.shape[1:]) == geometry.resize
    assert reference(torch.zeros(3, height, width)).shape[1:] == (224, 224)
    left, top, right, bottom = geometry.crop
    assert (right - left, bottom - top) == (224, 224)
    assert top == int(round((geometry.resize[0] - 224) / 2.0))


def test_eval_output_matches_torchvision_on_pil() -> None:
    reference = v2.Compose([v2.Resize(256), v2.CenterCrop(224)])
    for path in sorted(DEMO_DATA.rglob("*.jpg"))[:12]:
        ours = render(path, "eval", 224).astype(np.int16)
        with Image.open(path) as image:
            theirs = np.asarray(reference(image.convert("RGB"))).astype(np.int16)
        assert np.abs(ours - theirs).mean() < 2.0, path


def test_all_eight_exif_orientations_give_the_same_upright_image() -> None:
    upright = render(ODD_DATA / "exif_orientation1_chelsea.jpg", "resize", 96).astype(np.int16)
    with Image.open(ODD_DATA / "exif_orientation1_chelsea.jpg") as image:
        assert image.size == (451, 300)
    for orientation in range(2, 9):
        path = ODD_DATA / f"exif_orientation{orientation}_chelsea.jpg"
        ours = render(path, "resize", 96).astype(np.int16)
        with Image.open(path) as image:
            reference = np.asarray(ImageOps.exif_transpose(image).convert("RGB").resize((96, 96), Image.BILINEAR))
        assert np.abs(ours - upright).mean() < 3.0, orientation
        assert np.abs(ours - reference.astype(np.int16)).mean() < 3.0, orientation


def test_flip_mirrors_the_output() -> None:
    always = Pipeline("flip", (View("resize", hflip=1.0),))
    path = sorted(DEMO_DATA.rglob("*.jpg"))[0]
    assert np.array_equal(render(path, always), render(path, "resize")[:, ::-1])


def test_large_crops_decode_reduced_and_match_full_decode(tmp_path) -> None:
    # A 2000 x 1600 JPEG resized to 64 decodes at 1/8 scale in the DCT domain: same picture.
    with Image.open(ODD_DATA / "baseline_444_coffee.jpg") as image:
        big = image.convert("RGB").resize((2000, 1600), Image.BICUBIC)
    path = tmp_path / "big.jpg"
    big.save(path, quality=95)
    ours = render(path, "resize", 64).astype(np.int16)
    reference = np.asarray(big.resize((64, 64), Image.BILINEAR)).astype(np.int16)
    assert np.abs(ours - reference).mean() < 3.0
    assert math.isclose(ours.mean(), reference.mean(), abs_tol=2.0)
