"""Sweep a scheduler profile's weights and arguments over workloads, in virtual time.

A parameter is ``<plugin>.weight=v1,v2,...`` (a scorer's weight; a scorer the base profile lacks is
added) or ``<plugin>.<arg>=v1,v2,...`` (a filter's or scorer's argument, as in the profile:
``saturation.max_waiting=4,8``, ``prefix-cache.capacity=4096,8192``). Every combination of the
values runs every workload with every seed as the gateway-wide default profile; the score of a
setting is the geometric mean, over (workload, seed), of its metric (lower is better, e.g. p90
TTFT) divided by the base profile's. A setting that loses a request (an error of any kind) is
ranked after every setting that loses none.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.fleetsim.core import FleetSpec, simulate
from bench.fleetsim.trace import TraceSession
from fleet.profile import DEFAULT_PROFILE, SchedulerProfile

__all__ = ["METRICS", "Param", "Setting", "apply", "format_table", "parse_param", "tune"]

METRICS = ("ttft_p50", "ttft_p90", "ttft_p99", "ttft_mean", "itl_p90", "e2e_p50", "e2e_p90")
"""Summary fields a sweep may minimise."""


@dataclass(frozen=True, slots=True)
class Param:
    plugin: str
    field: str  # "weight" or an argument name
    values: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.plugin}.{self.field}"


def parse_param(text: str) -> Param:
    """``prefix-cache.weight=1,2,3`` -> Param; ValueError naming what is wrong."""
    left, eq, right = text.partition("=")
    plugin, dot, name = left.strip().rpartition(".")
    if not eq or not dot or not plugin or not name:
        raise ValueError(f"--param {text!r}: expected <plugin>.<weight|arg>=v1,v2,...")
    values: list[float] = []
    for raw in right.split(","):
        raw = raw.strip()
        try:
            v = float(raw)
        except ValueError:
            raise ValueError(f"--param {text!r}: {raw!r} is not a number") from None
        values.append(int(v) if v.is_integer() else v)
    return Param(plugin, name, tuple(values))


def apply(base: SchedulerProfile, setting: dict[str, float]) -> SchedulerProfile:
    """``base`` with ``setting`` ({"plugin.field": value}) applied."""
    data: dict[str, Any] = base.model_dump(exclude_none=True)
    for key, value in setting.items():
        plugin, _, name = key.rpartition(".")
        found = [p for kind in ("filters", "scorers") for p in data[kind] if p["name"] == plugin]
        if not found:
            if name != "weight":
                raise ValueError(f"{key}: the base profile has no plugin '{plugin}'")
            data["scorers"].append({"name": plugin, "weight": value})
            continue
        spec = found[0]
        if name == "weight":
            if spec in data["filters"]:
                raise ValueError(f"{key}: '{plugin}' is a filter; filters have no weight")
            spec["weight"] = value
        else:
            spec["args"] = {**(spec.get("args") or {}), name: value}
    return SchedulerProfile.model_validate(data)


@dataclass(slots=True)
class Setting:
    values: dict[str, float]
    metric: dict[str, float] = field(default_factory=dict)  # workload -> mean over seeds
    ratio: float = math.nan  # geometric mean of metric / base metric
    errors: int = 0

    def label(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.values.items()) or "(base profile)"


def tune(
    workloads: Sequence[tuple[str, Sequence[TraceSession]]],
    params: Sequence[Param],
    *,
    base: SchedulerProfile = DEFAULT_PROFILE,
    fleet: FleetSpec | None = None,
    seeds: Sequence[int] = (0,),
    metric: str = "ttft_p90",
    drain_timeout: float = 30.0,
) -> tuple[Setting, list[Setting]]:
    """(the base profile's result, every setting best first)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if not workloads:
        raise ValueError("tune needs at least one workload")
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a parameter is given twice: {keys}")
    for p in params:  # bad names or values fail before the first simulation
        apply(base, {p.key: p.values[0]})

    def run(profile: SchedulerProfile, values: dict[str, float]) -> Setting:
        s = Setting(values)
        for label, sessions in workloads:
            got = []
            for seed in seeds:
                res = simulate(
                    sessions,
                    "ours-default",
                    fleet=fleet,
                    seed=seed,
                    drain_timeout=drain_timeout,
                    default_profile=profile,
                )
                summary = res.summary()
                s.errors += summary.errors
                got.append(getattr(summary, metric))
            s.metric[label] = sum(got) / len(got)
        return s

    base_setting = run(base, {})
    out: list[Setting] = []
    for combo in itertools.product(*(p.values for p in params)):
        values = dict(zip(keys, combo, strict=True))
        s = run(apply(base, values), values)
        logs = [
            math.log(s.metric[w] / base_setting.metric[w])
            for w, _ in workloads
            if base_setting.metric[w] > 0 and s.metric[w] > 0
        ]
        s.ratio = math.exp(sum(logs) / len(logs)) if logs else math.nan
        out.append(s)
    out.sort(key=lambda s: (s.errors > 0, s.ratio))
    return base_setting, out


def format_table(base: Setting, settings: Sequence[Setting], metric: str) -> str:
    workloads = list(base.metric)
    head = ["rank", "setting", *(f"W{i + 1} {metric} (ms)" for i in range(len(workloads)))]
    head += ["vs base", "vs best", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    best = settings[0].ratio if settings else math.nan
    rows = [(str(i + 1), s) for i, s in enumerate(settings)] + [("base", base)]
    for rank, s in rows:
        ratio = 1.0 if s is base else s.ratio
        cells = [rank, s.label(), *(f"{s.metric[w] * 1000:.0f}" for w in workloads)]
        cells += [f"{ratio:.3f}", f"{(ratio / best - 1) * 100:+.1f}%", str(s.errors)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- W{i + 1}: `{w}`" for i, w in enumerate(workloads)]
    return "\n".join(lines)
