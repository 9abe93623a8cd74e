"""Autoscaler benchmark on the local stack: the day trace of :mod:`bench.autoscaler_replay`
replayed through Envoy against ``matrixinfer demo`` (local cluster, operator with the autoscaler,
extproc, Envoy), whose pods are simulator processes that turn Ready ``--pod-start-delay`` after
they start.

**Time is compressed** by ``--compress`` (default 6): the 3,600 s day lasts 600 s of wall clock,
and every time of the autoscaler and the pods shrinks with it: the pod start-up (30 s -> 5 s),
the sync period (15 s -> 2.5 s), the stable and panic windows (60 s -> 10 s, 6 s -> 1 s) and the
policy's periods, stabilisation windows and panic hold (the API's defaults divided by the
factor). The arrival *rate* is the trace's (up to 20 req/s) and each request's length is the
trace's (2-6 s of decode at 10 tokens/s: the simulator steps every 100 ms), so the fleet's
concurrency and size are the replay's; a request lasts longer relative to the compressed phases.

Contenders (one run of the local stack each, ``--contender``):

- ``static``: a Model with ``minReplicas`` = the replay's static fleet (peak concurrency / 6 per
  pod) and no autoscaling policy;
- ``panic``: minReplicas 1, maxReplicas the static fleet's size (``--max-replicas``: the
  capacity plan for the peak bounds the autoscaler), the API's default behaviour and panic
  policy (time-compressed) on the gateway's in-flight (``--target`` per pod: headroom for the
  trace's largest step, 8 -> 20 req/s, while pods start) and waiting (2 per pod) sums;
- ``no-panic``: the same without the panic policy;
- ``cold``: at the issue's real times (no compression: 30 s start-up, 15 s sync), a Model at zero
  gets one request: the seconds from sending it to its first token.

Each simulated pod serves 8 sequences at once (``--max-num-seqs=8``); a request it cannot take
waits in its engine queue. SLO: TTFT <= ``--slo`` (1 s). Pod-seconds come from the local
kubelet's lines (``pod X: started`` .. ``pod X: deleted``), clipped to the trace's window, and are
reported in seconds of the day (wall x compress). Each run adds its result to
``bench/reports/autoscaler_local.json``; ``--report`` writes ``autoscaler_local.md`` and the plot
from it (keeping the hand-written ``## Findings``).

    .venv/bin/python -m bench.autoscaler_local --contender static|panic|no-panic|cold [--seed 1]
        [--compress 6] [--pod-start-delay 30s] [--target 2.6]
    .venv/bin/python -m bench.autoscaler_local --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.autoscaler_replay import (
    HEADER,
    PHASES,
    Request,
    Result,
    arrivals,
    day_rate,
    misses_by_phase,
    pct,
    plot_day,
    within,
)
from bench.loadgen import Conversation, run, run_open_loop
from controllers.autoscaling.planner import (
    DEFAULT_DOWN,
    DEFAULT_INTERVAL,
    DEFAULT_PANIC_WINDOW,
    DEFAULT_STABLE_WINDOW,
    DEFAULT_UP,
    PanicRule,
)
from fleet.service import format_duration
from matrixinfer.testing.demo import DemoProcess

DAY = 3600.0
REPORTS = Path(__file__).resolve().parent / "reports"
MODEL = "day-model"
TARGET = f"{MODEL}-sim"  # the backend's ModelInfer
STEP = 0.1  # the simulator's step (s): 10 tokens/s per stream
SLOTS = 8  # sequences a simulated pod runs at once
FAILED = 100.0  # the TTFT a request that got no token counts with (beyond any SLO)
START_RE = re.compile(r"pod (\S+): started ")
READY_RE = re.compile(r"pod \S+: ready \(([0-9.]+)s\)")
STOP_RE = re.compile(r"pod (\S+): (?:deleted, process stopped|process exited)")
CONTENDERS = ("static", "panic", "no-panic", "cold")
# an optional contender: panic mode with a shorter scale-down stabilisation (--down-window),
# the replay's tuned policy
TUNED = "tuned"


def trace(seed: int, compress: float) -> list[Request]:
    """The replay's day trace with its time compressed: arrivals at the day's rate over
    ``3600 / compress`` seconds (request lengths unchanged)."""
    if compress <= 0:
        raise ValueError(f"compress must be > 0, not {compress}")
    return arrivals(lambda t: day_rate(t * compress), DAY / compress, seed)


def static_size(slots: int = SLOTS) -> int:
    """The replay's static fleet: the peak's concurrency (20 req/s x 4 s) at 3/4 of each pod's
    slots."""
    peak = max(day_rate(t) for t in range(int(DAY)))
    return math.ceil(peak * 4.0 / (0.75 * slots))


def max_tokens(decode: float, step: float = STEP) -> int:
    """The answer length that decodes for ``decode`` seconds at one token per ``step``."""
    return max(1, round(decode / step))


@dataclass(frozen=True, slots=True)
class PodEvent:
    t: float  # seconds (any clock; the same as the window's)
    pod: str
    start: bool  # True: started; False: stopped


def pod_events(lines: Iterable[tuple[float, str]]) -> list[PodEvent]:
    """The local kubelet's pod starts and stops among timestamped output lines."""
    out: list[PodEvent] = []
    for t, line in lines:
        if m := START_RE.search(line):
            out.append(PodEvent(t, m.group(1), True))
        elif m := STOP_RE.search(line):
            out.append(PodEvent(t, m.group(1), False))
    return out


def pod_intervals(
    events: Iterable[PodEvent], begin: float, end: float
) -> list[tuple[str, float, float]]:
    """Each pod's running intervals clipped to [begin, end]: a pod started before the window
    counts from ``begin``, one still running at its end until ``end``; a second start of a
    running pod and a stop of a pod never seen starting are ignored."""
    if end < begin:
        raise ValueError(f"window ends ({end}) before it begins ({begin})")
    running: dict[str, float] = {}
    out: list[tuple[str, float, float]] = []
    for e in sorted(events, key=lambda e: e.t):
        if e.start:
            running.setdefault(e.pod, e.t)
        elif e.pod in running:
            out.append((e.pod, running.pop(e.pod), e.t))
    out += [(pod, since, math.inf) for pod, since in running.items()]
    clipped = [(p, max(a, begin), min(b, end)) for p, a, b in out]
    return [(p, a, b) for p, a, b in clipped if b > a]


def pod_seconds(events: Iterable[PodEvent], begin: float, end: float) -> float:
    """Seconds of running pods within [begin, end] (:func:`pod_intervals`)."""
    return sum(b - a for _, a, b in pod_intervals(events, begin, end))


def alive(events: Iterable[PodEvent], begin: float, end: float, step: float) -> list[int]:
    """Pods running at ``begin``, ``begin + step``, ... before ``end``."""
    spans = pod_intervals(events, begin, end)
    n = math.ceil((end - begin) / step)
    return [sum(1 for _, a, b in spans if a <= begin + i * step < b) for i in range(n)]


# ---- the Model each contender runs ---------------------------------------------------------


def _d(seconds: float) -> str:
    """A duration in the CRD style, to the millisecond."""
    return format_duration(round(seconds, 3))


def scaled_policy(
    compress: float, target: float, panic: bool, down_window: float | None = None
) -> dict[str, Any]:
    """The API's default behaviour (and default panic policy when ``panic``), every duration
    divided by ``compress``, on the gateway's in-flight (``target`` per pod) and waiting sums;
    ``down_window``: the scale-down stabilisation window instead of the API's 300 s."""
    down = DEFAULT_DOWN.stabilization if down_window is None else down_window
    up: dict[str, Any] = {
        "stablePolicy": {
            "instances": DEFAULT_UP.instances,
            "percent": DEFAULT_UP.percent,
            "period": _d(DEFAULT_UP.period / compress),
            "selectPolicy": DEFAULT_UP.select,
        }
    }
    if panic:
        p = PanicRule()
        up["panicPolicy"] = {
            "percent": p.percent,
            "period": _d(p.period / compress),
            "panicThresholdPercent": p.threshold_percent,
            "panicModeHold": _d(p.hold / compress),
        }
    return {
        "metrics": [
            {"name": "gateway_in_flight_requests", "targetValue": target},
            {"name": "gateway_queue_length", "targetValue": 2},
        ],
        "behavior": {
            "scaleUp": up,
            "scaleDown": {
                "percent": DEFAULT_DOWN.percent,
                "period": _d(DEFAULT_DOWN.period / compress),
                "stabilizationWindow": _d(down / compress),
            },
        },
    }


def model_doc(
    min_replicas: int, max_replicas: int | None, policy: dict[str, Any] | None
) -> dict[str, Any]:
    """A Model with one simulator backend (8 sequences at once, a step of STEP seconds)."""
    backend: dict[str, Any] = {
        "name": "sim",
        "type": "vLLM",
        "modelURI": "hf://matrixinfer/demo-model",
        "args": [f"--max-num-seqs={SLOTS}", f"--step-base={_d(STEP)}"],
        "minReplicas": min_replicas,
    }
    if max_replicas is not None:
        backend["maxReplicas"] = max_replicas
    spec: dict[str, Any] = {"backends": [backend]}
    if policy is not None:
        spec["autoscalingPolicy"] = {"spec": policy}
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": MODEL, "namespace": "default"},
        "spec": spec,
    }


# ---- one run of the local stack ------------------------------------------------------------


class Demo(DemoProcess):
    """``matrixinfer demo --requests 0`` on a directory holding one Model."""

    def __init__(self, run_dir: Path, doc: dict[str, Any], *flags: str) -> None:
        config = run_dir / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        super().__init__(
            run_dir / "run", config, "--time-scale", "1", "--ready-timeout", "600s", *flags,
            state=run_dir / "state.json", up_within=900, grace=90,
        )  # fmt: skip

    def replicas(self) -> int:
        path = f"/apis/workload.matrixinfer.ai/v1alpha1/namespaces/default/modelinfers/{TARGET}"
        return int(self.api(path)["spec"]["replicas"])

    def scale_events(self) -> dict[str, int]:
        """The autoscaler's Events on the ModelInfer by reason."""
        out: dict[str, int] = {}
        items: list[dict[str, Any]] = []
        for attempt in range(5):  # the local API server answers slowly on a loaded machine
            try:
                items = self.api("/api/v1/namespaces/default/events", timeout=60.0)["items"]
                break
            except OSError:
                if attempt == 4:
                    return {"unread (API server timed out)": 0}
                time.sleep(5.0)
        for e in items:
            obj = e.get("involvedObject") or {}
            mine = obj.get("kind") == "ModelInfer" and obj.get("name") == TARGET
            if mine and "replicas" in str(e.get("message")):
                reason = str(e.get("reason"))
                out[reason] = out.get(reason, 0) + int(e.get("count") or 1)
        return out


def _flags(args: argparse.Namespace, compress: float, host: str) -> list[str]:
    return [
        "--first-host", host,
        "--pod-start-delay", _d(args.pod_start_delay / compress),
        "--autoscale-interval", _d(DEFAULT_INTERVAL / compress),
        "--autoscale-stable-window", _d(DEFAULT_STABLE_WINDOW / compress),
        "--autoscale-panic-window", _d(DEFAULT_PANIC_WINDOW / compress),
    ]  # fmt: skip


def _conversations(reqs: list[Request]) -> list[Conversation]:
    return [
        Conversation(r.arrival, MODEL, (), ("Tell me about the day.",), max_tokens(r.decode))
        for r in reqs
    ]


def run_day(args: argparse.Namespace, key: str) -> dict[str, Any]:
    """One contender over the compressed day; the JSON-able result."""
    compress = args.compress
    n = static_size()
    if key == "static":
        doc, name = model_doc(n, None, None), f"static fleet sized for the peak ({n} pods)"
    else:
        panic = key != "no-panic"
        window = args.down_window if key == TUNED else None
        policy = scaled_policy(compress, args.target, panic, window)
        doc = model_doc(1, args.max_replicas, policy)
        mode = "panic mode" if panic else "no panic mode"
        name = (
            f"autoscaler, API defaults, {mode} (in-flight target {args.target:g},"
            f" max {args.max_replicas})"
        )
        if key == TUNED:
            name = (
                f"autoscaler, panic mode, scale-down window {args.down_window:g} s"
                f" (in-flight target {args.target:g})"
            )
    reqs = trace(args.seed, compress)
    run_dir = args.run_dir / key
    demo = Demo(run_dir, doc, *_flags(args, compress, args.first_host))
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            try:
                samples.append((time.monotonic(), demo.replicas()))
            except OSError:
                continue

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        load_before = os.getloadavg()
        sampler.start()
        begin = time.monotonic()
        result = run(
            run_open_loop(
                demo.url,
                _conversations(reqs),
                duration=DAY / compress,
                drain_timeout=90.0,
                request_timeout=60.0,
            )
        )
        end = begin + DAY / compress
        load_after = os.getloadavg()
        events = demo.scale_events()
    finally:
        done.set()
        demo.stop()
    pods = pod_events(demo.timed_lines)
    records = sorted(result.records, key=lambda r: r.scheduled)
    return {
        "name": name,
        "seed": args.seed,
        "compress": compress,
        "pod_start_delay": args.pod_start_delay,
        "requests": [  # (arrival in day seconds, TTFT or None, error), to the millisecond
            [
                round(r.scheduled * compress, 3),
                round(r.ttft, 3) if r.ok and r.ttft is not None else None,
                r.error[:80],
            ]
            for r in records
        ],
        "pod_seconds": pod_seconds(pods, begin, end) * compress,
        "alive": alive(pods, begin, end, 1.0),
        "replicas": [
            [round((t - begin) * compress, 1), n] for t, n in samples if begin <= t <= end
        ],
        "scale_events": events,
        # seconds from each pod's start to Ready (the kubelet's lines; start-up delay + load)
        "ready_s": [
            float(m.group(1)) for _, line in demo.timed_lines if (m := READY_RE.search(line))
        ],
        "max_send_lag": result.max_send_lag,
        "load": [load_before, load_after],
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_cold(args: argparse.Namespace) -> dict[str, Any]:
    """A Model at zero, real times (no compression): one request, seconds to its first token."""
    policy = scaled_policy(1.0, args.target, True)
    demo = Demo(args.run_dir / "cold", model_doc(0, 4, policy), *_flags(args, 1.0, args.first_host))
    try:
        time.sleep(2.0)  # the demo is up with the Model at zero
        at_zero = demo.replicas() == 0
        result = run(
            run_open_loop(
                demo.url,
                _conversations([Request(0.0, 1.0)]),
                duration=1.0,
                drain_timeout=180.0,
                request_timeout=170.0,
            )
        )
    finally:
        demo.stop()
    r = result.records[0]
    return {
        "name": "cold start",
        "pod_start_delay": args.pod_start_delay,
        "interval": DEFAULT_INTERVAL,
        "at_zero": at_zero,
        "ttft": r.ttft if r.ok else None,
        "error": r.error,
        "load": list(os.getloadavg()),
    }


# ---- the report ----------------------------------------------------------------------------


def as_result(data: dict[str, Any]) -> Result:
    """A contender's stored run as the replay's :class:`Result` (times in seconds of the day;
    a request without a token counts with TTFT ``FAILED``)."""
    points = [(a, FAILED if t is None else t) for a, t, _ in data["requests"]]
    alive_n = data["alive"]
    step = data["compress"]  # one sample per wall second
    timeline = [(i * step, n, day_rate(i * step)) for i, n in enumerate(alive_n)]
    events = sum(data["scale_events"].values())
    return Result(
        data["name"],
        [t for _, t in points],
        data["pod_seconds"],
        events,
        max(alive_n, default=0),
        timeline,
        points,
    )


def write_report(results_path: Path, out: Path, slo: float) -> str:
    runs = json.loads(results_path.read_text())
    missing = [k for k in CONTENDERS if k not in runs]
    if missing:
        raise SystemExit(f"{results_path}: no run of {', '.join(missing)} yet")
    day_keys = [*CONTENDERS[:3], *([TUNED] if TUNED in runs else [])]
    results = [as_result(runs[k]) for k in day_keys]
    base = results[0].pod_seconds
    rows, phase_rows = [], []
    for k, r in zip(day_keys, results, strict=True):
        failed = sum(1 for _, t, _ in runs[k]["requests"] if t is None)
        rows.append(
            f"| {r.name} | {len(r.ttfts)} | {failed} | {pct(r.ttfts, 0.5):.2f} |"
            f" {pct(r.ttfts, 0.9):.2f} | {pct(r.ttfts, 0.99):.2f} | {100 * within(r, slo):.1f} % |"
            f" {r.pod_seconds:,.0f} | {r.pod_seconds / base:.2f} | {r.scale_events} |"
            f" {r.max_replicas} |"
        )
        m = misses_by_phase(r, slo)
        phase_rows.append(
            f"| {r.name} | " + " | ".join(str(m[p]) for p, _ in PHASES) + f" | {sum(m.values())} |"
        )
    header = HEADER.replace("| requests |", "| requests | failed |").replace(
        "|---|---:|", "|---|---:|---:|", 1
    )
    phase_header = (
        "| contender | "
        + " | ".join(p for p, _ in PHASES)
        + " | total |\n|---|"
        + "---:|" * (len(PHASES) + 1)
    )
    events = "\n".join(
        f"- {r.name}: "
        + (", ".join(f"{v} {k}" for k, v in sorted(runs[key]["scale_events"].items())) or "none")
        + f"; desired replicas at most {max((n for _, n in runs[key]['replicas']), default=0)}"
        for key, r in zip(day_keys, results, strict=True)
    )
    loads = "; ".join(
        f"{key} {runs[key]['load'][0][0]:.1f} -> {runs[key]['load'][1][0]:.1f}" for key in day_keys
    )
    starts = "; ".join(
        f"{key} p50 {pct(runs[key]['ready_s'], 0.5):.1f} s, max {max(runs[key]['ready_s']):.1f} s"
        f" ({len(runs[key]['ready_s'])} pods)"
        for key in day_keys
        if runs[key].get("ready_s")
    )
    lags = ", ".join(f"{key} {runs[key]['max_send_lag']:.2f} s" for key in day_keys)
    out.mkdir(parents=True, exist_ok=True)
    plot_day(results, slo, out / "autoscaler_local.png")
    first = runs["static"]
    cold = runs["cold"]
    cold_text = (
        f"**{cold['ttft']:.1f} s**" if cold["ttft"] is not None else f"failed ({cold['error']})"
    )
    path = out / "autoscaler_local.md"
    old = path.read_text() if path.exists() else ""
    findings = old[old.index("\n## Findings") :] if "\n## Findings" in old else ""
    c = first["compress"]
    text = f"""# Autoscaler on the local stack (simulator pods through Envoy)

    .venv/bin/python -m bench.autoscaler_local --contender static   # then panic, no-panic, cold
    .venv/bin/python -m bench.autoscaler_local --report

`matrixinfer demo` (local cluster, operator with the autoscaler, extproc without policies,
Envoy) serves a Model whose pods are simulator processes (8 sequences at once, 10 tokens/s per
stream); the load generator (`bench.loadgen`, streaming, open loop) replays the day trace of
`bench.autoscaler_replay` (seed {first["seed"]}; quiet 0.2 req/s, ramp to 8 req/s, spike at
20 req/s, decay, quiet; answers of 2-6 s) through Envoy. **Time is compressed {c:g}x**: the
3,600 s day runs in {DAY / c:g} s, pods turn Ready {first["pod_start_delay"] / c:g} s after they
start (30 s / {c:g}), the autoscaler syncs every {DEFAULT_INTERVAL / c:g} s, and its windows,
periods and panic hold are the API's defaults / {c:g}; the rates and the answers' lengths are
the trace's. Times below are in seconds of the day (wall x {c:g}) except TTFT, which is wall
clock. SLO: TTFT <= {slo:g} s; a request without a token (503, timeout) misses it and counts with
a TTFT of {FAILED:g} s in the percentiles. "max replicas" and the plot's replicas are the pods
running at once (started, not necessarily Ready yet).
Pod-seconds come from the local kubelet's pod start and stop lines within the trace's window.
The autoscalers start at 1 pod (minReplicas 1) and may use up to {_max(runs)} pods.

{header}
{chr(10).join(rows)}

Requests over the SLO by phase of the day:

{phase_header}
{chr(10).join(phase_rows)}

Scale events (the autoscaler's Events on the ModelInfer):

{events}

Cold start (no compression: pod start-up {cold["pod_start_delay"]:g} s, sync every
{cold["interval"]:g} s, Model at zero): one request's first token after {cold_text}.

Pods from start to Ready, as far as the kubelet's lines reported it (wall seconds, nominal
{first["pod_start_delay"] / c:g} s):
{starts or "-"}.

Load average (1 min) before -> after each run: {loads}. Worst send lag of the load generator
behind the trace: {lags}.

![demand, pods and p90 TTFT over the day](autoscaler_local.png)
{findings}"""
    path.write_text(text)
    return text


def _max(runs: dict[str, Any]) -> str:
    return str(runs["panic"].get("max_replicas", "?"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.autoscaler_local")
    ap.add_argument(
        "--contender", choices=(*CONTENDERS, TUNED), help="run one contender and store it"
    )
    ap.add_argument(
        "--down-window",
        type=float,
        default=120.0,
        help="the tuned contender's scale-down window, seconds before compression (default 120)",
    )
    ap.add_argument("--report", action="store_true", help="write the report from stored runs")
    ap.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    ap.add_argument(
        "--compress", type=float, default=6.0, help="day seconds per wall second (default 6)"
    )
    ap.add_argument(
        "--pod-start-delay",
        type=float,
        default=30.0,
        help="seconds a pod takes to turn Ready, before compression (default 30)",
    )
    ap.add_argument(
        "--target", type=float, default=2.6, help="in-flight requests per pod (default 2.6)"
    )
    ap.add_argument(
        "--max-replicas",
        type=int,
        default=static_size(),
        help="the autoscalers' maxReplicas (default: the static fleet's size, "
        f"{static_size()}: the capacity plan for the peak bounds the autoscaler)",
    )
    ap.add_argument("--slo", type=float, default=1.0, help="TTFT SLO in seconds (default 1)")
    ap.add_argument(
        "--first-host",
        default="127.77.0.10",
        help="first pod address of the local stack (default 127.77.0.10)",
    )
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=Path("/tmp/autoscaler_local"),
        help="logs of the local stack (default /tmp/autoscaler_local)",
    )
    ap.add_argument("--out", type=Path, default=REPORTS, help="report folder (bench/reports)")
    args = ap.parse_args(argv)
    results_path = args.out / "autoscaler_local.json"
    if args.contender is not None:
        data = run_cold(args) if args.contender == "cold" else run_day(args, args.contender)
        if args.contender != "cold":
            data["max_replicas"] = args.max_replicas
        runs = json.loads(results_path.read_text()) if results_path.exists() else {}
        runs[args.contender] = data
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(runs, separators=(",", ":")) + "\n")
        print(json.dumps({k: v for k, v in data.items() if k not in ("requests",)})[:3000])
    if args.report:
        print(write_report(results_path, args.out, args.slo))
    if args.contender is None and not args.report:
        ap.error("give --contender or --report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
