"""Prefill/decode serving against aggregated serving on the same pod count (``python -m bench.pd``).

Fleets of ``--pods`` simulators (``--time-scale``, default timing model) behind the same gateway
(Envoy + extproc, ``matrixinfer.stack.GatewayStack``), one after the other:

- **aggregated**: every pod prefills and decodes (a plain ModelServer);
- **1P:3D** and **2P:2D** (for 4 pods): prefill-role and decode-role simulators in one pdGroup,
  a ``matrixinfer-pd-proxy`` (connector ``nixl``) beside each decode simulator.

Each sees the same seeded open-loop workload: long prompts (``--long-tokens``, default 4000)
mixed with short chats (``--short-tokens``), ``--long-share`` of them long, Poisson at ``--qps``
for ``--seconds``, streamed (``bench.loadgen``). Reported per setup: TTFT p50/p90, inter-token
latency p50/p90, output tokens/s, errors; and the ratios to aggregated. Writes
``bench/reports/pd.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import LoadResult, Summary, percentile, run, run_open_loop, summarize
from bench.workloads import long_context
from matrixinfer.process import Child, free_port, http_ok, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from sim.fleet import Fleet

REPORT = Path(__file__).parent / "reports" / "pd.md"
MODEL = "bench-model"
SIM_ARGS = ("--log-level", "warning")
# A token gap this long spans a step carrying a long prompt's prefill chunk: a decode step with
# 256 sequences and a short prompt's prefill costs ~40 ms in the default timing model.
STALL_GAP = 0.05


def to_simulated(result: LoadResult, scale: float) -> LoadResult:
    """``result`` with its times divided by the engines' ``--time-scale`` (wall = simulated x
    scale): latencies in the simulated engines' seconds."""
    if scale == 1.0:
        return result
    for r in result.records:
        r.scheduled /= scale
        r.sent /= scale
        r.ttft = None if r.ttft is None else r.ttft / scale
        r.e2e = None if r.e2e is None else r.e2e / scale
        r.itl = [g / scale for g in r.itl]
    return replace(result, wall=result.wall / scale, max_send_lag=result.max_send_lag / scale)


def stall_share(result: LoadResult) -> float:
    """Share of the successful streams' token gaps longer than STALL_GAP (NaN for no gaps)."""
    gaps = [g for r in result.records if r.ok for g in r.itl]
    return sum(g > STALL_GAP for g in gaps) / len(gaps) if gaps else math.nan


@dataclass
class Setup:
    name: str
    prefill: int  # 0: aggregated
    decode: int
    prefill_load: str = "prefill-queue"  # the prefill profile's load scorer (PD setups)


# the default prefill profile (extproc.scheduling.pd.PREFILL_PROFILE) with another load scorer,
# for comparing them in one run (precise-prefix left out: it abstains without KV events)
PREFILL_SCHEDULER = (
    "\n  prefillScheduler:\n    filters: [{{name: ready}}, {{name: saturation, args:"
    " {{maxWaiting: 8, maxKvCacheUsage: 0.95}}}}, {{name: lora-capable}}]\n    scorers:"
    " [{{name: prefix-cache, weight: 3}}, {{name: {load}, weight: 2}}]"
)


@dataclass
class Pods:
    """What a setup started: things to stop, the ModelServer config, the addresses Envoy must
    know, and the metrics pages the TTFT breakdown reads."""

    stop: list[Any]
    config: str
    addresses: list[str]
    prefill_urls: list[str]  # engines that prefill: the prefill pods, or every aggregated pod
    decode_urls: list[str]  # PD decode engines (empty for aggregated)
    proxy_urls: list[str]


@dataclass
class Breakdown:
    """Where the successful requests' TTFT goes (means in seconds; NaN where not applicable).

    ``prefill_queue`` / ``prefill_ttft``: the prefilling engines' own queue time and TTFT
    (arrival at the engine to its first token: queue + prefill chunks); ``handoff``: the PD
    proxy's arrival-to-decode-start (prefill round trip); ``decode_ttft``: the decode engine's
    arrival-to-first-token (KV transfer, admission, first step). The client's TTFT minus these
    is the gateway, Envoy and relay hops."""

    ttft_long_p90: float
    ttft_short_p90: float
    ttft_long_mean: float
    prefill_queue: float
    prefill_ttft: float
    handoff: float
    decode_ttft: float


def _histogram_mean(urls: list[str], name: str) -> float:
    """sum / count of histogram ``name`` over the metrics pages at ``urls`` (NaN if none)."""
    total = count = 0.0
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for fam in text_string_to_metric_families(text):
            if fam.name != name:
                continue
            for sample in fam.samples:
                if sample.name == f"{name}_sum":
                    total += sample.value
                elif sample.name == f"{name}_count":
                    count += sample.value
    return total / count if count else math.nan


def breakdown(result: LoadResult, pods: Pods, long_tokens: int, scale: float = 1.0) -> Breakdown:
    """``result`` in simulated seconds; the engines report simulated seconds, the proxy wall."""
    ok = [r for r in result.records if r.ok and r.ttft is not None]
    long = [r.ttft for r in ok if r.tag == f"len{long_tokens}" and r.ttft is not None]
    short = [r.ttft for r in ok if r.tag != f"len{long_tokens}" and r.ttft is not None]
    return Breakdown(
        ttft_long_p90=percentile(long, 90),
        ttft_short_p90=percentile(short, 90),
        ttft_long_mean=sum(long) / len(long) if long else math.nan,
        prefill_queue=_histogram_mean(pods.prefill_urls, "vllm:request_queue_time_seconds"),
        prefill_ttft=_histogram_mean(pods.prefill_urls, "vllm:time_to_first_token_seconds"),
        handoff=_histogram_mean(pods.proxy_urls, "matrixinfer_pd_handoff_seconds") / scale,
        decode_ttft=_histogram_mean(pods.decode_urls, "vllm:time_to_first_token_seconds"),
    )


def _host(first: str, i: int) -> str:
    a, b = first.rsplit(".", 1)
    return f"{a}.{int(b) + i}"


def _health(url: str) -> Callable[[], bool]:
    return lambda: http_ok(url)


def start_pods(setup: Setup, first_host: str, logs: Path, time_scale: float = 1.0) -> Pods:
    """Start the setup's processes."""
    sim_args = [*SIM_ARGS, "--time-scale", f"{time_scale:g}"]
    stop: list[Any] = []
    eps: list[str] = []
    addresses: list[str] = []
    prefill_urls: list[str] = []
    decode_urls: list[str] = []
    proxy_urls: list[str] = []
    if setup.prefill == 0:
        fleet = Fleet(setup.decode, model=MODEL, port=free_port(first_host), first_host=first_host,
                      args=sim_args, log_dir=logs, name_prefix="agg").start()  # fmt: skip
        stop.append(fleet)
        for p in fleet.pods:
            eps.append(f"  - {{name: {p.name}, address: '{p.address}', labels: {{app: bench}}}}")
            addresses.append(p.address)
            prefill_urls.append(p.url)
        selector = "{matchLabels: {app: bench}}"
        extra = ""
    else:
        pre = Fleet(setup.prefill, model=MODEL, port=free_port(first_host), first_host=first_host,
                    args=[*sim_args, "--role", "prefill"], log_dir=logs,
                    name_prefix="pre").start()  # fmt: skip
        stop.append(pre)
        dhost = _host(first_host, setup.prefill)
        dec = Fleet(setup.decode, model=MODEL, port=free_port(dhost), first_host=dhost,
                    args=[*sim_args, "--role", "decode"], log_dir=logs,
                    name_prefix="dec").start()  # fmt: skip
        stop.append(dec)
        for p in pre.pods:
            eps.append(f"  - {{name: {p.name}, address: '{p.address}', "
                       "labels: {app: bench, role: prefill, group: g0}}")  # fmt: skip
            addresses.append(p.address)
            prefill_urls.append(p.url)
        for p in dec.pods:
            port = free_port(p.host)
            proxy = Child(
                f"pd-proxy-{p.name}",
                [sys.executable, "-m", "runtime.pd_proxy", "--engine", p.url, "--host", p.host,
                 "--port", str(port), "--connector", "nixl", "--pod-name", p.name,
                 "--log-level", "warning"],
                log_path=logs / f"proxy-{p.name}.log",
                ready=_health(f"http://{p.host}:{port}/health"),
            ).start()  # fmt: skip
            stop.append(proxy)
            eps.append(f"  - {{name: {p.name}, address: '{p.host}:{port}', "
                       "labels: {app: bench, role: decode, group: g0}}")  # fmt: skip
            addresses.append(f"{p.host}:{port}")
            decode_urls.append(p.url)
            proxy_urls.append(f"http://{p.host}:{port}")
        selector = (
            "\n    matchLabels: {app: bench}\n    pdGroup: {groupKey: group, prefillLabels: "
            "{role: prefill}, decodeLabels: {role: decode}}"
        )
        extra = "\n  kvConnector: {type: nixl}"
        if setup.prefill_load != "prefill-queue":
            extra += PREFILL_SCHEDULER.format(load=setup.prefill_load)
    config = (
        f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: bench}}
spec:
  inferenceEngine: vLLM
  workloadSelector: {selector}
  workloadPort: {{port: 8000}}{extra}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: bench}}
spec:
  modelName: {MODEL}
  rules: [{{targets: [{{modelServerName: bench}}]}}]
---
apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: Endpoints
metadata: {{name: bench}}
spec:
  endpoints:
"""
        + "\n".join(eps)
        + "\n"
    )
    return Pods(stop, config, addresses, prefill_urls, decode_urls, proxy_urls)


def measure(setup: Setup, ns: argparse.Namespace, work: Path) -> tuple[Summary, float, Breakdown]:
    """The setup's load summary, its share of stalled token gaps (stall_share) and where its
    TTFT goes."""
    slug = setup.name.replace(":", "").replace(" ", "-")
    logs = work / slug
    logs.mkdir(parents=True, exist_ok=True)
    scale = ns.time_scale
    pods = start_pods(setup, ns.first_host, logs, scale)
    stop, config, addresses = pods.stop, pods.config, pods.addresses
    try:
        cfg = logs / "config"
        cfg.mkdir()
        (cfg / "bench.yaml").write_text(config)
        stack = GatewayStack(cfg, logs / "run", StackOptions(
            scrape_interval=0.1, config_poll=0.2, envoy_concurrency=1,
            message_timeout_ms=10_000, extproc_log_level="warning",
        )).start()  # fmt: skip
        stop.append(stack)
        fake: Any = SimpleNamespace(pods=[SimpleNamespace(address=a) for a in addresses])
        wait_until(lambda: stack.extproc_ready() and {p.address for p in fake.pods}
                   <= stack.envoy_hosts(), 60, "gateway ready")  # fmt: skip
        time.sleep(1.0)  # a few scrapes: the scheduler sees every pod's metrics
        convs = long_context(
            qps=ns.qps, duration=ns.seconds, seed=ns.seed, model=MODEL,
            lengths=(ns.short_tokens, ns.long_tokens),
            weights=(1 - ns.long_share, ns.long_share), max_tokens=ns.max_tokens,
        )  # fmt: skip
        # the engines run ``scale`` times slower than simulated time: send on the same
        # simulated schedule, stretched, and read the latencies back in simulated seconds
        convs = [replace(c, arrival=c.arrival * scale) for c in convs]
        result = run(run_open_loop(stack.url, convs, duration=ns.seconds * scale,
                                   qps=ns.qps / scale, drain_timeout=60 * scale,
                                   request_timeout=120 * scale))  # fmt: skip
        result = to_simulated(result, scale)
        if ns.records:
            ns.records.mkdir(parents=True, exist_ok=True)
            out = ns.records / f"{slug}.jsonl"
            out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in result.records))
        where = breakdown(result, pods, ns.long_tokens, scale)
        return summarize(result), stall_share(result), where
    finally:
        for s in reversed(stop):
            s.stop()


Row = tuple[Setup, Summary, float, Breakdown]


def report(rows: list[Row], ns: argparse.Namespace) -> str:
    base = rows[0][1]

    def ms(x: float) -> str:
        return f"{x * 1000:.0f}"

    lines = [
        "# Prefill/decode serving vs aggregated (`python -m bench.pd`)",
        "",
        f"{ns.pods} simulator pods (time scale {ns.time_scale:g}, default timing model) behind"
        " Envoy + extproc"
        + (
            f" (the engines run {ns.time_scale:g}x slower than simulated time, the load is sent"
            " on the stretched schedule and every figure is in simulated time)"
            if ns.time_scale != 1
            else ""
        )
        + f" on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, load average"
        f" {os.getloadavg()[0]:.1f} at the end)."
        " Workload (seed"
        f" {ns.seed}): Poisson {ns.qps:g} req/s for {ns.seconds:g} s, {ns.long_share:.0%}"
        f" {ns.long_tokens}-token prompts, the rest {ns.short_tokens}-token chats,"
        f" {ns.max_tokens} output tokens, streamed. PD setups use the `nixl` connector through"
        " `matrixinfer-pd-proxy` beside each decode pod.",
        "",
        "| setup | ok/requests | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms |"
        " ITL p99 ms | output tok/s | ITL p90 / agg | ITL p99 / agg | TTFT p90 / agg |"
        f" gaps > {STALL_GAP * 1000:.0f} ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setup, s, stalled, _ in rows:
        lines.append(
            f"| {setup.name} | {s.ok}/{s.requests} | {ms(s.ttft_p50)} | {ms(s.ttft_p90)} |"
            f" {ms(s.itl_p50)} | {ms(s.itl_p90)} | {ms(s.itl_p99)} | {s.output_tok_per_s:.0f} |"
            f" {s.itl_p90 / base.itl_p90:.2f} | {s.itl_p99 / base.itl_p99:.2f} |"
            f" {s.ttft_p90 / base.ttft_p90:.2f} | {stalled:.1%} |"
        )
    errors = [f"{setup.name}: {s.error_kinds}" for setup, s, _, _ in rows if s.error_kinds]
    if errors:
        lines += ["", "Errors by kind: " + "; ".join(errors) + "."]
    lines += [
        "",
        "Where TTFT goes (means over the run unless marked p90; engine figures from the engines'"
        " own histograms, handoff from the PD proxy's):",
        "",
        "| setup | long TTFT p90 ms | short TTFT p90 ms | long TTFT mean ms |"
        " prefill engine queue ms | prefill engine TTFT ms | proxy handoff ms |"
        " decode engine TTFT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setup, _, _, b in rows:
        lines.append(
            f"| {setup.name} | {ms(b.ttft_long_p90)} | {ms(b.ttft_short_p90)} |"
            f" {ms(b.ttft_long_mean)} | {ms(b.prefill_queue)} | {ms(b.prefill_ttft)} |"
            f" {_ms_or_dash(b.handoff)} | {_ms_or_dash(b.decode_ttft)} |"
        )
    lines += [
        "",
        "Target (issue #20): ITL p90 <= 0.7x aggregated at equal pod count, TTFT p90 <= 1.2x.",
        "",
        f"Command: `python -m bench.pd --pods {ns.pods} --qps {ns.qps:g} --seconds"
        f" {ns.seconds:g} --seed {ns.seed} --long-share {ns.long_share:g}"
        + (f" --prefill-pods {','.join(map(str, ns.prefill_pods))}" if ns.prefill_pods else "")
        + (f" --max-tokens {ns.max_tokens}" if ns.max_tokens != 128 else "")
        + (f" --time-scale {ns.time_scale:g}" if ns.time_scale != 1 else "")
        + (" --also-least-request" if ns.also_least_request else "")
        + "`",
        "",
    ]
    return "\n".join(lines)


def _ms_or_dash(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.0f}"


def _counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pd", description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--qps", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--short-tokens", type=int, default=100)
    ap.add_argument("--long-share", type=float, default=0.3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--first-host", default="127.0.0.200")
    ap.add_argument("--also-least-request", action="store_true",
                    help="also run each PD setup with least-request instead of prefill-queue"
                    " picking the prefill pod (default: off)")  # fmt: skip
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="the simulators' --time-scale (wall = simulated x scale); the load is"
                    " sent on the stretched schedule and latencies reported in simulated"
                    " seconds, so the gateway's and proxy's CPU costs weigh 1/scale as much"
                    " (default: 1)")  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="print the report only")
    ap.add_argument("--records", type=Path, default=None,
                    help="write each setup's per-request records (JSON lines) into this folder"
                    " (default: none)")  # fmt: skip
    ap.add_argument(
        "--prefill-pods",
        type=_counts,
        default=None,
        help="comma-separated prefill pod counts of the PD setups, e.g. 2,3"
        " (default: 1 and pods/2 for 4 pods or more)",
    )
    ns = ap.parse_args(argv)
    n = ns.pods
    counts = ns.prefill_pods or ([1, n // 2] if n >= 4 else [1])
    bad = [c for c in counts if not 0 < c < n]
    if bad:
        ap.error(f"--prefill-pods: {bad} leave no prefill or no decode pod of --pods {n}")
    setups = [Setup("aggregated", 0, n)]
    setups += [Setup(f"{c}P:{n - c}D", c, n - c) for c in dict.fromkeys(counts)]
    if ns.also_least_request:
        setups += [
            Setup(f"{c}P:{n - c}D least-request", c, n - c, "least-request")
            for c in dict.fromkeys(counts)
        ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as tmp:
        for setup in setups:
            s, stalled, where = measure(setup, ns, Path(tmp))
            print(f"{setup.name}: {s.ok}/{s.requests} ok, TTFT p90 {s.ttft_p90:.3f}s,"
                  f" ITL p90 {s.itl_p90 * 1000:.1f}ms, gaps > {STALL_GAP * 1000:.0f} ms"
                  f" {stalled:.1%}", flush=True)  # fmt: skip
            rows.append((setup, s, stalled, where))
    text = report(rows, ns)
    print(text)
    if not ns.no_write:
        REPORT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
