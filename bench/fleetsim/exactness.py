"""Record every simulated request of a set of runs, and compare two such recordings field by field.

A change meant to make the fleet simulator faster without changing what it simulates is checked
by recording before and after it and comparing::

    git stash; python -m bench.fleetsim.exactness record before.pkl SUITE_JSON... \\
        --workload shared_prefix:qps=30,groups=16,system_tokens=4000,question_tokens=24 ...
    git stash pop; python -m bench.fleetsim.exactness record after.pkl (same arguments)
    python -m bench.fleetsim.exactness compare before.pkl after.pkl

``record`` simulates every point of the suite JSONs as ``calibrate`` rebuilds it (scheduler
seeds ``--seeds``, ``--http-latency``), and each ``--workload`` through every contender of the
CI gate (``--gate-seed``, ``--duration``, zero HTTP latency); it stores each run's records, load
samples, scrape count and end time. ``compare`` prints the first difference of each run that
differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.fleetsim.calibrate import simulable_points
from bench.fleetsim.core import SimResult, simulate
from bench.fleetsim.trace import make_workload

__all__ = ["compare", "record"]

GATE_CONTENDERS = ("envoy-rr", "ours-default", "ours-prefix", "ours-least-request")

Recording = dict[str, tuple[list[Any], list[Any], int, float]]


def _fields(r: SimResult) -> tuple[list[Any], list[Any], int, float]:
    records = [dataclasses.astuple(x) for x in r.records]
    return records, [dataclasses.astuple(x) for x in r.load], r.scrapes, r.sim_seconds


def record(
    suites: Sequence[Path],
    workloads: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1),
    http_latency: float = 0.006,
    gate_seed: int = 3,
    duration: float = 8.0,
) -> Recording:
    out: Recording = {}
    for path in suites:
        data = json.loads(path.read_text())
        result = data.get("result", data)
        cfg = result["config"]
        for p in simulable_points(result, http_latency=http_latency):
            for seed in seeds:
                run = simulate(
                    p.sessions,
                    p.contender,
                    fleet=p.fleet,
                    seed=seed,
                    drain_timeout=cfg["drain_timeout"],
                    **p.options,
                )
                out[f"{path.name} point {p.index} seed {seed}"] = _fields(run)
    for spec in workloads:
        sessions_ = make_workload(spec, seed=gate_seed, duration=duration)
        for name in GATE_CONTENDERS:
            run = simulate(sessions_, name, seed=gate_seed, workload=spec, qps=30.0)
            out[f"{spec} {name}"] = _fields(run)
    return out


def compare(a: Recording, b: Recording) -> list[str]:
    """One line per run that differs (or exists on one side only)."""
    problems = [f"{k}: only in one recording" for k in sorted(a.keys() ^ b.keys())]
    for key in a.keys() & b.keys():
        for part, x, y in zip(("records", "load", "scrapes", "end"), a[key], b[key], strict=True):
            if x == y:
                continue
            if isinstance(x, list) and isinstance(y, list):
                pairs = enumerate(zip(x, y, strict=False))
                i = next((i for i, (p, q) in pairs if p != q), min(len(x), len(y)))
                problems.append(f"{key}: {part} [{i}] {x[i : i + 1]} != {y[i : i + 1]}")
            else:
                problems.append(f"{key}: {part} {x!r} != {y!r}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleetsim.exactness", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="simulate and store every run's records")
    rec.add_argument("out", type=Path)
    rec.add_argument("suite_json", nargs="*", type=Path, help="wall-clock suite results")
    rec.add_argument("--workload", action="append", default=[], help="a gate workload spec")
    rec.add_argument("--seeds", default="0,1", help="scheduler seeds of suite points (default 0,1)")
    rec.add_argument("--http-latency", type=float, default=0.006, help="(default 0.006 s)")
    rec.add_argument("--gate-seed", type=int, default=3, help="workload seed (default 3)")
    rec.add_argument("--duration", type=float, default=8.0, help="workload s (default 8)")
    cmp = sub.add_parser("compare", help="compare two recordings field by field")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    ns = ap.parse_args(argv)
    if ns.cmd == "record":
        runs = record(
            ns.suite_json,
            ns.workload,
            seeds=[int(s) for s in ns.seeds.split(",")],
            http_latency=ns.http_latency,
            gate_seed=ns.gate_seed,
            duration=ns.duration,
        )
        ns.out.write_bytes(pickle.dumps(runs))
        print(f"{len(runs)} runs, {sum(len(r[0]) for r in runs.values())} records -> {ns.out}")
        return 0
    a, b = (pickle.loads(p.read_bytes()) for p in (ns.a, ns.b))
    problems = compare(a, b)
    for line in problems:
        print(line)
    n = sum(len(r[0]) for r in a.values())
    print(
        f"{len(a)} runs, {n} records: " + (f"{len(problems)} differ" if problems else "identical")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
