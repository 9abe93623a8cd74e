"""Virtual-time speed against the wall clock, point by point.

Every point of a wall-clock suite run (the ``<name>.json`` of ``python -m bench``) whose contender
has a virtual-time model is simulated as ``calibrate`` rebuilds it (same workload, seed, duration,
drain timeout, fleet flags), with scheduler seed 0. The figure is the simulation's CPU time
(``time.process_time``, best of ``repeat``: on a shared machine the wall time of a sub-second run
varies 2-4x with the load, its CPU time much less) against the wall-clock point's own wall time
(first send to last completion; fleet start-up excluded).

``cold`` (the default) empties the process's caches before every run - the chat template's token
ids, the output plans and the block-hash memo - so each run tokenises and hashes its prompts from
scratch, as a first run of a process does; warm runs keep them, as a calibration or tuning sweep
does after its first run over the same prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.fleetsim.calibrate import simulable_points
from bench.fleetsim.core import reset_caches, simulate

__all__ = ["SpeedRow", "format_speed", "speed"]


@dataclass(frozen=True, slots=True)
class SpeedRow:
    contender: str
    workload: str
    mode: str
    qps: float
    requests: int  # simulated (equal to the wall-clock point's)
    wall_clock: float  # s, the wall-clock point
    cpu: float  # s, the simulation (best of the repeats)

    @property
    def ratio(self) -> float:
        return self.wall_clock / self.cpu if self.cpu > 0 else float("inf")


def speed(
    result: dict[str, Any], *, repeat: int = 3, warm: bool = False, http_latency: float = 0.0
) -> list[SpeedRow]:
    """One row per simulable point of a suite result (``data["result"]`` of the suite JSON)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    cfg = result["config"]
    rows = []
    for p in simulable_points(result, http_latency=http_latency):
        point = p.point
        best = float("inf")
        n = 0
        for _ in range(repeat):
            if not warm:
                reset_caches()
            began = time.process_time()
            res = simulate(
                p.sessions,
                p.contender,
                fleet=p.fleet,
                seed=0,
                drain_timeout=cfg["drain_timeout"],
                **p.options,
            )
            best = min(best, time.process_time() - began)
            n = len(res.records)
        rows.append(
            SpeedRow(
                point["contender"],
                point["workload"],
                point["mode"],
                point["qps"],
                n,
                point["summary"]["wall"],
                best,
            )
        )
    return rows


def format_speed(rows: Sequence[SpeedRow]) -> str:
    lines = [
        "| contender | workload | QPS | requests | wall-clock s | wall-clock req/s "
        "| virtual run CPU s | simulated req / CPU s | ratio |",
        "|" + " --- |" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r.contender} | {r.workload} | {'probe' if r.mode == 'probe' else f'{r.qps:g}'} "
            f"| {r.requests} | {r.wall_clock:.1f} | {r.requests / r.wall_clock:.1f} "
            f"| {r.cpu:.3f} | {r.requests / r.cpu:.0f} | {r.ratio:.0f}x |"
        )
    wall = sum(r.wall_clock for r in rows)
    cpu = sum(r.cpu for r in rows)
    if rows:
        worst = min(rows, key=lambda r: r.ratio)
        lines.append("")
        lines.append(
            f"total: {wall:.0f} s of wall-clock points against {cpu:.2f} CPU s: "
            f"{wall / cpu:.0f}x; lowest {worst.ratio:.0f}x ({worst.contender}, {worst.workload}, "
            f"{'probe' if worst.mode == 'probe' else f'{worst.qps:g} QPS'})"
        )
    return "\n".join(lines)
