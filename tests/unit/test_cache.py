"""The decoded-sample cache in-process: the arena, the engine's record (claims, parking, entries per
reduction), and the promise that matters: a sample rendered from the arena is byte-identical to one
decoded afresh, over many crops of many photos (large ones decode reduced), orientations and views."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from stoker.client.protocol.plan import sample_seed
from stoker.server.cache import Arena, ArenaView, CacheEntry, CachePart, DecodedCache, SampleHeader, WorkerCache
from stoker.server.data.locators import Locator
from stoker.server.imaging.decode import probe
from stoker.server.imaging.pipelines import BUILTIN_PIPELINES, Pipeline, pipeline_from_views
from stoker.server.imaging.reading import Reader
from stoker.server.imaging.render import StageTimes, decode_reduction, plan_views, render_bytes
from stoker.server.workers.messages import SampleSpec, TaskMessage
from stoker.server.workers.pool import CONTEXT
from stoker.server.workers.process import WorkerTools, render_spec
from stoker.server.workers.slots import SlotViews
from tests.helpers import DEMO_DATA, LIMITS, ODD_DATA

MULTI_VIEW = pipeline_from_views(
    "multi",
    [
        {"count": 2, "size": 64, "ops": [{"op": "random_resized_crop", "scale": [0.4, 1.0]}, {"op": "hflip"}]},
        {"count": 3, "size": 24, "ops": [{"op": "random_resized_crop", "scale": [0.05, 0.4]}, {"op": "hflip"}]},
    ],
)


def test_entries_are_reserved_within_the_budget_and_read_back_in_place() -> None:
    with Arena(4096, CONTEXT) as arena:
        view = ArenaView(arena.handle)
        try:
            pixels = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
            first = view.reserve(pixels.nbytes)
            assert first == 0
            view.write(first, pixels)
            second = view.reserve(pixels.nbytes)
            assert second is not None and second % 64 == 0 and second >= pixels.nbytes
            back = view.read(first, (10, 12, 3))
            assert np.array_equal(back, pixels) and not back.flags.writeable
            assert view.reserve(4096) is None, "past the budget: nothing, not an error"
            assert arena.used == second + 384 and arena.used <= arena.size
        finally:
            view.close()


def test_a_claim_parks_other_rows_until_released_and_entries_are_kept_per_reduction() -> None:
    cache = DecodedCache(Arena(1 << 20, CONTEXT), ["photos"])
    try:
        first, second, sample = object(), object(), ("photos", 7)
        assert cache.serves("photos") and not cache.serves("other")
        assert cache.part(first, sample, 10, waiting="row-a") == CachePart(None, (), store=True)
        assert cache.part(second, sample, 10, waiting="row-b") is None, "parked behind the claim"
        header = SampleHeader(500, 400, 1, True)
        full = CacheEntry(0, 400, 500, 1)
        cache.reported(sample, 10, decoded=True, stored=full, header=header)
        assert cache.release(first) == ["row-b"], "releasing the claim hands the parked row back"
        assert cache.release(first) == [], "a claim settles once"
        # With an entry too, one task at a time: it may need a reduction the arena does not hold yet.
        claimer, other = object(), object()
        assert cache.part(claimer, sample, 10, waiting=None) == CachePart(header, (full,), store=True)
        assert cache.part(other, sample, 10, waiting="row-c") is None
        half = CacheEntry(602112, 200, 250, 2)
        cache.reported(sample, 10, decoded=True, stored=half, header=header)
        assert cache.release(claimer, ("photos", 7)) == ["row-c"] and cache.claimed == []
        cache.reported(sample, 10, decoded=False)
        assert cache.part(other, sample, 10, None) == CachePart(header, (full, half), store=True)
        assert cache.part(other, sample, 10, None).entry(2) == half  # type: ignore[union-attr]
        assert (cache.entries, cache.hits, cache.misses, cache.decodes_per_sample) == (1, 1, 2, 2.0)
        assert cache.release(other) == [] and cache.claimed == []
    finally:
        cache.close()


def _enlarged(path: Path, scale: float, tmp: Path) -> Path:
    """A photo scaled up and saved as a JPEG: large enough that its crops decode reduced (1/2 to 1/8)."""
    with Image.open(path) as image:
        big = image.convert("RGB").resize((int(image.width * scale), int(image.height * scale)))
    target = tmp / f"{path.stem}-x{scale}.jpg"
    target.write_bytes(simplejpeg.encode_jpeg(np.asarray(big), quality=90, colorspace="RGB"))
    return target


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("large")
    demo = sorted(DEMO_DATA.rglob("*.jpg"))
    large = [_enlarged(path, scale, tmp) for path, scale in zip(demo[:6], (2.5, 3.0, 4.5, 6.0, 9.0, 2.0), strict=True)]
    odd = [ODD_DATA / f"exif_orientation{n}_chelsea.jpg" for n in range(1, 9)]
    odd += [ODD_DATA / name for name in ("png_palette_chelsea.png", "cmyk_adobe_coffee.jpg", "grayscale_camera.jpg")]
    return demo[::4] + large + odd


@pytest.fixture
def worker() -> Iterator[tuple[WorkerTools, Arena]]:
    arena = Arena(256 << 20, CONTEXT)
    tools = WorkerTools(SlotViews(), Reader(LIMITS, 1), WorkerCache(arena.handle))
    try:
        yield tools, arena
    finally:
        tools.close()
        arena.close()


def _rows(pipeline: Pipeline, size: int) -> list[np.ndarray]:
    return [np.zeros((side, side, 3), np.uint8) for side in pipeline.sizes(size)]


@pytest.mark.parametrize("pipeline", [BUILTIN_PIPELINES["train"], BUILTIN_PIPELINES["eval"], MULTI_VIEW], ids=str)
def test_pixels_from_the_arena_are_the_bytes_of_a_fresh_decode(photos, worker, pipeline: Pipeline) -> None:
    tools, _ = worker
    size, seeds = 48, range(12)
    reductions_read: set[int] = set()
    for path in photos:
        data = path.read_bytes()
        entries: tuple[CacheEntry, ...] = ()
        header: SampleHeader | None = None
        info = probe(data, LIMITS)
        for seed in seeds:
            key = sample_seed(seed, 0, 3)
            reduction = decode_reduction(info, plan_views(info, key, pipeline, size))
            task = TaskMessage(0, "unused", 1, size, pipeline, ())
            spec = SampleSpec(0, Locator(str(path)), key, CachePart(header, entries, store=True))
            cached = _rows(pipeline, size)
            done = render_spec(task, spec, tools, None if header else data, cached, StageTimes())
            fresh = _rows(pipeline, size)
            render_bytes(data, key, pipeline, size, fresh, LIMITS, StageTimes())
            for view, (a, b) in enumerate(zip(cached, fresh, strict=True)):
                assert np.array_equal(a, b), f"{path.name}, seed {seed}, view {view}: the cache changed a byte"
            if done.stored is not None:
                entries, header = (*entries, done.stored), done.header
                assert done.stored.reduction == reduction
            elif not done.decoded:
                reductions_read.add(reduction)
    assert reductions_read, "samples were read from the arena"
    if pipeline is not BUILTIN_PIPELINES["eval"]:
        assert len(reductions_read) >= 2, "random crops of one photo need several reductions, each its own entry"


def test_a_dataset_decode_rule_by_min_side_stores_one_entry_per_sample(photos, worker) -> None:
    tools, _ = worker
    path = next(p for p in photos if "-x4.5" in p.name)
    data, pipeline, entries, header = path.read_bytes(), BUILTIN_PIPELINES["train"], (), None
    for seed in range(8):
        key = sample_seed(seed, 0, 1)
        task = TaskMessage(0, "unused", 1, 40, pipeline, (), decode_min_side=200)
        spec = SampleSpec(0, Locator(str(path)), key, CachePart(header, entries, store=True))
        cached = _rows(pipeline, 40)
        done = render_spec(task, spec, tools, None if header else data, cached, StageTimes())
        fresh = _rows(pipeline, 40)
        render_bytes(data, key, pipeline, 40, fresh, LIMITS, StageTimes(), min_side=200)
        assert np.array_equal(cached[0], fresh[0]), seed
        if done.stored is not None:
            entries, header = (*entries, done.stored), done.header
    assert len(entries) == 1, "the rule depends on the image alone: one reduction, one entry"
    with Image.open(io.BytesIO(data)) as image:
        assert min(entries[0].height, entries[0].width) >= 200 > min(image.size) // (2 * entries[0].reduction)
