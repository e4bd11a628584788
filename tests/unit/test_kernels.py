"""The fast kernels against torchvision's: each listed op swept over random parameters and the demo
photos, same seeded draws, within the documented bound; ``exact`` gives torchvision's bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from stoker.server.imaging.kernels.layout import as_chw, is_native
from stoker.server.imaging.kernels.transforms import FAST_TRANSFORMS
from stoker.server.imaging.pipelines import OpSpec, pipeline_from_ops
from stoker.server.imaging.postops import build_op, is_fast, seed_generators
from stoker.server.imaging.render import PostOpsRunner, StageTimes, post_ops_key, render_sample
from tests.helpers import DEMO_DATA, LIMITS

DRAWS = 20
PHOTOMETRIC = {  # max levels apart: each kernel within 2; ColorJitter chains four, hue amplifying (README)
    "ColorJitter": ({"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}, 8),
    "ColorJitter-b": ({"brightness": 0.8}, 2),
    "ColorJitter-c": ({"contrast": 0.8}, 2),
    "ColorJitter-s": ({"saturation": 0.8}, 2),
    "ColorJitter-h": ({"hue": 0.5}, 2),
    "Grayscale": ({"num_output_channels": 3}, 2),
    "RandomGrayscale": ({"p": 1.0}, 2),
    "GaussianBlur": ({"kernel_size": 9, "sigma": [0.1, 2.0]}, 2),
    "RandomSolarize": ({"threshold": 128, "p": 1.0}, 0),
    "RandomPosterize": ({"bits": 3, "p": 1.0}, 0),
    "RandomEqualize": ({"p": 1.0}, 0),
    "RandomAutocontrast": ({"p": 1.0}, 0),
    "RandomAdjustSharpness": ({"sharpness_factor": 2.0, "p": 1.0}, 2),
    "RandomInvert": ({"p": 1.0}, 0),
    "RandomErasing": ({"p": 1.0, "value": "random"}, 0),
}
GEOMETRIC = {  # within 1 level on 95 % of pixels
    "RandomRotation": {"degrees": 30},
    "RandomRotation-bilinear": {"degrees": 30, "interpolation": v2.InterpolationMode.BILINEAR, "fill": 40},
    "RandomAffine": {"degrees": 20, "translate": [0.1, 0.1], "scale": [0.8, 1.2], "shear": 10},
    "RandomPerspective": {"distortion_scale": 0.4, "p": 1.0},
    "AutoAugment": {},
    "RandAugment": {"num_ops": 2, "magnitude": 9},
    "TrivialAugmentWide": {},
    "AugMix": {"severity": 3},
}


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    paths = sorted(DEMO_DATA.rglob("*.jpg"))[:4]
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((72, 64)))).permute(2, 0, 1) for p in paths]


def _pair(name: str, kwargs: dict) -> tuple[v2.Transform, v2.Transform]:
    base = name.split("-")[0]
    return getattr(v2, base)(**kwargs), FAST_TRANSFORMS[base](**kwargs)


def _sweep(name: str, kwargs: dict, photos: list[torch.Tensor]) -> tuple[int, float]:
    """The largest difference and the smallest share of pixels within 1 level over the draws."""
    reference, fast = _pair(name, kwargs)
    worst, share = 0, 1.0
    for draw in range(DRAWS):
        image = photos[draw % len(photos)]
        torch.manual_seed(draw)
        expected = reference(image.clone())
        torch.manual_seed(draw)
        got = fast(as_chw(image.permute(1, 2, 0).contiguous().numpy()))
        assert got.shape == expected.shape and got.dtype == torch.uint8
        diff = (expected.int() - got.int()).abs()
        worst, share = max(worst, int(diff.max())), min(share, float((diff <= 1).float().mean()))
    return worst, share


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_a_photometric_kernel_is_within_its_bound_of_torchvision(name: str, photos) -> None:
    kwargs, bound = PHOTOMETRIC[name]
    worst, share = _sweep(name, kwargs, photos)
    assert worst <= bound and share >= 0.98, f"{name}: {worst} levels from torchvision, {share:.3f} within 1"


@pytest.mark.parametrize("name", GEOMETRIC)
def test_a_geometric_kernel_matches_torchvision_on_95_percent_of_pixels(name: str, photos) -> None:
    _, share = _sweep(name, GEOMETRIC[name], photos)
    assert share >= 0.95, f"{name}: only {share:.3f} of pixels within 1 level"


def test_fast_ops_keep_the_native_layout_and_exact_builds_torchvisions_own() -> None:
    fast = build_op(OpSpec("torchvision.ColorJitter", (("brightness", 0.4),)))
    exact = build_op(OpSpec("torchvision.ColorJitter", (("brightness", 0.4),), exact=True))
    assert is_fast(fast) and type(exact) is v2.ColorJitter and not is_fast(exact)
    image = as_chw(np.zeros((8, 8, 3), np.uint8))
    assert is_native(fast(image)) and is_native(FAST_TRANSFORMS["GaussianBlur"](3)(image))


def test_exact_gives_torchvisions_bytes_through_the_worker_path() -> None:
    photo = str(sorted(DEMO_DATA.rglob("*.jpg"))[2]).encode()
    ops = [
        {"op": "torchvision.ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1},
        {"op": "torchvision.GaussianBlur", "kernel_size": 5, "sigma": [0.1, 2.0]},
        {"op": "torchvision.RandomRotation", "degrees": 20},
    ]
    geometry = [{"op": "random_resized_crop"}, {"op": "hflip"}]
    exact = pipeline_from_ops("exact", geometry + ops, exact=True)
    plain = pipeline_from_ops("plain", geometry)
    fast = pipeline_from_ops("fast", geometry + ops)
    assert all(op.exact for op in exact.views[0].post_ops) and exact.describe()["views"][0]["post_ops"][0]["exact"]
    rows = {name: np.zeros((48, 48, 3), np.uint8) for name in ("exact", "plain", "fast")}
    for name, pipeline in (("exact", exact), ("plain", plain), ("fast", fast)):
        render_sample(photo, 11, pipeline, 48, rows[name], LIMITS, StageTimes(), PostOpsRunner())
    seed_generators(post_ops_key(11))
    expected = v2.Compose(
        [getattr(v2, op["op"].split(".")[1])(**{k: v for k, v in op.items() if k != "op"}) for op in ops]
    )(torch.from_numpy(rows["plain"]).permute(2, 0, 1).contiguous())
    assert np.array_equal(rows["exact"], expected.permute(1, 2, 0).numpy())
    assert np.abs(rows["fast"].astype(int) - rows["exact"].astype(int)).max() <= 8


def test_the_dino_multicrop_recipe_nests_ops_in_random_apply_and_has_every_form() -> None:
    from stoker.server.imaging.postops import validate_pipelines
    from stoker.server.settings import load_settings
    from stoker.server.tools.bench.peers import albumentations_transform
    from stoker.server.tools.bench.recipes import recipe_transform
    from tests.helpers import ROOT

    pipelines = load_settings(ROOT / "deploy" / "examples" / "recipes.toml", env={}).pipeline_map()
    fast, exact = pipelines["dino_multicrop"], pipelines["dino_multicrop_exact"]
    validate_pipelines([fast, exact])
    jitter = fast.views[0].post_ops[0]
    assert jitter.op == "torchvision.RandomApply" and jitter.children[0].op == "torchvision.ColorJitter"
    assert is_fast(build_op(jitter)) and not is_fast(build_op(exact.views[0].post_ops[0]))
    assert not is_fast(recipe_transform(fast, 32).transforms[0].transforms[2]), "the DataLoader runs torchvision's"
    sizes = [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    image = np.zeros((120, 160, 3), np.uint8)
    assert [tuple(v.shape) for v in albumentations_transform(fast, 32)(image)] == sizes
