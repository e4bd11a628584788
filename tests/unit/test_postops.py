"""Pipelines with post-ops and views, in-process: parsing, start-up refusals, seeding, multi-view rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stoker.client.protocol.plan import sample_seed
from stoker.server.imaging.errors import PostOpError
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, pipeline_from_ops, pipeline_from_views
from stoker.server.imaging.postops import PostOps, validate_pipelines
from stoker.server.imaging.render import PostOpsRunner, StageTimes, render_sample
from tests.helpers import DEMO_DATA, LIMITS, ROOT

PHOTO = str(sorted(DEMO_DATA.rglob("*.jpg"))[3]).encode()
RECIPE = [
    {"op": "random_resized_crop", "scale": [0.08, 1.0]},
    {"op": "hflip", "p": 0.5},
    {"op": "torchvision.RandAugment", "num_ops": 2, "magnitude": 9},
    {"op": "torchvision.ColorJitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
    {"op": "torchvision.RandomErasing", "p": 0.25, "value": 0},
]


@pytest.fixture(autouse=True)
def plugins_installed(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins"))


def render(pipeline, key: int, size: int = 48, runner: PostOpsRunner | None = None) -> list[np.ndarray]:
    rows = [np.zeros((side, side, 3), np.uint8) for side in pipeline.sizes(size)]
    times = StageTimes()
    render_sample(PHOTO, key, pipeline, size, rows, LIMITS, times, runner or PostOpsRunner())
    return rows


def test_an_op_list_is_a_geometry_a_flip_and_post_ops() -> None:
    pipeline = pipeline_from_ops("timm", RECIPE)
    (view,) = pipeline.views
    assert view.geometry == "random_resized_crop" and view.hflip == 0.5 and not pipeline.multi_view
    assert [op.op for op in view.post_ops] == [
        "torchvision.RandAugment",
        "torchvision.ColorJitter",
        "torchvision.RandomErasing",
    ]
    assert view.post_ops[0].arguments() == {"num_ops": 2, "magnitude": 9}
    assert pipeline.describe()["views"][0]["post_ops"][1]["brightness"] == 0.4
    for ops, needle in (
        ([{"op": "hflip"}], "must be a geometry"),
        ([{"op": "resize"}, {"op": "torchvision.ColorJitter"}, {"op": "hflip"}], "right after the geometry"),
        ([{"op": "resize"}, {"op": "sharpen"}], "op 1 'sharpen' is not known"),
        ([{"op": "resize"}, {"op": "plugin", "call": "a.b"}], "must be 'module:attribute'"),
        ([{"op": "resize"}, {"op": "plugin", "call": "a:b", "args": [1]}], "only 'call' and 'kwargs'"),
    ):
        with pytest.raises(ValueError, match=needle):
            pipeline_from_ops("p", ops)


def test_views_expand_by_count_and_take_their_own_sizes() -> None:
    dino = pipeline_from_views(
        "dino",
        [
            {"count": 2, "size": 224, "ops": [{"op": "random_resized_crop", "scale": [0.4, 1.0]}, {"op": "hflip"}]},
            {"count": 6, "size": 96, "ops": [{"op": "random_resized_crop", "scale": [0.05, 0.4]}]},
        ],
    )
    assert dino.multi_view and dino.sizes(128) == (224,) * 2 + (96,) * 6
    with pytest.raises(ValueError, match="view 1"):
        pipeline_from_views("bad", [{"ops": [{"op": "resize"}]}, {"count": 0, "ops": [{"op": "resize"}]}])
    with pytest.raises(ValueError, match="'ops'"):
        pipeline_from_views("bad", [{"size": 3}])


@pytest.mark.parametrize(
    ("op", "needle"),
    [
        ({"op": "torchvision.Nope"}, "has no transform 'Nope'"),
        ({"op": "torchvision.RandAugment", "num_opz": 2}, "bad arguments"),
        ({"op": "torchvision.CutMix", "num_classes": 3}, "needs a batch"),
        ({"op": "torchvision.Normalize", "mean": [0.5] * 3, "std": [0.2] * 3}, "cannot run on one image"),
        ({"op": "plugin", "call": "stoker_test_plugins:Shrinkk"}, "cannot import"),
    ],
)
def test_impossible_post_ops_are_refused_naming_pipeline_view_and_op(op: dict, needle: str) -> None:
    pipeline = pipeline_from_ops("bad", [{"op": "resize"}, {"op": "torchvision.RandomInvert"}, op])
    with pytest.raises(ValueError, match=rf"pipeline 'bad', view 0, post-op 2 .*{needle}"):
        validate_pipelines([pipeline])


def test_every_generator_is_seeded_per_view_so_any_order_gives_the_same_bytes() -> None:
    pipeline = pipeline_from_ops(
        "rng",
        [
            {"op": "random_resized_crop"},
            {"op": "torchvision.RandAugment"},
            {"op": "plugin", "call": "stoker_test_plugins:random_shift", "kwargs": {"pixels": 5}},
            {"op": "plugin", "call": "stoker_test_plugins:TorchNoise"},
        ],
    )
    validate_pipelines([pipeline])
    keys = [sample_seed(1, 0, index) for index in range(6)]
    runner = PostOpsRunner()
    forward = [render(pipeline, key, runner=runner)[0] for key in keys]
    torch.manual_seed(123)  # whatever state the generators were left in
    backward = [render(pipeline, key, runner=PostOpsRunner())[0] for key in reversed(keys)]
    assert all(np.array_equal(a, b) for a, b in zip(forward, reversed(backward), strict=True))
    assert len({a.tobytes() for a in forward}) == len(keys)


def test_a_multi_view_sample_is_decoded_once_and_its_views_differ() -> None:
    pipeline = pipeline_from_views(
        "mv",
        [
            {
                "count": 2,
                "size": 64,
                "ops": [{"op": "random_resized_crop"}, {"op": "torchvision.ColorJitter", "hue": 0.1}],
            },
            {"count": 2, "size": 32, "ops": [{"op": "random_resized_crop", "scale": [0.05, 0.4]}]},
        ],
    )
    times = StageTimes()
    rows = [np.zeros((side, side, 3), np.uint8) for side in pipeline.sizes(0)]
    render_sample(PHOTO, 9, pipeline, 0, rows, LIMITS, times, PostOpsRunner())
    assert times.counts["decode"] == 1 and times.counts["geometry"] == 4 and times.counts["postops"] == 2
    assert times.counts["op:mv/torchvision.ColorJitter"] == 2
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[2], rows[3])


def test_view_zero_keeps_the_bytes_of_the_plain_pipeline() -> None:
    train = BUILTIN_PIPELINES["train"]
    same_geometry = pipeline_from_ops("again", [{"op": "random_resized_crop"}, {"op": "hflip"}])
    assert np.array_equal(render(train, 5)[0], render(same_geometry, 5)[0])


def test_a_post_op_that_returns_the_wrong_image_is_a_pipeline_error() -> None:
    shrinking = pipeline_from_ops("s", [{"op": "resize"}, {"op": "plugin", "call": "stoker_test_plugins:Shrink"}])
    with pytest.raises(PostOpError, match="returned 3x24x24 torch.uint8; the view's output is 3x48x48") as info:
        render(shrinking, 1)
    assert info.value.op == "plugin stoker_test_plugins:Shrink"
    failing = pipeline_from_ops(
        "f",
        [{"op": "resize"}, {"op": "plugin", "call": "stoker_test_plugins:FailOnBright", "kwargs": {"threshold": -1.0}}],
    )
    with pytest.raises(PostOpError, match="mean brightness") as info:
        render(failing, 1)
    assert "stoker_test_plugins.py" in info.value.trace
    assert PostOps().ops(failing, 0, failing.views[0])[0][0] == "plugin stoker_test_plugins:FailOnBright"


def test_the_shipped_recipes_are_valid_and_build_their_dataloader_form() -> None:
    from stoker.server.settings import load_settings
    from stoker.server.tools.bench.recipes import recipe_transform

    pipelines = load_settings(ROOT / "deploy" / "examples" / "recipes.toml", env={}).pipeline_map()
    recipes = [pipelines[name] for name in ("timm_rand", "tv_reference", "dino")]
    validate_pipelines(recipes)
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert tuple(recipe_transform(pipelines["timm_rand"], 224)(image).shape) == (3, 224, 224)
    views = recipe_transform(pipelines["dino"], 224)(image)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
