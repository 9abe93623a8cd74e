"""Scheduler cost per request, and how profiles do on a shared-prefix workload.

``python -m bench.scheduler_cost`` writes bench/reports/scheduler_cost.md with:

1. Cost: ``schedule`` + ``on_routed`` for 8 and 16 pods and 1 KB / 4 KB prompts with the default
   profile (and every plugin alone), best of several timeit runs, in this process.
2. Quality: candidate profiles in the fleet simulation (``bench.fleetsim``: the real gateway and
   scheduler over ``sim.engine`` engines, virtual time) on a Zipf-popular shared-system-prompt
   workload at two load levels. It reports the engines' prefix-cache hit rate, time to first
   token, end-to-end latency and load balance. ``--quality-only`` reruns just this part.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import fleetsim
from bench.fleetsim import make_workload
from extproc.scheduling import DEFAULT_PROFILE, SchedulerProfile, SchedulingRequest, build_scheduler
from fleet.pods import Pod, PodMetrics
from fleet.profile import PluginSpec

REPORT = Path(__file__).parent / "reports" / "scheduler_cost.md"

# ------------------------------------------------------------------------------------- cost


def _pods(n: int) -> list[Pod]:
    rnd = random.Random(n)
    return [
        Pod(
            name=f"pod-{i}",
            address=f"10.0.0.{i}:8000",
            in_flight=rnd.randint(0, 20),
            metrics=PodMetrics(
                waiting=float(rnd.randint(0, 4)),
                running=float(rnd.randint(0, 30)),
                kv_cache_usage=rnd.random() * 0.8,
                ttft_seconds=0.1 + rnd.random(),
                tpot_seconds=0.02 + rnd.random() / 50,
                max_loras=4,
                running_loras=frozenset({"sql"}) if i % 2 else frozenset(),
                scraped_at=0.0,
                stale=False,
            ),
        )
        for i in range(n)
    ]


def _prompt(size: int, seed: int) -> str:
    rnd = random.Random(seed)
    words = ["the", "model", "route", "serves", "tokens", "cache", "prefix", "pod", "gateway"]
    out: list[str] = []
    total = 0
    while total < size:
        word = rnd.choice(words)
        out.append(word)
        total += len(word) + 1
    return " ".join(out)[:size]


def _runner(profile: SchedulerProfile | None, n_pods: int, prompt_bytes: int) -> Callable[[], None]:
    """One schedule + on_routed call on a warm scheduler, cycling over 64 prompts."""
    pods = _pods(n_pods)
    s = build_scheduler(profile, rng=random.Random(1))
    # a warm index: half the pods hold a shared system prompt
    system = _prompt(prompt_bytes // 2, 7)
    for i in range(0, n_pods, 2):
        warm = SchedulingRequest(request_id="w", model="m", prompt=system + _prompt(64, i))
        r = s.schedule(warm, pods)
        s.on_routed(warm, r)
    reqs = [
        SchedulingRequest(
            request_id=str(i),
            model="m",
            prompt=(system + _prompt(prompt_bytes, i))[:prompt_bytes],
            headers={"x-session-id": f"s{i % 50}"},
        )
        for i in range(64)
    ]
    it = iter(range(10**12))

    def one() -> None:
        r = reqs[next(it) & 63]
        res = s.schedule(r, pods)
        s.on_routed(r, res)

    return one


SHAPES = [(8, 1024), (8, 4096), (16, 1024), (16, 4096)]


def cost_table(number: int, rounds: int) -> list[tuple[str, list[float]]]:
    """Microseconds per call: every (profile, shape) runs ``number`` calls per round, rounds are
    interleaved (noise on a shared machine hits all cases alike), best round wins. CPU time."""
    profiles: list[tuple[str, SchedulerProfile | None]] = [("default profile", None)]
    for spec in [*DEFAULT_PROFILE.filters, *DEFAULT_PROFILE.scorers]:
        kind = "filters" if spec in DEFAULT_PROFILE.filters else "scorers"
        profiles.append((f"{spec.name} alone", SchedulerProfile(**{kind: [spec]})))
    for name in ("least-latency", "session-affinity", "random"):
        profiles.append((f"{name} alone", SchedulerProfile(scorers=[PluginSpec(name=name)])))
    profiles.append(("no plugins (framework only)", SchedulerProfile()))
    runners = [[_runner(p, n, b) for n, b in SHAPES] for _, p in profiles]
    best = [[float("inf")] * len(SHAPES) for _ in profiles]
    for _ in range(rounds):
        for i, row in enumerate(runners):
            for j, fn in enumerate(row):
                t = timeit.timeit(fn, number=number, timer=time.process_time)
                best[i][j] = min(best[i][j], t / number * 1e6)
    return [(name, best[i]) for i, (name, _) in enumerate(profiles)]


# ---------------------------------------------------------------------------------- quality


@dataclass(frozen=True)
class Load:
    """One load level of the quality comparison: a ``bench.fleetsim`` workload spec."""

    title: str
    workload: str


LOADS = [
    Load(
        "moderate: 75% of no-cache prefill capacity",
        "zipf_prefix:qps=40,groups=64,zipf=1.1,system_tokens=2000,question_tokens=100",
    ),
    Load(
        "heavy: 100% of no-cache prefill capacity",
        "zipf_prefix:qps=55,groups=64,zipf=1.1,system_tokens=2000,question_tokens=100",
    ),
]
WARM_UP = 10.0  # virtual s before requests count


def simulate(
    profile: SchedulerProfile | None, workload: str, seed: int, seconds: float
) -> dict[str, float]:
    """One profile on one workload in the fleet simulation (``bench.fleetsim``): the real gateway
    and scheduler over 8 ``sim.engine`` engines with the suite's flags, in virtual time."""
    sessions = make_workload(workload, seed=seed, duration=seconds)
    res = fleetsim.simulate(sessions, "ours-default", seed=seed, default_profile=profile)
    ok = [r for r in res.records if r.ok and r.sent >= WARM_UP]
    if not ok:
        raise SystemExit(f"the simulation finished no request after {WARM_UP:g} s; raise --seconds")
    ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
    e2es = sorted(r.e2e for r in ok if r.e2e is not None)
    by_t: dict[float, list[int]] = {}
    for sample in res.load:
        if sample.t >= WARM_UP:
            by_t.setdefault(sample.t, []).append(sample.in_flight)
    imbalance = sorted(max(v) / (sum(v) / len(v)) for v in by_t.values() if sum(v))
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "e2e_p50": e2es[len(e2es) // 2],
        "e2e_p99": e2es[int(len(e2es) * 0.99)],
        "requests": len(ok),
        "errors": sum(1 for r in res.records if not r.ok),
        "hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "ttft_p50": ttfts[len(ttfts) // 2],
        "ttft_p99": ttfts[int(len(ttfts) * 0.99)],
        "ttft_mean": statistics.fmean(ttfts),
        "imbalance_mean": statistics.fmean(imbalance) if imbalance else 1.0,
        "imbalance_p99": imbalance[int(len(imbalance) * 0.99)] if imbalance else 1.0,
    }


def _profile(prefix: float, least: float, kv: float) -> SchedulerProfile:
    scorers = []
    if prefix:
        scorers.append(PluginSpec(name="prefix-cache", weight=prefix))
    if least:
        scorers.append(PluginSpec(name="least-request", weight=least))
    if kv:
        scorers.append(PluginSpec(name="kv-cache", weight=kv))
    return SchedulerProfile(filters=DEFAULT_PROFILE.filters, scorers=scorers)


CANDIDATES: list[tuple[str, SchedulerProfile]] = [
    (
        "random",
        SchedulerProfile(filters=DEFAULT_PROFILE.filters, scorers=[PluginSpec(name="random")]),
    ),
    ("least-request only", _profile(0, 1, 0)),
    ("prefix-cache only (+ least-request 0.01 tie-break)", _profile(1, 0.01, 0)),
    ("prefix 1, least-request 3, kv 1", _profile(1, 3, 1)),
    ("prefix 2, least-request 3, kv 1 (default)", _profile(2, 3, 1)),
    ("prefix 3, least-request 2, kv 1", _profile(3, 2, 1)),
    ("prefix 5, least-request 1, kv 1", _profile(5, 1, 1)),
]


def quality(load: Load, seconds: float, seeds: int) -> list[tuple[str, dict[str, float]]]:
    out = []
    for name, profile in CANDIDATES:
        runs = [simulate(profile, load.workload, seed, seconds) for seed in range(seeds)]
        avg = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        out.append((name, avg))
        print(
            f"{name:52s} hit {avg['hit_rate'] * 100:5.1f}%  "
            f"TTFT p50 {avg['ttft_p50'] * 1000:6.0f} ms p99 {avg['ttft_p99'] * 1000:6.0f} ms  "
            f"busiest/mean {avg['imbalance_mean']:.2f} (p99 {avg['imbalance_p99']:.2f})  "
            f"e2e p50 {avg['e2e_p50']:.2f} s p99 {avg['e2e_p99']:.2f} s"
        )
    return out


# ----------------------------------------------------------------------------------- report


def _quality_table(load: Load, q: list[tuple[str, dict[str, float]]]) -> list[str]:
    return [
        f"### {load.title}",
        "",
        f"Workload `{load.workload}`.",
        "",
        "| profile | prefix-cache hit rate | TTFT p50 / p99 | end-to-end p50 / p99 | "
        "busiest/mean in-flight (mean, p99) | errors |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {m['hit_rate'] * 100:.1f}% | "
            f"{m['ttft_p50'] * 1000:.0f} / {m['ttft_p99'] * 1000:.0f} ms | "
            f"{m['e2e_p50']:.2f} / {m['e2e_p99']:.2f} s | "
            f"{m['imbalance_mean']:.2f}, {m['imbalance_p99']:.2f} | {m['errors']:g} |"
            for name, m in q
        ),
        "",
    ]


QUALITY_HEADING = "## Profiles on a shared-prefix workload (fleet simulation)"


def _cost_lines(args: argparse.Namespace) -> list[str]:
    load = os.getloadavg()[0]
    calib = (
        min(
            timeit.repeat(
                lambda: [i for i in range(1000)], number=2000, repeat=7, timer=time.process_time
            )
        )
        / 2000
        * 1e6
    )
    rows = cost_table(args.number, args.rounds)
    print(f"calibration: a 1000-item list comprehension takes {calib:.1f} us here")
    for name, vals in rows:
        print(f"{name:32s} " + "  ".join(f"{v:6.1f} us" for v in vals))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return [
        "# Scheduler cost and default-profile quality",
        "",
        f"Generated by `python -m bench.scheduler_cost` on {when}: {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, load average {load:.2f} at the start (shared machine).",
        "",
        "## Cost per request (schedule + on_routed)",
        "",
        "Best of 30 interleaved rounds, CPU time; pods carry fresh metrics, half of them hold a",
        "shared system prompt in the prefix index, prompts are half shared prefix, half unique.",
        "",
        "| profile | 8 pods, 1 KB | 8 pods, 4 KB | 16 pods, 1 KB | 16 pods, 4 KB |",
        "|---|---|---|---|---|",
        *(f"| {name} | " + " | ".join(f"{v:.1f} us" for v in vals) + " |" for name, vals in rows),
        "",
        f"Calibration: in the same run a 1000-item list comprehension took {calib:.1f} us (the",
        "machine is shared; times scale with it). Rows other than the default time one plugin",
        "alone (framework overhead included).",
        "",
        "At the gateway's 3,000 req/s target one core has ~330 us per request in total (parsing,",
        "gRPC, routing, scheduling); compare the default profile's row with that budget.",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--number", type=int, default=200, help="calls per case and round")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds (best counts)")
    ap.add_argument("--seconds", type=float, default=60.0, help="virtual seconds of arrivals")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--quality-only",
        action="store_true",
        help="rerun only the quality section; keep the report's cost section",
    )
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    if args.quality_only:
        text = REPORT.read_text()
        for heading in (QUALITY_HEADING, "## Profiles on a shared-prefix workload"):
            if heading in text:
                text = text[: text.index(heading)]
                break
        head = [*text.rstrip("\n").split("\n"), ""]
    else:
        head = _cost_lines(args)
    results = []
    for load in LOADS:
        print(load.title)
        results.append((load, quality(load, args.seconds, args.seeds)))
    if args.no_report:
        return
    lines = [
        *head,
        QUALITY_HEADING,
        "",
        "`bench.fleetsim` in virtual time: the real gateway, datastore and scheduler (each",
        "candidate as the gateway-wide default profile) over 8 `sim.engine` engines with the",
        "benchmark suite's flags (16k-token KV cache per pod, the default timing model), metrics",
        "scraped every 200 ms. 64 system prompts of 2000 tokens with Zipf(1.1) popularity, each",
        "request one of them plus a unique 100-token question and 64 output tokens: the prompts",
        "(128k tokens) do not fit the fleet's caches (8 x 16k), so where a request goes decides",
        f"its prefill. Poisson arrivals for {args.seconds:g} virtual s at two load levels (a",
        "request that misses costs ~0.15 s of prefill: 8 pods serve ~55 missing requests/s).",
        "Without the policies' fair queue, a request that finds every pod saturated is answered",
        "503 by the gateway: the 'errors' column;",
        f"requests sent in the first {WARM_UP:g} s are not counted; mean of {args.seeds} seeds.",
        "'busiest/mean' is the busiest pod's in-flight count over the mean, sampled every 0.5 s.",
        "",
        *(line for load, q in results for line in _quality_table(load, q)),
        "See docs/scheduling.md for how the default weights follow from this table.",
    ]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
