"""The decoded-sample cache on real servers: it never changes a byte (1 vs 2 workers, warm vs cold,
a server with the cache and one without), every job on a cached dataset shares it (a sample is
decoded once for a sweep), the budget holds, bad samples and half-written entries never count."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BackgroundClient,
    fetch_epochs,
    http_json,
    make_bad_dataset,
    metrics,
    wait_until,
)

pytestmark = pytest.mark.slow

OPTIONS = dict(batch_size=6, image_size=48, seed=5)
TRAIN = "train"


def config_for(tmp_path: Path, path: Path, min_side: int = 0, cache: bool = True) -> Path:
    config = tmp_path / f"photos-{min_side}-{cache}.toml"
    table = f"[datasets.photos]\npath = '{path}'\ncache = {str(cache).lower()}\n"
    config.write_text(table + (f"cache_min_side = {min_side}\n" if min_side else ""))
    return config


def cache_of(server) -> dict:
    return http_json(server.http + "/status")[1]["cache"]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True)
    )


def decodes_needed(jobs: list[tuple[int, int]], epochs: int, min_side: int = 0) -> set[tuple[int, int]]:
    """The ``(sample, reduction)`` pairs the ``train`` jobs ``(seed, image_size)`` decode over ``epochs``
    epochs of the demo photos: what a cache decodes, each once."""
    from stoker.client.protocol.plan import sample_seed
    from stoker.server.data.catalog import Catalog, DatasetDecl
    from stoker.server.imaging.decode import probe
    from stoker.server.imaging.pipelines import BUILTIN_PIPELINES
    from stoker.server.imaging.render import decode_reduction, plan_views
    from tests.helpers import DEMO_DATA, LIMITS

    table = Catalog.load([DatasetDecl("photos", DEMO_DATA)])["photos"]
    infos = [probe(Path(table.locator(i).target).read_bytes(), LIMITS) for i in range(len(table))]
    pipeline = BUILTIN_PIPELINES[TRAIN]
    return {
        (i, decode_reduction(info, plan_views(info, sample_seed(seed, epoch, i), pipeline, size), min_side))
        for seed, size in jobs
        for epoch in range(epochs)
        for i, info in enumerate(infos)
    }


@pytest.mark.parametrize("min_side", [0, 100])
def test_the_cache_never_changes_a_byte(cluster, tmp_path: Path, min_side: int) -> None:
    from tests.helpers import DEMO_DATA

    cached = config_for(tmp_path, DEMO_DATA, min_side)
    cached_two = cluster.start("--config", str(cached), "--cache-bytes", "256MiB", datasets={}, workers=2)
    cached_one = cluster.start("--config", str(cached), "--cache-bytes", "256MiB", datasets={}, workers=1)
    no_budget = cluster.start("--config", str(cached), "--cache-bytes", "0", datasets={}, workers=1)
    # Not declared cached at all (only its decode rule, cache_min_side, is part of the dataset's table).
    plain = cluster.start("--config", str(config_for(tmp_path, DEMO_DATA, min_side, cache=False)), datasets={})
    reference = fetch_epochs(plain.data, 3, "photos", **OPTIONS)
    job = [(OPTIONS["seed"], OPTIONS["image_size"])]
    # The client runs ahead into a fourth epoch: some of its batches may be made too.
    needed, ahead = decodes_needed(job, 3, min_side), decodes_needed(job, 4, min_side)
    assert len({reduction for _, reduction in needed}) > (min_side == 0), "crops decode at several reductions"
    for server in (cached_two, cached_one, no_budget):
        epochs = fetch_epochs(server.data, 3, "photos", **OPTIONS)  # epoch 0 cold, 1 and 2 warm
        assert all(same(a, b) for a, b in zip(epochs, reference, strict=True))
    for server in (cached_two, cached_one):
        cache = cache_of(server)
        assert cache["entries"] == 48 and cache["misses"] == cache["copies"], "each sample decoded once per reduction"
        assert len(needed) <= cache["copies"] <= len(ahead) and (min_side == 0 or cache["copies"] == 48)
        assert cache["hits"] >= 3 * 48 - cache["misses"]
        assert 0 < cache["used_bytes"] <= cache["budget_bytes"] == 256 * 2**20
    for server in (no_budget, plain):
        assert cache_of(server)["budget_bytes"] == 0 and cache_of(server)["entries"] == 0


def test_a_sweep_of_concurrent_jobs_decodes_each_sample_once_per_reduction(cluster, tmp_path: Path) -> None:
    from tests.helpers import DEMO_DATA

    server = cluster.start("--dataset", f"photos={DEMO_DATA}", "--cache", "photos", "--cache-bytes", "128MiB")
    sweep = [(1, 32), (2, 48), (3, 64)]
    jobs = [
        BackgroundClient(server.data, "photos", epochs=3, **(OPTIONS | {"seed": seed, "image_size": size}))
        for seed, size in sweep
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        assert all(sorted(epoch) == list(range(48)) for epoch in job.result(180)), "exactly once per epoch"
    needed, ahead = decodes_needed(sweep, 3), decodes_needed(sweep, 4)
    cache = cache_of(server)
    assert cache["entries"] == 48 and cache["misses"] == cache["copies"], "once per sample and reduction"
    assert len(needed) <= cache["copies"] <= len(ahead) and cache["hits"] >= 3 * 3 * 48 - cache["misses"]
    # The gauges follow /status within half a second: wait for the figures /status just gave.
    values = wait_until(
        lambda: (v := metrics(server.http))["stoker_cache_hits"] >= cache["hits"] and v, what="the gauges refreshed"
    )
    assert values["stoker_cache_entries"] == 48
    assert values["stoker_cache_decodes_per_sample"] == pytest.approx(cache["copies"] / 48, abs=1e-3)


def test_a_small_budget_holds_and_what_does_not_fit_is_decoded(cluster, tmp_path: Path) -> None:
    from tests.helpers import DEMO_DATA

    config = config_for(tmp_path, DEMO_DATA)
    small = cluster.start("--config", str(config), "--cache-bytes", "4MiB", datasets={})
    uncached = cluster.start("--config", str(config), "--cache-bytes", "0", datasets={})
    large = OPTIONS | {"image_size": 200}  # crops barely reduce: most entries are whole photos
    assert all(
        same(a, b)
        for a, b in zip(
            fetch_epochs(small.data, 2, "photos", **large),
            fetch_epochs(uncached.data, 2, "photos", **large),
            strict=True,
        )
    )
    cache = cache_of(small)
    assert cache["budget_bytes"] == 4 * 2**20 and cache["used_bytes"] <= cache["budget_bytes"]
    assert 0 < cache["entries"] < 48 and cache["misses"] > cache["copies"], "what does not fit is decoded every time"


def test_bad_samples_are_never_cached(cluster, tmp_path: Path) -> None:
    root, bad = make_bad_dataset(tmp_path / "mixed")
    server = cluster.start("--dataset", f"mixed={root}", "--cache", "mixed", "--cache-bytes", "64MiB", datasets={})
    epochs = fetch_epochs(server.data, 2, "mixed", **OPTIONS)
    assert all(sum(len(idx) for _, _, idx in epoch) == 35 for epoch in epochs), "batches keep their shape"
    status = http_json(server.http + "/status")[1]
    assert status["bad_samples"]["count"] == len(bad) and status["cache"]["entries"] == 35 - len(bad)


def test_a_worker_killed_while_filling_the_cache_leaves_no_corrupt_entry(cluster, tmp_path: Path) -> None:
    from tests.helpers import DEMO_DATA

    config = config_for(tmp_path, DEMO_DATA)
    server = cluster.start("--config", str(config), "--cache-bytes", "128MiB", datasets={})
    reference = fetch_epochs(
        cluster.start("--config", str(config), "--cache-bytes", "0", datasets={}).data, 3, "photos", **OPTIONS
    )

    def busy_worker() -> dict | None:
        pool = http_json(server.http + "/status")[1]["pool"]
        return next((w for w in pool["workers"] if w["current"]), None)

    with BackgroundClient(server.data, "photos", epochs=3, keep_batches=True, **OPTIONS) as client:
        victim = wait_until(busy_worker, what="a worker decoding (and filling the cache)")
        os.kill(victim["pid"], signal.SIGKILL)
        client.result(180)
    assert all(same(a, b) for a, b in zip(client.batches, reference, strict=True)), "warm epochs equal cold ones"
    assert cache_of(server)["entries"] == 48


def test_a_restarted_server_starts_cold(cluster, tmp_path: Path) -> None:
    from tests.helpers import DEMO_DATA

    config = config_for(tmp_path, DEMO_DATA)
    server = cluster.start("--config", str(config), "--cache-bytes", "64MiB", datasets={})
    first = fetch_epochs(server.data, 1, "photos", **OPTIONS)
    assert cache_of(server)["entries"] == 48
    cluster.kill(server)
    again = cluster.restart(server)
    assert cache_of(again)["entries"] == 0
    assert all(same(a, b) for a, b in zip(fetch_epochs(again.data, 1, "photos", **OPTIONS), first, strict=True))
