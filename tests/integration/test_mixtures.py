"""Mixtures against real servers: a ``[mixtures.NAME]`` served like a dataset, batch by batch the
planner's sequence, byte-identical on 1 and 2 workers and 2 servers, resumed mid-epoch, on another
number of ranks and with new weights, and shown in ``/status``."""

from __future__ import annotations

import os
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from stoker.client.protocol.mixture import Mixture
from tests.helpers import DEMO_DATA, Batch, Cluster, http_json, open_client, run_cli, wait_until

pytestmark = pytest.mark.slow

EPOCH = 40  # big (48 samples) spans epochs; small (3) wraps in each
WEIGHTS = {"big": 0.6, "mid": 0.3, "small": 0.1}
OPTIONS = dict(image_size=32, return_sources=True)


def config_text(root: Path, weights: str = "big = 0.6, mid = 0.3, small = 0.1") -> str:
    return f"""
[datasets.big]
path = "{DEMO_DATA}"
cache_min_side = 48
[datasets.mid]
path = "{root / "mid"}"
[datasets.small]
path = "{root / "small"}"

[mixtures.pretrain]
datasets = {{{weights}}}
epoch_samples = {EPOCH}

[mixtures.tuned]
datasets = {{big = 1, small = 1}}
pipelines = {{small = "eval"}}
"""


def write_sources(root: Path) -> None:
    """Two small datasets from the repo's photos (links: nothing is copied)."""
    photos = sorted(p for p in DEMO_DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for i, photo in enumerate(photos[:15]):
        folder = root / ("mid/a" if i < 6 else "mid/b" if i < 12 else "small/c")
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(photo, folder / photo.name)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> tuple:
    """Two servers with the same mixture: one worker, and two workers with source ``big`` cached; a
    third whose TOML has changed the weights since."""
    root = tmp_path_factory.mktemp("mixtures")
    write_sources(root)
    config = root / "stoker.toml"
    config.write_text(config_text(root))
    changed = root / "changed.toml"
    changed.write_text(config_text(root, "big = 0.1, mid = 0.1, small = 0.8"))
    cluster = Cluster(root)
    try:
        yield (
            cluster.start("--config", str(config), datasets={}, workers=1),
            cluster.start("--config", str(config), "--cache", "big", "--cache-bytes", "64MiB", datasets={}, workers=2),
            cluster.start("--config", str(changed), datasets={}, workers=1),
        )
    finally:
        cluster.close()


def plan_of(client) -> Mixture:
    described = client.info.mixture
    return Mixture(
        tuple(described["sources"]), tuple(described["sizes"]), tuple(described["weights"]), EPOCH, client.spec.seed
    )


def pairs(batches: list[Batch]) -> list[tuple[int, int]]:
    """``(source, index in it)`` of every row, in order."""
    return [(int(s), int(i)) for batch in batches for i, s in zip(batch[2], batch[3], strict=True)]


def epoch_order(ranks: list[list[Batch]], batch: int) -> list[tuple[int, int]]:
    """The epoch's sequence put back together from the ranks' batches (global batch ``k * W + r``)."""
    out = []
    for k in range(len(ranks[0])):
        for rank in ranks:
            out += pairs([rank[k]])
    return out


def images_in_order(ranks: list[list[Batch]]) -> list[torch.Tensor]:
    """Every row's image in the order of the (re-)plan's positions (global batch ``k * W + r``)."""
    return [image for k in range(len(ranks[0])) for rank in ranks for image in rank[k][0]]


def same_bytes(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[i], y[i]) for i in (0, 2, 3)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_the_planned_sequence_each_pass_once(servers, world_size: int) -> None:
    endpoint = servers[1].data
    clients = [open_client(endpoint, "pretrain", world_size=world_size, rank=r, **OPTIONS) for r in range(world_size)]
    try:
        plan = plan_of(clients[0])
        assert plan.names == ("big", "mid", "small") and clients[0].info.samples == EPOCH
        for epoch in range(2):
            ranks = [list(client) for client in clients]
            assert len({len(rank) for rank in ranks}) == 1, "equal steps per rank"
            sources, indices = plan.epoch_plan(epoch)
            expected = list(zip(sources.tolist(), indices.tolist(), strict=True))
            served = epoch_order(ranks, 4)
            padding = len(served) - EPOCH
            assert served[:EPOCH] == expected and served[EPOCH:] == expected[:padding]
            assert Counter(s for s, _ in served[:EPOCH]) == {0: 24, 1: 12, 2: 4}
    finally:
        for client in clients:
            client.close()


def test_bytes_are_the_same_on_one_and_two_workers_and_two_servers(servers) -> None:
    """Also with and without the decoded cache: the second server caches source ``big``."""
    one, two, _ = servers
    runs = []
    for endpoints in (one.data, two.data, [one.data, two.data]):
        with open_client(endpoints, "pretrain", **OPTIONS) as client:
            runs.append([list(client) for _ in range(2)])
    for run in runs[1:]:
        assert all(same_bytes(a, b) for a, b in zip(runs[0], run, strict=True))
    cache = http_json(two.http + "/status")[1]["cache"]
    assert cache["datasets"] == ["big"] and 0 < cache["entries"] <= 48 and cache["hits"] > 0, cache


def test_resume_mid_epoch_gives_the_uninterrupted_batches(servers) -> None:
    endpoint = servers[0].data
    with open_client(endpoint, "pretrain", **OPTIONS) as client:
        whole = list(client)
    with open_client(endpoint, "pretrain", **OPTIONS) as client:
        first = list(islice(iter(client), 3))
        state = client.state_dict()
    assert state["mixture"]["sources"]["small"]["pass"] == 0
    with open_client(endpoint, "pretrain", **OPTIONS) as client:
        client.load_state_dict(state)
        rest = list(client)
    assert same_bytes(first + rest, whole)


def test_resume_on_three_ranks_serves_the_rest_once(servers) -> None:
    endpoint = servers[1].data
    old = [open_client(endpoint, "pretrain", world_size=2, rank=r, **OPTIONS) for r in range(2)]
    before = [list(islice(iter(client), 2)) for client in old]
    state = old[0].state_dict()
    plan = plan_of(old[0])
    for client in old:
        client.close()
    new = [open_client(endpoint, "pretrain", world_size=3, rank=r, **OPTIONS) for r in range(3)]
    for client in new:
        client.load_state_dict(state)
    after = [list(client) for client in new]
    for client in new:
        client.close()
    sources, indices = plan.epoch_plan(0)
    expected = Counter(zip(sources.tolist(), indices.tolist(), strict=True))
    served = Counter(pairs([b for rank in before for b in rank]) + pairs([b for rank in after for b in rank]))
    assert [len(rank) for rank in after] == [2, 2, 2]  # the 24 left, over 3 ranks: no padding
    assert served == expected, "each planned sample once, none lost"
    # Position by position, the bytes an uninterrupted run on 2 ranks gives (augmentation included).
    whole = [open_client(endpoint, "pretrain", world_size=2, rank=r, **OPTIONS) for r in range(2)]
    reference = [list(client) for client in whole]
    for client in whole:
        client.close()
    assert all(torch.equal(a, b) for a, b in zip(images_in_order(after), images_in_order(reference)[16:], strict=True))


@pytest.mark.parametrize("how", ["load_state_dict", "changed TOML"])
def test_new_weights_at_a_checkpoint_continue_every_pass(servers, how: str) -> None:
    endpoint = servers[0].data
    with open_client(endpoint, "pretrain", **OPTIONS) as client:
        first = list(islice(iter(client), 4))
        state = client.state_dict()
        plan = plan_of(client)
    new_weights = {"big": 0.1, "mid": 0.1, "small": 0.8}
    with open_client(servers[0 if how == "load_state_dict" else 2].data, "pretrain", **OPTIONS) as client:
        client.load_state_dict(state, weights=new_weights if how == "load_state_dict" else None)
        rest = list(client)
        following = list(client)
        saved = client.state_dict()
    assert saved["job"]["reweights"][-1] == [0, 16, pytest.approx(new_weights)]
    assert saved["mixture"]["sources"]["small"]["weight"] == pytest.approx(0.8)
    served = pairs(first + rest + following)
    counts = Counter(s for s, _ in pairs(following))
    assert counts == {0: 4, 1: 4, 2: 32}, "the next epoch follows the new weights"
    assert Counter(s for s, _ in pairs(rest)) == {0: 3, 1: 2, 2: 19}, "and the rest of this one"
    # Each source's draws go on from where its pass stood: the old plan up to the checkpoint, then the
    # continuation; every pass of every source gives each sample once.
    before = plan.epoch_plan(0)
    assert served[:16] == list(zip(before[0][:16].tolist(), before[1][:16].tolist(), strict=True))
    for s, size in enumerate(plan.sizes):
        draws = [i for source, i in served if source == s]
        for begin in range(0, len(draws), size):
            chunk = draws[begin : begin + size]
            assert len(set(chunk)) == len(chunk), f"source {s}: a sample repeated within a pass"


def test_a_sample_drawn_twice_in_an_epoch_is_augmented_afresh(servers) -> None:
    with open_client(servers[0].data, "pretrain", **OPTIONS) as client:
        rows = [(int(s), int(i), image) for b in client for image, i, s in zip(b[0], b[2], b[3], strict=True)]
    seen: dict[tuple[int, int], torch.Tensor] = {}
    repeats = 0
    for s, i, image in rows:
        if (s, i) in seen:
            repeats += 1
            assert not torch.equal(seen[(s, i)], image), f"sample {i} of source {s}: the same crop twice"
        seen[(s, i)] = image
    assert repeats >= 1  # small (3 samples) is drawn 4 times an epoch


def test_a_source_with_its_own_pipeline(servers) -> None:
    """``pipelines = {small = "eval"}``: small's rows are rendered by ``eval``, big's by the job's."""
    endpoint = servers[0].data
    with open_client(endpoint, "tuned", pipeline="train", **OPTIONS) as client:
        rows = [(int(s), int(i), image) for b in client for image, i, s in zip(b[0], b[2], b[3], strict=True)]
    with open_client(endpoint, "small", pipeline="eval", **OPTIONS) as client:
        small = {int(i): image for b in client for image, i in zip(b[0], b[2], strict=True)}
    assert {s for s, _, _ in rows} == {0, 1}
    assert all(torch.equal(image, small[i]) for s, i, image in rows if s == 1)


def test_weights_that_do_not_fit_the_job_are_refused_at_load(servers) -> None:
    endpoint = servers[0].data
    for dataset, weights, reason in (
        ("pretrain", {"big": 1.0, "mid": 1.0}, "missing \\['small'\\]"),
        ("pretrain", {"big": 1.0, "mid": 1.0, "small": -1.0}, "not a finite number >= 0"),
        ("big", {"big": 1.0}, "not a mixture"),
    ):
        with open_client(endpoint, dataset, **OPTIONS) as client:
            next(iter(client))
            state = client.state_dict()
        with open_client(endpoint, dataset, **OPTIONS) as client, pytest.raises(ValueError, match=reason):
            client.load_state_dict(state, weights=weights)


def test_status_and_metrics_show_each_source(servers) -> None:
    server = servers[1]  # it serves no re-weighted job: its furthest point has the declared weights
    with open_client(server.data, "pretrain", **OPTIONS) as client:
        list(client)
    status, body = http_json(server.http + "/status")
    assert status == 200
    rows = {row["source"]: row for row in body["mixtures"] if row["mixture"] == "pretrain"}
    assert set(rows) == set(WEIGHTS) and rows["big"]["weight"] == pytest.approx(0.6)
    assert all(row["pass_number"] >= 0 and row["position"] >= 0 for row in rows.values())

    def exported() -> bool:
        _, text = http_json(server.http + "/metrics")
        return 'stoker_mixture_weight{mixture="pretrain",source="small"}' in text

    wait_until(exported, timeout_s=30, what="mixture gauges on /metrics")


def test_a_mixture_naming_an_unknown_dataset_stops_the_server_at_start(tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text(f'[datasets.big]\npath = "{DEMO_DATA}"\n[mixtures.m]\ndatasets = {{big = 1, coco = 1}}\n')
    done = run_cli("serve", "--config", str(config), "--http", "127.0.0.1:0", timeout_s=60)
    assert done.returncode != 0 and "unknown datasets ['coco']" in done.stderr
