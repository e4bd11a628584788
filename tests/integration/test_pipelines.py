"""Training recipes on real servers: torchvision v2 post-ops of every family, operator plugins from the
server's environment, multi-view pipelines; byte-identical across worker counts and servers; typed,
fast pipeline errors; refusals at start-up."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from stoker.client import PipelineError
from stoker.client.protocol.wire import ErrorCode
from tests.helpers import ROOT, Cluster, fetch_epoch, http_json, metrics, open_client, run_cli, wait_until

pytestmark = pytest.mark.slow

PLUGINS = ROOT / "tests" / "plugins"
CONFIG = """
[pipelines.photometric]
ops = [
  {op = "random_resized_crop", scale = [0.3, 1.0]},
  {op = "hflip"},
  {op = "torchvision.ColorJitter", brightness = 0.4, contrast = 0.4, saturation = 0.4, hue = 0.1},
  {op = "torchvision.RandomGrayscale", p = 0.3},
  {op = "torchvision.GaussianBlur", kernel_size = 5, sigma = [0.1, 2.0]},
  {op = "torchvision.RandomSolarize", threshold = 128, p = 0.3},
  {op = "torchvision.RandomPosterize", bits = 4, p = 0.3},
  {op = "torchvision.RandomEqualize", p = 0.3},
  {op = "torchvision.RandomAutocontrast", p = 0.3},
  {op = "torchvision.RandomAdjustSharpness", sharpness_factor = 2, p = 0.3},
]

[pipelines.geometric]
ops = [
  {op = "resize"},
  {op = "torchvision.RandomRotation", degrees = 30},
  {op = "torchvision.RandomAffine", degrees = 10, translate = [0.1, 0.1], scale = [0.9, 1.1], shear = 5},
  {op = "torchvision.RandomPerspective", distortion_scale = 0.3, p = 0.5},
  {op = "torchvision.RandomVerticalFlip", p = 0.5},
]

[pipelines.rand_augment]
ops = [
  {op = "random_resized_crop", scale = [0.08, 1.0]},
  {op = "hflip", p = 0.5},
  {op = "torchvision.RandAugment", num_ops = 2, magnitude = 9},
  {op = "torchvision.RandomErasing", p = 0.25, value = 0},
]

[pipelines.exact]
exact_torchvision = true
ops = [
  {op = "random_resized_crop"},
  {op = "torchvision.ColorJitter", brightness = 0.4, contrast = 0.4, saturation = 0.2, hue = 0.1},
  {op = "torchvision.GaussianBlur", kernel_size = 5, exact = true},
]

[pipelines.auto_augment]
ops = [{op = "random_resized_crop"}, {op = "torchvision.AutoAugment"}]

[pipelines.trivial]
ops = [{op = "random_resized_crop"}, {op = "torchvision.TrivialAugmentWide"}]

[pipelines.augmix]
ops = [{op = "random_resized_crop"}, {op = "torchvision.AugMix", severity = 3}]

[pipelines.plugins]
ops = [
  {op = "random_resized_crop"},
  {op = "plugin", call = "stoker_test_plugins:Posterize", kwargs = {bits = 5}},
  {op = "plugin", call = "stoker_test_plugins:random_shift", kwargs = {pixels = 3}},
  {op = "plugin", call = "stoker_test_plugins:TorchNoise", kwargs = {amplitude = 10}},
]

[pipelines.dino]
views = [
  {count = 2, size = 48, ops = [
    {op = "random_resized_crop", scale = [0.4, 1.0]}, {op = "hflip"},
    {op = "torchvision.ColorJitter", brightness = 0.4, contrast = 0.4, saturation = 0.2, hue = 0.1},
    {op = "torchvision.RandomGrayscale", p = 0.2},
  ]},
  {count = 3, size = 24, ops = [{op = "random_resized_crop", scale = [0.05, 0.4]}, {op = "hflip"}]},
]

[pipelines.failing]
ops = [{op = "resize"}, {op = "plugin", call = "stoker_test_plugins:FailOnBright", kwargs = {threshold = 140.0}}]

[pipelines.shrinking]
ops = [{op = "resize"}, {op = "plugin", call = "stoker_test_plugins:Shrink"}]
"""
RECIPES = ("photometric", "geometric", "rand_augment", "auto_augment", "trivial", "augmix", "plugins", "exact")
OPTIONS = dict(batch_size=8, image_size=40, seed=7)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> tuple:
    """Two servers with the same recipes: one worker and two workers."""
    folder = tmp_path_factory.mktemp("recipes")
    config = folder / "stoker.toml"
    config.write_text(CONFIG)
    cluster = Cluster(folder)
    env = {"PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])}
    try:
        yield (
            cluster.start("--config", str(config), workers=1, env=env),
            cluster.start("--config", str(config), workers=2, env=env),
        )
    finally:
        cluster.close()


def same_epochs(a: list, b: list) -> bool:
    def flat(images: object) -> list[torch.Tensor]:
        return list(images) if isinstance(images, list) else [images]

    return len(a) == len(b) and all(
        torch.equal(x[2], y[2]) and all(torch.equal(p, q) for p, q in zip(flat(x[0]), flat(y[0]), strict=True))
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("pipeline", RECIPES)
def test_each_recipe_is_byte_identical_across_worker_counts_and_servers(servers, pipeline: str) -> None:
    one, two = servers
    first = fetch_epoch(one.data, pipeline=pipeline, **OPTIONS)
    assert same_epochs(first, fetch_epoch(two.data, pipeline=pipeline, **OPTIONS)), "1 vs 2 workers, 2 servers"
    plain = fetch_epoch(one.data, pipeline="train" if pipeline != "geometric" else "resize", **OPTIONS)
    assert not same_epochs(first, plain), "the post-ops changed the images"
    assert not same_epochs(first, fetch_epoch(one.data, pipeline=pipeline, epoch=1, **OPTIONS)), "epochs differ"
    assert sorted(int(i) for _, _, idx in first for i in idx) == list(range(48)), "exactly once"


def quiet_metrics(http: str) -> dict[str, float] | None:
    """The metrics, once no worker holds a task and two readings agree (an earlier test's client may
    have run ahead, and the engine counts a task's stages one after another)."""

    def counts() -> dict[str, float]:
        return {k: v for k, v in metrics(http).items() if k.startswith("stoker_stage_seconds_count")}

    first = counts()
    if http_json(http + "/status")[1]["pool"]["busy"]:
        return None
    return first if counts() == first else None


def test_a_multi_view_pipeline_yields_one_tensor_per_view_decoding_each_sample_once(servers) -> None:
    one, two = servers
    before = wait_until(lambda: quiet_metrics(one.http), what="the earlier tests' tasks counted")
    first = fetch_epoch(one.data, pipeline="dino", **OPTIONS)

    # The client ran ahead into the next epoch: read the counters once those tasks are in too (the
    # engine counts a task's stages one after another, and /metrics may read between two of them).
    def counted(values: dict[str, float], stage: str) -> float:
        key = f"stoker_stage_seconds_count|stage={stage}"
        return values[key] - before.get(key, 0.0)

    def settled() -> dict[str, float] | None:
        values = metrics(one.http)
        return values if counted(values, "geometry") == 5 * counted(values, "decode") else None

    after = wait_until(settled, what="each decoded sample's five views counted")
    assert same_epochs(first, fetch_epoch(two.data, pipeline="dino", **OPTIONS))
    for views, labels, indices in first:
        assert isinstance(views, list) and [tuple(v.shape[1:]) for v in views] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
        assert all(v.shape[0] == len(labels) == len(indices) and v.dtype == torch.uint8 for v in views)
        assert not torch.equal(views[0], views[1]), "two global views of a sample draw different crops"
    with open_client(one.data, pipeline="dino", batch_size=8, normalize=True) as batches:
        assert batches.info.views == ((48, 48, 3),) * 2 + ((24, 24, 3),) * 3
        views, _, _ = next(iter(batches))
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)

    assert counted(after, "decode") >= 48, "the epoch (and perhaps some of the next) was decoded"
    assert counted(after, "geometry") == 5 * counted(after, "decode"), "each sample decoded once for its five views"


def test_status_lists_pipelines_with_their_ops_and_times_each_op(servers) -> None:
    one, _ = servers
    fetch_epoch(one.data, pipeline="rand_augment", **OPTIONS)
    status = http_json(one.http + "/status")[1]
    declared = {p["name"]: p for p in status["pipelines"]}
    assert {"train", "eval", "resize", *RECIPES, "dino"} <= set(declared)
    ops = [op["op"] for op in declared["rand_augment"]["views"][0]["post_ops"]]
    assert ops == ["torchvision.RandAugment", "torchvision.RandomErasing"]
    assert declared["rand_augment"]["views"][0]["post_ops"][0]["num_ops"] == 2
    stages = status["stages"]
    for stage in ("geometry", "postops", "op:rand_augment/torchvision.RandAugment"):
        assert stages[stage]["count"] > 0 and stages[stage]["mean_ms"] > 0, stage


def test_a_failing_plugin_is_a_pipeline_error_within_seconds(servers) -> None:
    one, _ = servers
    started = time.monotonic()
    with open_client(one.data, pipeline="failing", **OPTIONS) as batches:
        with pytest.raises(PipelineError) as info:
            list(batches)  # about a third of the photos are brighter than the plugin accepts
    assert time.monotonic() - started < 15, "raised at once, not after timeout_s"
    error = info.value
    assert error.code == ErrorCode.PIPELINE and error.op == "plugin stoker_test_plugins:FailOnBright"
    assert "demo-data" in error.path and "mean brightness" in str(error)
    assert "stoker_test_plugins.py" in error.traceback and "server traceback" in "\n".join(error.__notes__)
    status = http_json(one.http + "/status")[1]
    assert status["pipeline_errors"][0]["op"] == error.op and status["pipeline_errors"][0]["pipeline"] == "failing"
    assert status["errors"]["PIPELINE"] >= 1 and status["bad_samples"]["count"] == 0, "not bad files"


def test_a_post_op_that_changes_the_size_is_a_pipeline_error(servers) -> None:
    one, _ = servers
    with open_client(one.data, pipeline="shrinking", **OPTIONS) as batches:
        with pytest.raises(PipelineError, match="returned 3x20x20 torch.uint8; the view's output is 3x40x40"):
            next(iter(batches))


@pytest.mark.parametrize(
    ("ops", "needle"),
    [
        ('{op = "torchvision.NoSuchTransform"}', "torchvision.transforms.v2 has no transform 'NoSuchTransform'"),
        ('{op = "torchvision.ColorJitter", brightnes = 0.4}', "bad arguments"),
        ('{op = "torchvision.MixUp", num_classes = 10}', "needs a batch"),
        ('{op = "torchvision.Normalize", mean = [0.5, 0.5, 0.5], std = [0.2, 0.2, 0.2]}', "cannot run on one image"),
        ('{op = "torchvision.ToDtype", dtype = "float32"}', "post-op 1 'torchvision.ToDtype'"),
        ('{op = "plugin", call = "no_such_module:Thing"}', "cannot import 'no_such_module:Thing'"),
        ('{op = "plugin", call = "stoker_test_plugins:Posterize", kwargs = {bits = 12}}', "bits=12"),
        ('{op = "plugin", call = "stoker_test_plugins:not_callable"}', "not a callable transform"),
        ('{op = "plugin", call = "os.system(1)"}', "must be 'module:attribute'"),
    ],
)
def test_impossible_post_ops_are_refused_at_start_naming_the_op(
    tmp_path: Path, ops: str, needle: str, monkeypatch
) -> None:
    """The checks ``stoker serve`` runs before serving, here in-process (one process start each would
    cost seconds of imports); the next test shows the command itself exiting 2 with the message."""
    from stoker.server.settings import load_settings
    from stoker.server.tools.serve import ServeError, build_engine

    monkeypatch.syspath_prepend(str(PLUGINS))
    config = tmp_path / "bad.toml"
    config.write_text(f'[pipelines.bad]\nops = [{{op = "resize"}}, {ops}]\n')
    settings = load_settings(config, env={}, overrides={"datasets": {"demo": {"path": "server/demo-data"}}})
    with pytest.raises(ServeError) as info:
        build_engine(settings)
    assert "pipeline 'bad'" in str(info.value) and needle in str(info.value)


def test_stoker_serve_exits_2_naming_an_impossible_post_op(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    posterize = '{op = "plugin", call = "stoker_test_plugins:Posterize", kwargs = {bits = 12}}'
    config.write_text(f'[pipelines.bad]\nops = [{{op = "resize"}}, {posterize}]\n')
    env = {"PYTHONPATH": str(PLUGINS)}
    result = run_cli("serve", "--config", str(config), "--dataset", "demo=server/demo-data", timeout_s=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "pipeline 'bad'" in result.stderr and "bits=12" in result.stderr, result.stderr


@pytest.mark.parametrize("pipeline", ["train", "photometric", "dino"])
def test_both_layouts_carry_the_same_images_written_by_the_workers(servers, pipeline: str) -> None:
    one, two = servers
    contiguous = fetch_epoch(one.data, pipeline=pipeline, **OPTIONS)
    channels_last = fetch_epoch(two.data, pipeline=pipeline, memory_format=torch.channels_last, **OPTIONS)
    assert same_epochs(contiguous, channels_last)
    first = contiguous[0][0] if pipeline != "dino" else contiguous[0][0][0]
    last = channels_last[0][0] if pipeline != "dino" else channels_last[0][0][0]
    assert first.is_contiguous() and last.is_contiguous(memory_format=torch.channels_last)
