"""Autoscaler replay: the real planner driving a modelled fleet through a bursty, day-shaped trace.

This is **not** the local-stack benchmark of issue #18 (simulator pods started and stopped by the
local stack, requests through Envoy): the local stack cannot run ModelInfer pods yet. It replays
a seeded trace against :class:`controllers.autoscaling.planner.Planner` exactly as the operator
calls it (every ``--interval`` seconds, with the gateway's waiting and in-flight sums), over a
queueing model of the fleet:

- a replica serves ``--slots`` requests at once (continuous batching); it is ready
  ``--startup`` seconds after it is asked for; a removed replica takes no new request and is paid
  for until its last request ends;
- a request waits in the gateway's FIFO queue until a slot is free; TTFT = wait + prefill
  (``--prefill`` seconds x (1 + the replica's running share)); it then decodes for a uniformly
  drawn 2-6 s;
- trace (seeded Poisson arrivals): quiet 0.2 req/s, a ramp to 8 req/s, a spike at 20 req/s,
  a decay, quiet again.

Contenders: a static fleet sized for the peak (``--slots`` x 3/4 in flight per replica at the
peak); the autoscaler with the API's defaults plus the default panic policy, and without panic
mode, both on the in-flight target ``--target`` (default 2.6 of 8 slots: headroom for the
trace's largest step, see the report) and a ``--down-window`` scale-down stabilisation window
(default 120 s; the API's default is 300 s); the same autoscaler on the target the static
fleet is sized with (6 of 8), alone and with a scheduled minimum before the known spike
(``scheduledMinimums``). Misses are counted per phase of the trace; ``--seeds`` repeats the
autoscaler contenders over other traces. Cold start (minReplicas 0, idle, one request) is
reported separately.

The report is written whole except its ``## Findings`` section, which is kept (written by hand).

    .venv/bin/python -m bench.autoscaler_replay [--seed 1] [--seeds 1,2,3,4,5,6,7,8] [--startup 30]
        [--interval 15] [--target 2.6] [--down-window 120]
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controllers.autoscaling.planner import (
    DEFAULT_DOWN,
    Homogeneous,
    MetricGoal,
    PanicRule,
    Planner,
    ScheduledWindow,
    Settings,
)
from crds.cron import parse_cron

WAITING, IN_FLIGHT = "gateway_queue_length", "gateway_in_flight_requests"
REPORTS = Path(__file__).resolve().parent / "reports"
DAY_START = 1767225600.0  # the trace's second 0 is 2026-01-01T00:00:00Z (for scheduled minimums)
PHASES = (("quiet", 900), ("ramp", 1800), ("spike", 2100), ("decay", 2700), ("quiet again", 3600))
HEADER = (
    "| contender | requests | p50 TTFT s | p90 TTFT s | p99 TTFT s | within SLO | pod-seconds"
    " | vs static | scale events | max replicas |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def day_rate(t: float) -> float:
    """Requests per second at second t of the 3,600 s day."""
    if t < 900:
        return 0.2
    if t < 1800:
        return 0.2 + (8.0 - 0.2) * (t - 900) / 900
    if t < 2100:
        return 20.0
    if t < 2700:
        return 8.0 - (8.0 - 0.2) * (t - 2100) / 600
    return 0.2


@dataclass
class Request:
    arrival: float
    decode: float
    ttft: float | None = None


@dataclass
class Replica:
    ready_at: float
    running: int = 0
    removed: bool = False


@dataclass
class Result:
    name: str
    ttfts: list[float]
    pod_seconds: float
    scale_events: int
    max_replicas: int
    timeline: list[tuple[float, int, float]] = field(default_factory=list)  # (t, replicas, rate)
    ttft_points: list[tuple[float, float]] = field(default_factory=list)  # (arrival, ttft)


def phase_of(t: float) -> str:
    """The phase of the day trace second ``t`` falls in."""
    return next((name for name, end in PHASES if t < end), PHASES[-1][0])


def arrivals(rate: Callable[[float], float], duration: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out: list[Request] = []
    t, peak = 0.0, 25.0
    while True:  # thinning of a Poisson process at the peak rate
        t += rng.expovariate(peak)
        if t >= duration:
            return out
        if rng.random() < rate(t) / peak:
            out.append(Request(t, rng.uniform(2.0, 6.0)))


@dataclass(frozen=True)
class Fleet:
    interval: float  # autoscaler sync period
    startup: float  # seconds until a new replica is ready
    slots: int  # concurrent requests per replica
    prefill: float  # seconds to the first token at no load
    rate: Callable[[float], float]  # the trace's rate, for the plot


def simulate(
    name: str,
    requests: list[Request],
    duration: float,
    fleet: Fleet,
    *,
    planner: Planner | None,
    clock: list[float],
    start: int,
    stop_after_first: bool = False,
) -> Result:
    interval, startup, slots = fleet.interval, fleet.startup, fleet.slots
    prefill, rate = fleet.prefill, fleet.rate
    reqs = [Request(r.arrival, r.decode) for r in requests]
    replicas = [Replica(0.0) for _ in range(start)]
    queue: deque[Request] = deque()
    ends: list[tuple[float, int, int]] = []  # (end time, seq, replica index)
    seq = 0
    t, dt, i = 0.0, 0.05, 0
    next_sync = 0.0
    pod_seconds = 0.0
    events = 0
    max_n = start
    res = Result(name, [], 0.0, 0, start)
    while t < duration:
        while i < len(reqs) and reqs[i].arrival <= t:
            queue.append(reqs[i])
            i += 1
        while ends and ends[0][0] <= t:
            _, _, idx = heapq.heappop(ends)
            replicas[idx].running -= 1
        # dispatch: the ready replica with the fewest running requests
        while queue:
            ready = [
                (r.running, k)
                for k, r in enumerate(replicas)
                if not r.removed and r.ready_at <= t and r.running < slots
            ]
            if not ready:
                break
            _, k = min(ready)
            req = queue.popleft()
            rep = replicas[k]
            first_token = prefill * (1 + rep.running / slots)
            req.ttft = (t - req.arrival) + first_token
            rep.running += 1
            seq += 1
            heapq.heappush(ends, (t + first_token + req.decode, seq, k))
            res.ttfts.append(req.ttft)
            res.ttft_points.append((req.arrival, req.ttft))
            if stop_after_first:
                return res
        alive = [r for r in replicas if not r.removed or r.running > 0]
        pod_seconds += len(alive) * dt
        if planner is not None and t >= next_sync:
            next_sync += interval
            clock[0] = t
            current = sum(1 for r in replicas if not r.removed)
            in_flight = sum(r.running for r in replicas)
            d = planner.step(
                {WAITING: float(len(queue)), IN_FLIGHT: float(in_flight)}, {"m": current}
            )
            want = d.replicas["m"]
            if want > current:
                replicas += [Replica(t + startup) for _ in range(want - current)]
                events += 1
            elif want < current:
                live = sorted(
                    (k for k, r in enumerate(replicas) if not r.removed),
                    key=lambda k: (replicas[k].ready_at <= t, replicas[k].running),
                )
                for k in live[: current - want]:  # not-yet-ready first, then the least busy
                    replicas[k].removed = True
                events += 1
            max_n = max(max_n, want)
        if int(t / dt) % 200 == 0:
            res.timeline.append((t, sum(1 for r in replicas if not r.removed), rate(t)))
        t += dt
    res.pod_seconds = pod_seconds
    res.scale_events = events
    res.max_replicas = max_n
    res.ttfts += [duration - r.arrival for r in reqs[:i] if r.ttft is None]  # never served
    return res


@dataclass(frozen=True)
class Policy:
    """What an autoscaler contender runs: the in-flight target per replica, panic mode on or
    off, an optional scheduled minimum (cron in UTC, seconds, replicas) and scale-down
    stabilisation window."""

    name: str
    target: float
    panic: bool = True
    scheduled: tuple[str, float, int] | None = None
    down_window: float | None = None  # scale-down stabilisation; None: the API's 300 s


def autoscaler(policy: Policy, min_replicas: int, max_replicas: int) -> tuple[Planner, list[float]]:
    """A planner with the API's defaults (plus the default panic policy) on a settable clock;
    the wall clock (for scheduled minimums) is the trace's clock from ``DAY_START``."""
    clock = [0.0]
    windows: tuple[ScheduledWindow, ...] = ()
    if policy.scheduled is not None:
        cron, seconds, replicas = policy.scheduled
        windows = (ScheduledWindow(parse_cron(cron), seconds, replicas),)
    s = Settings(
        metrics=(MetricGoal(IN_FLIGHT, policy.target), MetricGoal(WAITING, 2.0)),
        panic=PanicRule() if policy.panic else None,
        scheduled=windows,
        down=DEFAULT_DOWN
        if policy.down_window is None
        else dataclasses.replace(DEFAULT_DOWN, stabilization=policy.down_window),
    )
    planner = Planner(
        s,
        Homogeneous("m", min_replicas, max_replicas),
        lambda: clock[0],
        lambda: DAY_START + clock[0],
    )
    return planner, clock


def policies(target: float, down_window: float, slots: int, static_n: int) -> list[Policy]:
    full = 0.75 * slots
    tuned = f"target {target:g}, scale-down window {down_window:g} s"
    return [
        Policy(f"autoscaler, panic mode ({tuned})", target, down_window=down_window),
        Policy(
            f"autoscaler, no panic mode ({tuned})", target, panic=False, down_window=down_window
        ),
        Policy(f"autoscaler, API defaults + panic mode (target {full:g})", full),
        Policy(
            f"autoscaler, target {full:g} + scheduled minimum {static_n - 2} (00:29, 6 min)",
            full,
            scheduled=("29 0 * * *", 360.0, static_n - 2),
        ),
    ]


def within(r: Result, slo: float) -> float:
    return sum(1 for x in r.ttfts if x <= slo) / len(r.ttfts)


def misses_by_phase(r: Result, slo: float) -> dict[str, int]:
    out = {name: 0 for name, _ in PHASES}
    for arrival, ttft in r.ttft_points:
        if ttft > slo:
            out[phase_of(arrival)] += 1
    out[phase_of(3599.0)] += len(r.ttfts) - len(r.ttft_points)  # never served
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.autoscaler_replay")
    ap.add_argument("--seed", type=int, default=1, help="trace seed of the main table (default 1)")
    ap.add_argument(
        "--seeds", default="1,2,3,4,5,6,7,8", help="trace seeds of the robustness table (1-8)"
    )
    ap.add_argument("--startup", type=float, default=30.0, help="seconds until a pod is ready")
    ap.add_argument("--interval", type=float, default=15.0, help="autoscaler sync period")
    ap.add_argument("--slots", type=int, default=8, help="concurrent requests per replica")
    ap.add_argument(
        "--target", type=float, default=2.6, help="in-flight requests per replica (default 2.6)"
    )
    ap.add_argument(
        "--down-window",
        type=float,
        default=120.0,
        help="scale-down stabilisation window of the tuned policy, seconds (default 120)",
    )
    ap.add_argument("--prefill", type=float, default=0.15, help="prefill seconds at no load")
    ap.add_argument("--slo", type=float, default=1.0, help="TTFT SLO in seconds")
    ap.add_argument("--out", type=Path, default=REPORTS)
    args = ap.parse_args(argv)
    duration = 3600.0
    peak = max(day_rate(t) for t in range(int(duration)))
    static_n = math.ceil(peak * 4.0 / (0.75 * args.slots))  # mean decode 4 s
    fleet = Fleet(args.interval, args.startup, args.slots, args.prefill, day_rate)
    static = "static fleet sized for the peak"
    pols = policies(args.target, args.down_window, args.slots, static_n)

    def contenders(seed: int) -> tuple[list[Request], list[Result]]:
        reqs = arrivals(day_rate, duration, seed)
        out = [simulate(static, reqs, duration, fleet, planner=None, clock=[0.0], start=static_n)]
        for pol in pols:
            p, clock = autoscaler(pol, 1, 4 * static_n)
            out.append(simulate(pol.name, reqs, duration, fleet, planner=p, clock=clock, start=1))
        return reqs, out

    reqs, results = contenders(args.seed)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    robustness = {seed: contenders(seed)[1] for seed in seeds}
    # cold start: minReplicas 0, ten idle minutes, one request
    p, clock = autoscaler(pols[0], 0, 4)
    one = [Request(600.0, 3.0)]
    cold = simulate(
        "cold", one, 1200.0, fleet, planner=p, clock=clock, start=1, stop_after_first=True
    )
    write_report(args, reqs, results, cold, static_n, robustness)
    return 0


def plot_day(results: list[Result], slo: float, path: Path) -> None:
    """Demand, replicas and p90 TTFT (per 30 s of arrivals) over the day, one line per
    contender; ``timeline`` and ``ttft_points`` in seconds of the day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    t0 = [t for t, _, _ in results[1].timeline]
    ax[0].plot(t0, [x for _, _, x in results[1].timeline], color="black")
    ax[0].set_ylabel("demand (req/s)")
    for r in results:
        ax[1].plot([t for t, _, _ in r.timeline], [n for _, n, _ in r.timeline], label=r.name)
        buckets: dict[int, list[float]] = {}
        for a, x in r.ttft_points:
            buckets.setdefault(int(a // 30), []).append(x)
        xs = sorted(buckets)
        ax[2].plot([30 * b for b in xs], [pct(buckets[b], 0.9) for b in xs], label=r.name)
    ax[1].set_ylabel("replicas")
    ax[1].legend(fontsize=7)
    ax[2].set_ylabel("p90 TTFT per 30 s (s)")
    ax[2].set_yscale("log")
    ax[2].axhline(slo, color="grey", linestyle="--", linewidth=0.8)
    ax[2].set_xlabel("seconds into the day")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    args: argparse.Namespace,
    reqs: list[Request],
    results: list[Result],
    cold: Result,
    static_n: int,
    robustness: dict[int, list[Result]],
) -> None:
    base = results[0].pod_seconds
    rows = []
    for r in results:
        share = within(r, args.slo)
        rows.append(
            f"| {r.name} | {len(r.ttfts)} | {pct(r.ttfts, 0.5):.2f} | {pct(r.ttfts, 0.9):.2f} |"
            f" {pct(r.ttfts, 0.99):.2f} | {100 * share:.1f} % | {r.pod_seconds:,.0f} |"
            f" {r.pod_seconds / base:.2f} | {r.scale_events} | {r.max_replicas} |"
        )
    phase_rows = []
    for r in results:
        m = misses_by_phase(r, args.slo)
        phase_rows.append(
            f"| {r.name} | "
            + " | ".join(str(m[name]) for name, _ in PHASES)
            + f" | {sum(m.values())} |"
        )
    phase_header = (
        "| contender | "
        + " | ".join(
            f"{name} ({start}-{end} s)"
            for (name, end), start in zip(PHASES, [0] + [e for _, e in PHASES[:-1]], strict=True)
        )
        + " | total |\n|---|"
        + "---:|" * (len(PHASES) + 1)
    )
    seed_header = (
        "| contender | "
        + " | ".join(f"seed {seed}" for seed in robustness)
        + " |\n|---|"
        + "---|" * len(robustness)
    )
    seed_rows = []
    for k, r in enumerate(results[1:], start=1):
        cells = []
        for seed_results in robustness.values():
            other = seed_results[k]
            ratio = other.pod_seconds / seed_results[0].pod_seconds
            cells.append(f"{100 * within(other, args.slo):.1f} % at {ratio:.2f}")
        seed_rows.append(f"| {r.name} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_day(results, args.slo, args.out / "autoscaler_replay.png")
    cold_ttft = cold.ttfts[0] if cold.ttfts else float("nan")
    path = args.out / "autoscaler_replay.md"
    old = path.read_text() if path.exists() else ""
    findings = old[old.index("\n## Findings") :] if "\n## Findings" in old else ""
    command = (
        f".venv/bin/python -m bench.autoscaler_replay --seed {args.seed} --seeds {args.seeds}"
        f" --startup {args.startup:g} --interval {args.interval:g} --target {args.target:g}"
        f" --down-window {args.down_window:g}"
    )
    text = f"""# Autoscaler replay (planner over a modelled fleet)

    {command}

One day of the trace is {len(reqs)} requests over 3,600 s: quiet 0.2 req/s, ramp to 8 req/s,
spike at 20 req/s for 300 s, decay, quiet. A replica serves {args.slots} requests at once and
is ready {args.startup:g} s after it is asked for; the autoscaler syncs every {args.interval:g} s
on the gateway's in-flight
(target per replica as named) and waiting (target 2) sums. SLO: TTFT <= {args.slo:g} s. The
static fleet has {static_n} replicas (peak concurrency / {0.75 * args.slots:g} per replica).

**What this is not**: the local-stack benchmark the issue asks for (simulator pods through
Envoy); the fleet here is a queueing model (see the module docstring). It measures the planner's
policy, not the platform's latency.

{HEADER}
{chr(10).join(rows)}

Requests over the SLO by phase of the trace (seed {args.seed}):

{phase_header}
{chr(10).join(phase_rows)}

Within the SLO and pod-seconds against the static fleet, other traces (seeds):

{seed_header}
{chr(10).join(seed_rows)}

Cold start (minReplicas 0, idle for 600 s, one request): first token after **{cold_ttft:.1f} s**
(waiting for the next sync, up to {args.interval:g} s, then the {args.startup:g} s start-up).

![demand, replicas and p90 TTFT over the day](autoscaler_replay.png)
{findings}"""
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
