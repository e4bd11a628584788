"""The pure parts of running by demand: a client's demand window, capacity, the desired sizes, the
autoscaler's hysteresis and the verdicts."""

from __future__ import annotations

import math

import pytest

from stoker.server.engine.autoscale import Autoscaler
from stoker.server.engine.demand import Demand, Report
from stoker.server.engine.verdict import Signals, judge


def feed(demand: Demand, identity: bytes, rate: float, stall: float, seconds: float, served_share: float = 1.0) -> None:
    """A client taking ``rate`` images/s while waiting ``stall`` of its loop, reported every 0.1 s."""
    for i in range(int(seconds * 10) + 1):
        t = i / 10
        images = int(rate * t)
        demand.report(identity, "job", "train", Report(t, images, stall * t, t, int(images * served_share)))


def test_demand_is_what_the_loop_would_take_if_never_kept_waiting() -> None:
    demand = Demand(window_s=2.0, headroom=0.15)
    feed(demand, b"a", rate=300, stall=0.25, seconds=5)
    for t in range(6):
        demand.task_done("train", t, 100, 1.0)  # 100 images per busy worker-second
    (rates,) = demand.jobs()["job"]
    assert rates.consumed == pytest.approx(300, rel=0.02)
    assert rates.demand == pytest.approx(400, rel=0.02)  # 300 images in 0.75 s of computing
    assert rates.stall_share == pytest.approx(0.25, abs=0.01)
    sizing = demand.sizing(5.0, replica_workers=2)
    assert sizing.desired_workers == 5  # 400 / 100 * 1.15 = 4.6
    assert sizing.desired_replicas == 3  # 4.6 workers over 2 per replica


def test_a_server_sized_for_its_share_of_a_client_spread_over_several() -> None:
    demand = Demand(window_s=2.0, headroom=0.0)
    feed(demand, b"a", rate=400, stall=0.0, seconds=3, served_share=0.5)
    demand.task_done("train", 3.0, 100, 1.0)
    sizing = demand.sizing(3.0, replica_workers=2)
    assert sizing.desired_workers == 2 and sizing.desired_replicas == 2
    assert sizing.demand_ips == pytest.approx(200, rel=0.05)


def test_no_size_until_capacity_is_measured_and_gone_clients_count_no_more() -> None:
    demand = Demand(window_s=2.0, headroom=0.15)
    feed(demand, b"a", rate=100, stall=0.0, seconds=3)
    assert demand.sizing(3.0, 1).desired_workers is None
    demand.forget(b"a")
    demand.task_done("train", 3.0, 10, 1.0)
    assert demand.sizing(3.0, 1).desired_workers == 1


def test_autoscaler_grows_at_once_shrinks_after_a_sustained_surplus_and_keeps_its_interval() -> None:
    scaler = Autoscaler(1, 4, interval_s=30)
    assert scaler.decide(0, current=1, desired=3, busy=1) == 3
    assert scaler.decide(10, current=3, desired=4, busy=3) is None  # within the interval
    assert scaler.decide(31, current=3, desired=6, busy=3) == 4  # capped at MAX
    assert scaler.decide(70, current=4, desired=1, busy=0) is None  # surplus starts
    assert scaler.decide(80, current=4, desired=4, busy=4) is None  # and ends: a lull
    assert scaler.decide(90, current=4, desired=1, busy=0) is None
    assert scaler.decide(121, current=4, desired=1, busy=2) == 2  # never below the busy workers
    assert scaler.decide(121.5, current=2, desired=None, busy=0) is None


def test_autoscaler_brings_a_pool_inside_its_bounds_at_once() -> None:
    assert Autoscaler(2, 4, 30).decide(0, current=8, desired=None, busy=0) == 4
    with pytest.raises(ValueError):
        Autoscaler(3, 2, 30)


def signals(**changes: object) -> Signals:
    base = dict(
        stall_share=0.5,
        busy_share=0.98,
        workers=2,
        max_workers=8,
        desired_workers=5,
        read_ms=0.1,
        work_ms=2.0,
        send_ms=0.1,
        latency_ms=20.0,
        mb_per_s=50.0,
    )
    return Signals(**(base | changes))  # type: ignore[arg-type]


def test_verdicts() -> None:
    trainer = judge(signals(stall_share=0.02, busy_share=0.6))
    assert trainer is not None and trainer.line == "trainer-bound: loader 40% idle: the trainer is the bottleneck"
    loader = judge(signals())
    assert loader is not None and loader.kind == "loader-bound" and loader.add_workers == 3
    assert loader.advice.startswith("add 3 workers")
    replicas = judge(signals(workers=8, desired_workers=20))
    assert replicas is not None and replicas.add_replicas == 2 and "replicas" in replicas.advice
    network = judge(signals(busy_share=0.3, send_ms=15.0))
    assert network is not None and network.kind == "network-bound"
    storage = judge(signals(read_ms=1.5))
    assert storage is not None and storage.kind == "storage-bound"
    assert judge(signals(stall_share=None)) is None


def test_the_fleet_simulation_feeds_16_trainers_sooner_on_demand_than_on_cpu() -> None:
    from stoker.server.tools.fleet_sim import Model, simulate, summary

    model = Model()
    on_demand, on_cpu = simulate(model, on_demand=True), simulate(model, on_demand=False)
    assert on_demand.fed_at is not None and on_cpu.fed_at is not None and on_demand.fed_at < on_cpu.fed_at
    need = math.ceil(16 * model.rate * 1.15 / (model.workers * model.per_worker))
    assert on_demand.serving == need and on_demand.timeline[-1][3] == need
    assert "fed after" in summary(model)


def fair_setup() -> tuple:
    import numpy as np

    from stoker.client.protocol.job import JobSpec
    from stoker.server.engine.fairness import FairQueue, Weights
    from stoker.server.engine.jobs import OpenJob
    from stoker.server.engine.records import BatchWork, Task

    def job(dataset: str, world_size: int = 1) -> OpenJob:
        spec = JobSpec(dataset, world_size=world_size)
        return OpenJob(spec, spec.job_id, None, None, 100, 64)  # type: ignore[arg-type]  # fairness reads spec and id

    def work(on: OpenJob, rank: int, k: int) -> BatchWork:
        rows = np.arange(4)
        return BatchWork((on.job_id, 0, rank, k), on, rows, rows, {}, {}, set(range(4)))

    fair = FairQueue(Weights({"light": 1, "heavy": 3}))
    return fair, job, work, Task


def test_weighted_fair_queuing_gives_worker_time_by_weight_and_the_laggard_rank_first() -> None:
    fair, job, work, Task = fair_setup()
    light, heavy = job("light"), job("heavy")
    queue = [work(light, 0, k) for k in range(200)] + [work(heavy, 0, k) for k in range(200)]
    used = {light.job_id: 0.0, heavy.job_id: 0.0}
    for task_id in range(200):
        chosen = fair.pick(queue)
        queue.remove(chosen)
        task = Task(task_id, chosen, [(0, 0)])
        fair.cut(task)
        fair.done(task, 0.01, float(task_id))
        used[chosen.key[0]] += 0.01
    assert used[heavy.job_id] / used[light.job_id] == pytest.approx(3, rel=0.05)
    # Within a job, the rank furthest behind first.
    ddp = job("light", world_size=2)
    assert fair.pick([work(ddp, 0, 7), work(ddp, 1, 5), work(ddp, 0, 6)]).key[2:] == (1, 5)


def test_a_newcomer_starts_level_with_busy_jobs_and_is_served_next() -> None:
    fair, job, work, Task = fair_setup()
    old, new = job("heavy"), job("other")
    for task_id in range(50):
        chosen = fair.pick([work(old, 0, task_id)])
        task = Task(task_id, chosen, [(0, 0)])
        fair.cut(task)
        fair.done(task, 1.0, float(task_id))
    assert fair.pick([work(old, 0, 50), work(new, 0, 0)]).key[0] == new.job_id


def test_a_client_weight_is_checked_and_sent_with_its_demand_figures() -> None:
    from stoker.client import RemoteBatches
    from stoker.client.runtime.stats import Stats

    for bad in (0, -1, 1001, "x"):
        with pytest.raises(ValueError, match="weight"):
            RemoteBatches("tcp://127.0.0.1:1", "demo", weight=bad)  # type: ignore[arg-type]
    assert RemoteBatches("tcp://127.0.0.1:1", "demo", weight=0.5).weight == 0.5
    assert Stats(0.5).progress() == {"waited_s": 0.0, "elapsed_s": 0.0, "images": 0, "weight": 0.5}
    assert "weight" not in Stats().progress()


def test_a_mixture_declares_its_own_weight() -> None:
    """``weight = 3`` in a ``[mixtures.NAME]`` table is its jobs' fair-share weight, as for a dataset."""
    from stoker.server.data.catalog import Catalog, DatasetDecl
    from stoker.server.data.mixtures import MixtureDecl
    from stoker.server.engine.fleet import Fleet
    from tests.helpers import DEFAULTS, DEMO_DATA

    decls = [DatasetDecl("a", str(DEMO_DATA), weight=2.0), DatasetDecl("b", str(DEMO_DATA))]
    mixture = MixtureDecl("mix", {"a": 0.7, "b": 0.3}, weight=3.0)
    fleet = Fleet(DEFAULTS, Catalog(decls=decls, mixtures=[mixture]))
    assert (fleet.weights.declared("a"), fleet.weights.declared("b"), fleet.weights.declared("mix")) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="weight"):
        MixtureDecl("mix", {"a": 1.0}, weight=0.0)
