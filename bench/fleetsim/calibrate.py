"""Replay a wall-clock suite run in virtual time and compare, point by point.

Input: the ``<name>.json`` that ``python -m bench`` writes. Every point of it whose contender has a
virtual-time model (round-robin and our gateway's profiles) is rebuilt exactly as
``bench.suite.run`` built it - the same workload generator, arguments, seed (``seed + i`` for
sweep point *i*, ``seed + 1000`` for the probe, ``seed + 100 + j`` for extra workload *j*),
duration and drain timeout, the same fleet flags - and simulated. The comparison gives the p50
and p90 TTFT error of the virtual run against the wall-clock one, and whether the contenders
rank the same by p90 TTFT at each (workload, QPS).

The wall-clock gateway breaks score ties with an unseeded rng (and Envoy's workers start their
round-robin at random pods), so one wall-clock run is one draw: every point is simulated with
several seeds and compared by the median, with the seeds' range shown beside it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bench.fleetsim.core import FleetSpec, SimResult, contender_named, simulate
from bench.fleetsim.trace import from_conversations
from bench.workloads import WORKLOADS

__all__ = ["Compared", "calibrate", "fleet_of", "format_calibration", "point_sessions", "rankings"]


@dataclass(slots=True)
class Compared:
    contender: str
    workload: str
    mode: str
    qps: float
    wall: dict[str, Any]  # the suite's summary
    virtual: list[SimResult]  # one per seed

    def values(self, key: str) -> list[float]:
        return [getattr(v.summary(), key) for v in self.virtual]

    def median(self, key: str) -> float:
        return statistics.median(self.values(key))

    def error(self, key: str) -> float:
        """(virtual median - wall) / wall of a summary field."""
        w = self.wall[key]
        return (self.median(key) - w) / w if w else math.nan


def fleet_of(cfg: dict[str, Any], *, http_latency: float = 0.0) -> FleetSpec:
    """The virtual fleet of a suite config (its ``config`` in the suite JSON)."""
    return FleetSpec(
        replicas=cfg["replicas"],
        model=cfg["model"],
        adapters=cfg["adapters"],
        sim_args=tuple(cfg["sim_args"]),
        http_latency=http_latency,
    )


def point_sessions(cfg: dict[str, Any], point: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The conversations ``bench.suite.run`` sent for ``point``, and simulate() options."""
    sweep = cfg["sweep_workload"]
    if point["workload"] == sweep and point["mode"] == "probe":
        gen = WORKLOADS[sweep]
        n = cfg["probe_requests"]
        convs = gen(qps=1.0, duration=10.0 * n + 10.0, seed=cfg["seed"] + 1000, **cfg["sweep_args"])
        return convs[:n], {"concurrency": 1, "duration": cfg["duration"] * 3}
    if point["workload"] == sweep:
        i = cfg["sweep_qps"].index(point["qps"])
        convs = WORKLOADS[sweep](
            qps=point["qps"], duration=cfg["duration"], seed=cfg["seed"] + i, **cfg["sweep_args"]
        )
        return convs, {"duration": cfg["duration"]}
    for j, extra in enumerate(cfg["extra"]):
        if extra["workload"] == point["workload"] and extra["qps"] == point["qps"]:
            duration = extra["duration"] or cfg["duration"]
            convs = WORKLOADS[extra["workload"]](
                qps=extra["qps"], duration=duration, seed=cfg["seed"] + 100 + j, **extra["args"]
            )
            return convs, {"duration": duration}
    raise ValueError(f"point {point['workload']} @ {point['qps']} is not in the suite config")


@dataclass(frozen=True)
class SuitePoint:
    """One point of a suite result the simulator can run: its place in ``result["points"]``,
    the fleet, the contender, the sessions the suite sent and the simulate() options."""

    index: int
    point: dict[str, Any]
    fleet: FleetSpec
    contender: Any
    sessions: Any
    options: dict[str, Any]


def simulable_points(result: dict[str, Any], *, http_latency: float = 0.0) -> Iterator[SuitePoint]:
    """The points of a suite result (``data["result"]`` of the suite JSON) whose contender the
    simulator has, in order."""
    cfg = result["config"]
    fleet = fleet_of(cfg, http_latency=http_latency)
    for i, point in enumerate(result["points"]):
        try:
            contender = contender_named(point["contender"])
        except ValueError:
            continue
        convs, options = point_sessions(cfg, point)
        yield SuitePoint(i, point, fleet, contender, from_conversations(convs), options)


def calibrate(
    result: dict[str, Any], *, seeds: Sequence[int] = range(5), http_latency: float = 0.0
) -> tuple[list[Compared], float]:
    """(one comparison per simulable point, wall seconds the virtual runs took)."""
    cfg = result["config"]
    out: list[Compared] = []
    began = time.perf_counter()
    for p in simulable_points(result, http_latency=http_latency):
        point = p.point
        runs = [
            simulate(
                p.sessions,
                p.contender,
                fleet=p.fleet,
                seed=seed,
                drain_timeout=cfg["drain_timeout"],
                workload=point["workload"],
                qps=point["qps"],
                **p.options,
            )
            for seed in seeds
        ]
        out.append(
            Compared(
                point["contender"], point["workload"], point["mode"], point["qps"],
                point["summary"], runs,
            )
        )  # fmt: skip
    return out, time.perf_counter() - began


def rankings(compared: Sequence[Compared], key: str = "ttft_p90") -> list[tuple[str, str, str]]:
    """Per (workload, QPS) of open-loop points: (case, wall ranking, virtual ranking)."""
    groups: dict[tuple[str, float], list[Compared]] = {}
    for c in compared:
        if c.mode == "open":
            groups.setdefault((c.workload, c.qps), []).append(c)
    out = []
    for (workload, qps), cs in groups.items():
        wall = sorted(cs, key=lambda c: c.wall[key])
        virt = sorted(cs, key=lambda c: c.median(key))
        out.append(
            (
                f"{workload} @ {qps:g}",
                " < ".join(c.contender for c in wall),
                " < ".join(c.contender for c in virt),
            )
        )
    return out


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.0f}"


def format_calibration(compared: Sequence[Compared]) -> str:
    lines = [
        "| contender | workload | QPS | TTFT p50 wall / virtual (ms) | error | "
        "TTFT p90 wall / virtual (ms) | error | virtual p90 over seeds (ms) | "
        "seeds below wall p90 | cached wall / virtual | ok wall / virtual |",
        "|" + " --- |" * 11,
    ]
    for c in compared:
        p90s = c.values("ttft_p90")
        lines.append(
            f"| {c.contender} | {c.workload} | {'probe' if c.mode == 'probe' else f'{c.qps:g}'} | "
            f"{_ms(c.wall['ttft_p50'])} / {_ms(c.median('ttft_p50'))} | "
            f"{c.error('ttft_p50'):+.0%} | "
            f"{_ms(c.wall['ttft_p90'])} / {_ms(c.median('ttft_p90'))} | "
            f"{c.error('ttft_p90'):+.0%} | {_ms(min(p90s))}-{_ms(max(p90s))} | "
            f"{sum(v < c.wall['ttft_p90'] for v in p90s)}/{len(p90s)} | "
            f"{c.wall['cached_fraction']:.2f} / {c.median('cached_fraction'):.2f} | "
            f"{c.wall['ok']} / {min(c.values('ok'))} |"
        )
    lines += ["", "| case | wall-clock ranking by p90 TTFT | virtual-time ranking | same |"]
    lines.append("| --- | --- | --- | --- |")
    for case, wall, virt in rankings(compared):
        lines.append(f"| {case} | {wall} | {virt} | {'yes' if wall == virt else 'NO'} |")
    return "\n".join(lines)
