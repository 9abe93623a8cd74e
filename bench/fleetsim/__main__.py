"""``python -m bench.fleetsim``: fleet simulation in virtual time.

python -m bench.fleetsim run --workload shared_prefix:qps=30,groups=16,system_tokens=4000
python -m bench.fleetsim run --trace trace.jsonl --contenders envoy-rr,ours-default --out DIR
python -m bench.fleetsim tune --workload shared_prefix:qps=30 --workload zipf_prefix:qps=20 \\
    --param prefix-cache.weight=1,2,3 --param least-request.weight=2,3,4
python -m bench.fleetsim calibrate bench/reports/fleetsim-calib.json
python -m bench.fleetsim speed
python -m bench.fleetsim speed bench/reports/fleetsim-calib.json --http-latency 0.006
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.fleetsim.core import FleetSpec, SimResult, simulate
from bench.fleetsim.trace import TraceError, TraceSession, load_jsonl, make_workload


def _fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="default", help="fleet flags of this suite (default)")
    p.add_argument("--replicas", type=int, help="pods (default: the suite's)")
    p.add_argument("--scrape-interval", type=float, default=0.2, help="virtual s (default 0.2)")
    p.add_argument(
        "--metrics-page",
        choices=["minimal", "full"],
        default="minimal",
        help="parse the series the parser reads (minimal) or the sim's whole page (full)",
    )
    p.add_argument(
        "--http-latency", type=float, default=0.0, help="s from send to engine (default 0)"
    )
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument("--duration", type=float, default=10.0, help="s of arrivals (default 10)")
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument(
        "--kv-events",
        action="store_true",
        help="the engines publish KV events and ours-* follow them (precise-prefix; default off)",
    )


def _fleet(ns: argparse.Namespace) -> FleetSpec:
    from bench.suite.config import SUITES

    suite = SUITES.get(ns.suite)
    if suite is None:
        raise ValueError(f"unknown suite {ns.suite!r} (known: {', '.join(SUITES)})")
    return FleetSpec(
        replicas=ns.replicas or suite.replicas,
        model=suite.model,
        adapters=suite.adapters,
        sim_args=tuple(suite.sim_args),
        scrape_interval=ns.scrape_interval,
        metrics_page=ns.metrics_page,
        http_latency=ns.http_latency,
        kv_events=ns.kv_events,
    )


def _workloads(ns: argparse.Namespace) -> list[tuple[str, list[TraceSession]]]:
    out: list[tuple[str, list[TraceSession]]] = []
    for spec in ns.workload or []:
        out.append((spec, make_workload(spec, seed=ns.seed, duration=ns.duration)))
    for path in ns.trace or []:
        out.append((str(path), load_jsonl(path)))
    if not out:
        raise ValueError("give at least one --workload NAME:key=value,... or --trace FILE.jsonl")
    return out


def _qps(ns: argparse.Namespace, label: str) -> float:
    """The offered QPS of a ``--workload`` spec (its ``qps=``, else the generators' default 10);
    NaN for a trace."""
    if label not in (ns.workload or []):
        return float("nan")
    for item in label.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key.strip() == "qps":
            return float(value)
    return 10.0


def _run(ns: argparse.Namespace) -> int:
    from bench.fleetsim.report import summary_table, write_outputs

    fleet = _fleet(ns)
    contenders = [c.strip() for c in ns.contenders.split(",") if c.strip()]
    results: list[SimResult] = []
    for label, sessions in _workloads(ns):
        for c in contenders:
            res = simulate(
                sessions,
                c,
                fleet=fleet,
                seed=ns.seed,
                drain_timeout=ns.drain_timeout,
                workload=label.partition(":")[0]
                if label in (ns.workload or [])
                else Path(label).stem,
                qps=_qps(ns, label),
            )
            results.append(res)
            print(
                f"{label} {c}: {len(res.records)} requests, {res.sim_seconds:.1f} virtual s in "
                f"{res.wall_seconds:.2f} wall s",
                file=sys.stderr,
            )
    print(summary_table(results, baseline=contenders[0]))
    if ns.out:
        for path in write_outputs(results, ns.out, ns.name):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _tune(ns: argparse.Namespace) -> int:
    from bench.fleetsim.tune import format_table, parse_param, tune

    params = [parse_param(p) for p in ns.param]
    seeds = [int(s) for s in ns.seeds.split(",")]
    base, settings = tune(
        _workloads(ns),
        params,
        fleet=_fleet(ns),
        seeds=seeds,
        metric=ns.metric,
        drain_timeout=ns.drain_timeout,
    )
    print(format_table(base, settings, ns.metric))
    best = settings[0]
    print(
        f"\nbest: {best.label()} - {ns.metric} x{best.ratio:.3f} of the base profile's"
        + (
            f", {(settings[1].ratio / best.ratio - 1) * 100:.1f}% ahead of the next "
            f"({settings[1].label()})"
            if len(settings) > 1
            else ""
        )
    )
    return 0


def _calibrate(ns: argparse.Namespace) -> int:
    from bench.fleetsim.calibrate import calibrate, format_calibration

    data = json.loads(Path(ns.suite_json).read_text())
    result = data.get("result", data)
    seeds = [int(x) for x in ns.seeds.split(",")]
    compared, seconds = calibrate(result, seeds=seeds, http_latency=ns.http_latency)
    print(format_calibration(compared))
    requests = sum(len(v.records) for c in compared for v in c.virtual)
    wall_requests = sum(p["summary"]["requests"] for p in result["points"])
    print(
        f"\nvirtual: {requests} requests in {seconds:.2f} wall s ({requests / seconds:.0f} req/s); "
        f"wall clock: {wall_requests} requests in {result['seconds']:.0f} s "
        f"({len(seeds)} virtual runs per wall-clock point) "
        f"({wall_requests / result['seconds']:.1f} req/s)"
    )
    return 0


def _speed(ns: argparse.Namespace) -> int:
    """Simulated requests per wall second, 8 pods, shared prefix at several QPS; or, given suite
    JSONs, each of their points against its wall-clock run."""
    if ns.suite_json:
        from bench.fleetsim.speed import format_speed, speed

        rows = []
        for path in ns.suite_json:
            data = json.loads(Path(path).read_text())
            rows += speed(
                data.get("result", data),
                repeat=ns.repeat,
                warm=ns.warm,
                http_latency=ns.http_latency,
            )
        print(format_speed(rows))
        return 0
    fleet = _fleet(ns)
    print(
        "| contender | QPS | requests | virtual s | wall s | CPU s | simulated req / wall s "
        "| simulated req / CPU s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for qps in (20.0, 30.0, 40.0):
        spec = f"shared_prefix:qps={qps:g},groups=16,system_tokens=4000,question_tokens=24"
        sessions = make_workload(spec, seed=ns.seed, duration=ns.duration)
        for c in ("envoy-rr", "ours-default"):
            began, cpu = time.perf_counter(), time.process_time()
            res = simulate(sessions, c, fleet=fleet, seed=ns.seed, drain_timeout=ns.drain_timeout)
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu
            n = len(res.records)
            print(
                f"| {c} | {qps:g} | {n} | {res.sim_seconds:.1f} | {wall:.2f} | {cpu:.2f} | "
                f"{n / wall:.0f} | {n / cpu:.0f} |"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    ap = argparse.ArgumentParser(prog="python -m bench.fleetsim", description=doc)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate workloads or traces through contenders")
    tune = sub.add_parser("tune", help="sweep the default profile's weights / arguments")
    for p in (run, tune):
        _fleet_args(p)
        p.add_argument("--workload", action="append", help="NAME:key=value,... (repeatable)")
        p.add_argument("--trace", action="append", type=Path, help="JSONL trace (repeatable)")
    run.add_argument("--contenders", default="envoy-rr,ours-default,ours-prefix")
    run.add_argument("--out", type=Path, help="write per-request JSONL, load CSV and plots here")
    run.add_argument("--name", default="fleetsim", help="file name prefix under --out")
    tune.add_argument("--param", action="append", required=True, help="plugin.field=v1,v2,...")
    tune.add_argument("--seeds", default="1", help="comma-separated scheduler seeds (default 1)")
    tune.add_argument("--metric", default="ttft_p90", help="summary field to minimise")
    cal = sub.add_parser("calibrate", help="replay a wall-clock suite JSON in virtual time")
    cal.add_argument("suite_json", type=Path)
    cal.add_argument("--seeds", default="0,1,2,3,4", help="scheduler seeds per point")
    cal.add_argument(
        "--http-latency", type=float, default=0.0, help="s from send to engine (default 0)"
    )
    speed = sub.add_parser("speed", help="simulated requests per wall second, 8 pods")
    _fleet_args(speed)
    speed.add_argument(
        "suite_json",
        nargs="*",
        type=Path,
        help="wall-clock suite results: time the simulation of each point against it",
    )
    speed.add_argument(
        "--repeat", type=int, default=3, help="runs per point, the fastest counts (default 3)"
    )
    speed.add_argument(
        "--warm",
        action="store_true",
        help="keep the process's token-id and block-hash caches between runs (default: cold)",
    )
    ns = ap.parse_args(argv)
    try:
        return {"run": _run, "tune": _tune, "calibrate": _calibrate, "speed": _speed}[ns.command](
            ns
        )
    except (TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
