"""A small simulation of a loader fleet behind one job whose trainers go from 4 to 16: the replicas
that scaling on demand (``stoker_desired_replicas`` through KEDA, computed by the server's own
:class:`~stoker.server.engine.demand.Demand`) and scaling on CPU (the HPA of
``deploy/kubernetes/hpa.yaml``) ask for, second by second, and when the trainers are fed again.

``python -m stoker.server.tools.fleet_sim`` prints the timeline and the summary (deploy/README.md
quotes it). The model: each trainer's loop would take ``rate`` images/s; a replica runs ``workers``
workers of ``per_worker`` images/s each; a new pod serves ``start_s`` after it is asked for; both
autoscalers look every ``poll_s`` and may double the replicas per 30 s (KEDA's scale-up policy here;
the HPA's default allows as much); CPU utilisation is the workers' busy share, target 75 %.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from stoker.server.engine.demand import Demand, Report

__all__ = ["Fleet", "simulate", "main"]


@dataclass(frozen=True)
class Model:
    """The fleet and its trainers."""

    trainers_before: int = 4
    trainers_after: int = 16
    change_at_s: float = 60.0
    rate: float = 700.0
    """Images/s one trainer's loop takes (a ResNet-50 step on one recent GPU, about)."""
    workers: int = 16
    per_worker: float = 180.0
    """Images/s one worker renders (ImageNet-sized JPEG, random resized crop to 224)."""
    start_s: float = 45.0
    """From a pod asked for to a pod serving (image pulled, workers started, DNS re-resolved)."""
    poll_s: float = 15.0
    min_replicas: int = 2
    max_replicas: int = 32
    cpu_target: float = 0.75
    headroom: float = 0.15
    window_s: float = 10.0
    duration_s: float = 300.0

    def __post_init__(self) -> None:
        if min(self.trainers_before, self.trainers_after, self.workers, self.min_replicas) < 1:
            raise ValueError("trainers, workers and replicas are at least 1")
        if self.rate <= 0 or self.per_worker <= 0 or self.poll_s <= 0 or not 0 < self.cpu_target <= 1:
            raise ValueError("rates, the poll interval and the CPU target must be positive")


@dataclass
class Fleet:
    """Replicas serving and asked for, under one autoscaler."""

    model: Model
    decide: Callable[[Fleet, float], int]
    serving: int = 2
    pending: list[float] = field(default_factory=list)
    """When each pod asked for starts serving."""
    last_up: float = -1e9
    fed_at: float | None = None
    timeline: list[tuple[float, int, float, int]] = field(default_factory=list)
    """``(t, serving, stall share, desired)``."""

    @property
    def asked(self) -> int:
        return self.serving + len(self.pending)

    def scale(self, now: float, desired: int) -> None:
        m = self.model
        desired = min(m.max_replicas, max(m.min_replicas, desired))
        if desired > self.asked:
            # Up by at most 100 % per 30 s (both autoscalers' scale-up policy).
            if now - self.last_up < 30.0:
                return
            add = min(desired - self.asked, self.asked)
            self.pending += [now + m.start_s] * add
            self.last_up = now
        elif desired < self.serving and not self.pending:
            self.serving = max(desired, self.serving - 1)  # slowly, draining (one pod per poll)


def demand_decider(demand: Demand) -> Callable[[Fleet, float], int]:
    """KEDA on ``max(stoker_desired_replicas)``: the server's own sizing."""

    def decide(fleet: Fleet, now: float) -> int:
        return demand.sizing(now, fleet.model.workers).desired_replicas or fleet.asked

    return decide


def cpu_decider(busy: Callable[[], float]) -> Callable[[Fleet, float], int]:
    """The HPA on CPU: ``ceil(replicas x utilisation / target)``, with its 10 % tolerance."""

    def decide(fleet: Fleet, now: float) -> int:
        ratio = busy() / fleet.model.cpu_target
        return fleet.serving if abs(ratio - 1) <= 0.1 else math.ceil(fleet.serving * ratio)

    return decide


def simulate(model: Model, on_demand: bool) -> Fleet:
    """Run the model for ``duration_s`` with one autoscaler; 1 s steps."""
    demand = Demand(model.window_s, model.headroom)
    state = {"busy": 0.0}
    fleet = Fleet(model, demand_decider(demand) if on_demand else cpu_decider(lambda: state["busy"]))
    fleet.serving = model.min_replicas
    images = [0.0] * model.trainers_after
    waited = [0.0] * model.trainers_after
    for step in range(int(model.duration_s) + 1):
        now = float(step)
        fleet.serving += sum(1 for at in fleet.pending if at <= now)
        fleet.pending = [at for at in fleet.pending if at > now]
        trainers = model.trainers_before if now < model.change_at_s else model.trainers_after
        wanted = trainers * model.rate
        capacity = fleet.serving * model.workers * model.per_worker
        supplied = min(wanted, capacity)
        stall = 1.0 - supplied / wanted
        state["busy"] = supplied / capacity
        for i in range(trainers):
            # A loop fed a share s of what it wants computes s of the time and waits the rest.
            images[i] += supplied / trainers
            waited[i] += stall
            report = Report(now, int(images[i]), waited[i], now + 1.0, int(images[i] / fleet.serving))
            demand.report(bytes([i]), "job", "train", report)
        busy_seconds = supplied / fleet.serving / model.per_worker
        demand.task_done("train", now, int(supplied / fleet.serving), busy_seconds)
        desired = demand.sizing(now, model.workers).desired_replicas or 0
        fleet.timeline.append((now, fleet.serving, stall, desired))
        if now >= model.change_at_s and fleet.fed_at is None and stall < 0.01:
            fleet.fed_at = now - model.change_at_s
        if step % int(model.poll_s) == 0:
            fleet.scale(now, fleet.decide(fleet, now))
    return fleet


def summary(model: Model) -> str:
    """Both autoscalers side by side."""
    runs = {"demand (KEDA, stoker_desired_replicas)": simulate(model, True), "CPU (HPA, 75 %)": simulate(model, False)}
    need = math.ceil(model.trainers_after * model.rate * (1 + model.headroom) / (model.workers * model.per_worker))
    lines = [
        f"{model.trainers_before} -> {model.trainers_after} trainers of {model.rate:.0f} images/s at "
        f"t={model.change_at_s:.0f} s; a replica: {model.workers} workers x {model.per_worker:.0f} images/s; "
        f"pods serve {model.start_s:.0f} s after they are asked for",
        f"demand needs {need} replicas with {model.headroom:.0%} headroom",
        "",
        "autoscaler                               fed after   replicas at the end   stall-seconds",
    ]
    for name, fleet in runs.items():
        fed = "never" if fleet.fed_at is None else f"{fleet.fed_at:.0f} s"
        lost = sum(stall for t, _, stall, _ in fleet.timeline if t >= model.change_at_s)
        lines.append(f"{name:40} {fed:>9}   {fleet.serving:>19}   {lost:>13.1f}")
    lines += ["", "t (s)  demand: serving desired stall   cpu: serving stall"]
    demand_run, cpu_run = runs.values()
    for (t, serving, stall, desired), (_, cpu_serving, cpu_stall, _) in zip(
        demand_run.timeline, cpu_run.timeline, strict=True
    ):
        if t % 15 == 0 and model.change_at_s - 15 <= t <= model.change_at_s + 180:
            lines.append(f"{t:5.0f}  {serving:15} {desired:7} {stall:5.0%}   {cpu_serving:12} {cpu_stall:5.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m stoker.server.tools.fleet_sim [--rate R] [--per-worker P] ...``"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Model()
    for name in ("trainers_before", "trainers_after", "rate", "workers", "per_worker", "start_s"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    model = Model(**{name: getattr(args, name) for name in vars(args)})
    import sys

    sys.stdout.write(summary(model) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
