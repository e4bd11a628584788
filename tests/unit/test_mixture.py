"""The mixture planner at scale: counts, low discrepancy, exactly once per source pass across epochs
and ranks, re-weighting at a resume point; and the mixture declarations refused at start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stoker.client.protocol.errors import ProtocolError
from stoker.client.protocol.job import JobSpec
from stoker.client.protocol.mixture import Mixture, apportion, prefix_bound
from stoker.client.protocol.plan import batch_indices, batches_per_rank
from stoker.server.settings.sources import load_settings

NAMES = ("big", "mid", "small")
SIZES = (5000, 1200, 37)  # big spans epochs, small wraps many times in one
WEIGHTS = (0.6, 0.3, 0.1)
EPOCH = 3000


def mixture(**changes) -> Mixture:
    values = dict(names=NAMES, sizes=SIZES, weights=WEIGHTS, epoch_samples=EPOCH, seed=5)
    return Mixture(**(values | changes))


def counts(sources: np.ndarray, count: int) -> np.ndarray:
    """Per source, how many of each prefix of ``sources`` are it: shape ``(count, len + 1)``."""
    return np.stack([np.concatenate([[0], np.cumsum(sources == s)]) for s in range(count)])


def stream(plan: Mixture, epochs: int) -> list[np.ndarray]:
    """Each source's draws over ``epochs`` epochs, in order."""
    draws: list[list[np.ndarray]] = [[] for _ in plan.names]
    for epoch in range(epochs):
        sources, indices = plan.epoch_plan(epoch)
        for s in range(len(plan.names)):
            draws[s].append(indices[sources == s])
    return [np.concatenate(d) for d in draws]


def assert_passes_exactly_once(draws: np.ndarray, size: int, start: int = 0) -> None:
    """Draws from draw number ``start`` on: every whole pass is a permutation, a partial one repeats nothing."""
    head = (size - start % size) % size  # the rest of the pass the stream starts in
    assert len(set(draws[:head].tolist())) == len(draws[:head])
    rest = draws[head:]
    for begin in range(0, len(rest), size):
        chunk = rest[begin : begin + size]
        assert len(set(chunk.tolist())) == len(chunk), f"a sample repeated in pass {begin // size}"
        if len(chunk) == size:
            assert sorted(chunk.tolist()) == list(range(size))


def test_epoch_counts_follow_the_weights_within_one() -> None:
    plan = mixture()
    for epoch in range(3):
        got = np.bincount(plan.sources(epoch), minlength=3)
        assert got.sum() == EPOCH
        assert np.all(np.abs(got - EPOCH * np.array(WEIGHTS)) <= 1), got
    assert apportion(10, (1, 1, 1)).tolist() == [4, 3, 3]


@pytest.mark.parametrize(
    "weights", [(0.6, 0.3, 0.1), (0.5, 0.5), (0.7, 0.3), (0.01, 0.99), (0.4, 0.3, 0.2, 0.1), (0.9, 0.05, 0.05)]
)
def test_every_prefix_and_window_stays_near_its_share(weights) -> None:
    n = len(weights)
    plan = Mixture(tuple(f"s{i}" for i in range(n)), (100,) * n, weights, 20_000, seed=1)
    c = counts(plan.sources(0), n)
    share = np.array(weights) / sum(weights)
    ideal = np.arange(c.shape[1]) * share[:, None]
    for s in range(n):
        assert np.abs(c[s] - ideal[s]).max() <= prefix_bound(share[s], n) + 1e-9
        window = np.abs(c[s, 64:] - c[s, :-64] - 64 * share[s]).max()
        assert window <= 2 * prefix_bound(share[s], n) + 1e-9
        if n == 2 or weights == WEIGHTS:  # where "within 1 over every window" holds
            assert window <= 1 + 1e-9, (weights, s, window)


def test_each_source_pass_gives_each_sample_once_across_epochs() -> None:
    plan = mixture()
    for draws, size in zip(stream(plan, 4), SIZES, strict=True):
        assert_passes_exactly_once(draws, size)
    states = plan.states(4)
    assert [s.draws for s in states] == [4 * 1800, 4 * 900, 4 * 300]
    assert (states[0].pass_, states[0].position) == (1, 2200)  # big: one epoch is under half a pass


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_the_epoch_exactly_once(world_size: int) -> None:
    plan = mixture(epoch_samples=300)
    sources, indices = plan.epoch_plan(0)
    order = np.arange(300)
    batches = batches_per_rank(300, 8, world_size, False)
    served = np.concatenate(
        [batch_indices(order, 8, world_size, False, r, k) for r in range(world_size) for k in range(batches)]
    )
    positions, repeats = np.unique(served, return_counts=True)
    assert positions.tolist() == list(range(300))
    assert repeats.sum() - 300 == -(-300 // world_size) * world_size - 300  # DistributedSampler's padding only
    # Sample by sample the ranks serve the planned (source, index) pairs: padding only repeats.
    planned = set(zip(sources.tolist(), indices.tolist(), strict=True))
    assert {(int(sources[p]), int(indices[p])) for p in served} == planned


def test_reweighting_keeps_passes_and_follows_the_new_weights() -> None:
    old = mixture()
    point = (1, 1234)
    new = mixture(reweights=((*point, (0.1, 0.1, 0.8)),))
    # Before the point nothing changes; from it on the new weights hold.
    assert np.array_equal(old.epoch_plan(0)[0], new.epoch_plan(0)[0])
    assert np.array_equal(old.epoch_plan(1)[1][:1234], new.epoch_plan(1)[1][:1234])
    after = np.bincount(new.sources(1)[1234:], minlength=3)
    assert np.all(np.abs(after - (EPOCH - 1234) * np.array([0.1, 0.1, 0.8])) <= 1)
    assert np.all(np.abs(np.bincount(new.sources(2), minlength=3) - EPOCH * np.array([0.1, 0.1, 0.8])) <= 1)
    # Each source continues its pass where it stood: no sample of a pass repeated or lost.
    for draws, size in zip(stream(new, 4), SIZES, strict=True):
        assert_passes_exactly_once(draws, size)
    assert [s.draws for s in new.states(*point)] == [s.draws for s in old.states(*point)]
    assert new.weights_at(*point) == (0.1, 0.1, 0.8) and new.weights_at(1, 1233) == WEIGHTS
    # A change of weights at the end of an epoch is one at the next one's start.
    assert np.array_equal(
        mixture(reweights=((0, EPOCH, (1, 1, 1)),)).sources(1), mixture(reweights=((1, 0, (1, 1, 1)),)).sources(1)
    )


def test_weights_pinned_at_the_start_replace_the_declared_ones() -> None:
    """A job planned with weights the servers no longer declare pins them at (0, 0)."""
    later = (1, 500, (0.2, 0.2, 0.6))
    pinned = mixture(weights=(1, 1, 1), reweights=((0, 0, WEIGHTS), later))
    for epoch in range(3):
        assert np.array_equal(pinned.epoch_plan(epoch)[1], mixture(reweights=(later,)).epoch_plan(epoch)[1])


def test_the_plan_is_seeded() -> None:
    assert not np.array_equal(mixture().epoch_plan(0)[1], mixture(seed=6).epoch_plan(0)[1])
    assert np.array_equal(mixture().epoch_plan(2)[1], mixture().epoch_plan(2)[1])


def test_reweights_in_the_job_spec_keep_other_ids() -> None:
    plain = JobSpec("pretrain")
    changed = JobSpec("pretrain", reweights=[[1, 8, {"small": 2, "big": 1}]])
    assert "reweights" not in plain.to_wire()
    assert changed.reweights == ((1, 8, (("big", 1.0), ("small", 2.0))),)
    assert JobSpec.from_wire(changed.to_wire()) == changed and changed.job_id != plain.job_id
    for bad in ([[1, 8, {"big": -1}]], [[1, 8, {}]], [[1, 8]], [["x", 8, {"big": 1}]], [[1, 8, {"big": "a"}]]):
        with pytest.raises(ProtocolError):
            JobSpec.from_wire({"dataset": "pretrain", "reweights": bad})


DATASETS = """
[datasets.big]
path = "/nowhere/big"
[datasets.small]
path = "/nowhere/small"
"""


@pytest.mark.parametrize(
    ("mixture_toml", "reason"),
    [
        ("[mixtures.m]\ndatasets = {big = 0.5, coco = 0.5}", "unknown datasets ['coco']"),
        ("[mixtures.m]\ndatasets = {big = 0.5, small = 0}", "must be > 0"),
        ("[mixtures.m]\ndatasets = {big = 0.5, small = -1}", "is not a finite number >= 0"),
        ('[mixtures.m]\ndatasets = {big = "lots", small = 1}', "weight 'lots' is not a finite number"),
        ("[mixtures.big]\ndatasets = {small = 1}", "has the name of a declared dataset"),
        ('[mixtures.m]\ndatasets = {big = 1}\npipelines = {big = "det"}', "unknown pipelines ['det']"),
        ('[mixtures.m]\ndatasets = {big = 1}\npipelines = {small = "eval"}', "names ['small'], which are not"),
    ],
)
def test_mixtures_that_cannot_be_served_are_refused_naming_why(tmp_path: Path, mixture_toml: str, reason: str) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text(DATASETS + mixture_toml)
    settings = load_settings(config, env={})
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        settings.mixture_decls()


def test_a_declared_mixture_is_read(tmp_path: Path) -> None:
    config = tmp_path / "stoker.toml"
    config.write_text(DATASETS + "[mixtures.pretrain]\ndatasets = {small = 1, big = 3}\nepoch_samples = 2_000")
    (decl,) = load_settings(config, env={}).mixture_decls()
    assert decl.sources == ("big", "small") and decl.base_weights() == (0.75, 0.25) and decl.epoch_samples == 2000


def test_a_job_for_a_dataset_refuses_reweights() -> None:
    from stoker.server.data.catalog import Catalog
    from stoker.server.data.table import TableBuilder
    from stoker.server.engine.jobs import JobRegistry
    from stoker.server.imaging.pipelines import BUILTIN_PIPELINES

    builder = TableBuilder("big", ["/nowhere"])
    for i in range(10):
        builder.add(0, f"{i}.jpg", 0)
    jobs = JobRegistry(Catalog([builder.build()]), BUILTIN_PIPELINES, 64, 512)
    with pytest.raises(ProtocolError, match="not a mixture"):
        jobs.open(JobSpec("big", reweights=[[0, 0, {"big": 1}]]))
