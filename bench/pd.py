"""Prefill/decode serving against aggregated serving on the same pod count (``python -m bench.pd``).

Three fleets of ``--pods`` simulators (time scale 1, default timing model) behind the same gateway
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
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.loadgen import LoadResult, Summary, run, run_open_loop, summarize
from bench.workloads import long_context
from matrixinfer.process import Child, free_port, http_ok, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from sim.fleet import Fleet

REPORT = Path(__file__).parent / "reports" / "pd.md"
MODEL = "bench-model"
SIM_ARGS = ("--time-scale", "1", "--log-level", "warning")
# A token gap this long spans a step carrying a long prompt's prefill chunk: a decode step with
# 256 sequences and a short prompt's prefill costs ~40 ms in the default timing model.
STALL_GAP = 0.05


def stall_share(result: LoadResult) -> float:
    """Share of the successful streams' token gaps longer than STALL_GAP (NaN for no gaps)."""
    gaps = [g for r in result.records if r.ok for g in r.itl]
    return sum(g > STALL_GAP for g in gaps) / len(gaps) if gaps else math.nan


@dataclass
class Setup:
    name: str
    prefill: int  # 0: aggregated
    decode: int


def _host(first: str, i: int) -> str:
    a, b = first.rsplit(".", 1)
    return f"{a}.{int(b) + i}"


def _health(url: str) -> Callable[[], bool]:
    return lambda: http_ok(url)


def start_pods(setup: Setup, first_host: str, logs: Path) -> tuple[list[Any], str, list[str]]:
    """Start the setup's processes; (things to stop, config YAML, addresses Envoy must know)."""
    stop: list[Any] = []
    eps: list[str] = []
    addresses: list[str] = []
    if setup.prefill == 0:
        fleet = Fleet(setup.decode, model=MODEL, port=free_port(first_host), first_host=first_host,
                      args=SIM_ARGS, log_dir=logs, name_prefix="agg").start()  # fmt: skip
        stop.append(fleet)
        for p in fleet.pods:
            eps.append(f"  - {{name: {p.name}, address: '{p.address}', labels: {{app: bench}}}}")
            addresses.append(p.address)
        selector = "{matchLabels: {app: bench}}"
        extra = ""
    else:
        pre = Fleet(setup.prefill, model=MODEL, port=free_port(first_host), first_host=first_host,
                    args=[*SIM_ARGS, "--role", "prefill"], log_dir=logs,
                    name_prefix="pre").start()  # fmt: skip
        stop.append(pre)
        dhost = _host(first_host, setup.prefill)
        dec = Fleet(setup.decode, model=MODEL, port=free_port(dhost), first_host=dhost,
                    args=[*SIM_ARGS, "--role", "decode"], log_dir=logs,
                    name_prefix="dec").start()  # fmt: skip
        stop.append(dec)
        for p in pre.pods:
            eps.append(f"  - {{name: {p.name}, address: '{p.address}', "
                       "labels: {app: bench, role: prefill, group: g0}}")  # fmt: skip
            addresses.append(p.address)
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
        selector = (
            "\n    matchLabels: {app: bench}\n    pdGroup: {groupKey: group, prefillLabels: "
            "{role: prefill}, decodeLabels: {role: decode}}"
        )
        extra = "\n  kvConnector: {type: nixl}"
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
    return stop, config, addresses


def measure(setup: Setup, ns: argparse.Namespace, work: Path) -> tuple[Summary, float]:
    """The setup's load summary and its share of stalled token gaps (stall_share)."""
    logs = work / setup.name.replace(":", "")
    logs.mkdir(parents=True, exist_ok=True)
    stop, config, addresses = start_pods(setup, ns.first_host, logs)
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
        result = run(run_open_loop(stack.url, convs, duration=ns.seconds, qps=ns.qps,
                                   drain_timeout=60, request_timeout=120))  # fmt: skip
        return summarize(result), stall_share(result)
    finally:
        for s in reversed(stop):
            s.stop()


def report(rows: list[tuple[Setup, Summary, float]], ns: argparse.Namespace) -> str:
    base = rows[0][1]

    def ms(x: float) -> str:
        return f"{x * 1000:.0f}"

    lines = [
        "# Prefill/decode serving vs aggregated (`python -m bench.pd`)",
        "",
        f"{ns.pods} simulator pods (time scale 1, default timing model) behind Envoy + extproc"
        f" on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs). Workload (seed"
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
    for setup, s, stalled in rows:
        lines.append(
            f"| {setup.name} | {s.ok}/{s.requests} | {ms(s.ttft_p50)} | {ms(s.ttft_p90)} |"
            f" {ms(s.itl_p50)} | {ms(s.itl_p90)} | {ms(s.itl_p99)} | {s.output_tok_per_s:.0f} |"
            f" {s.itl_p90 / base.itl_p90:.2f} | {s.itl_p99 / base.itl_p99:.2f} |"
            f" {s.ttft_p90 / base.ttft_p90:.2f} | {stalled:.1%} |"
        )
    errors = [f"{setup.name}: {s.error_kinds}" for setup, s, _ in rows if s.error_kinds]
    if errors:
        lines += ["", "Errors by kind: " + "; ".join(errors) + "."]
    lines += [
        "",
        "Target (issue #20): ITL p90 <= 0.7x aggregated at equal pod count, TTFT p90 <= 1.2x.",
        "",
        f"Command: `python -m bench.pd --pods {ns.pods} --qps {ns.qps:g} --seconds"
        f" {ns.seconds:g} --seed {ns.seed} --long-share {ns.long_share:g}"
        + (f" --prefill-pods {','.join(map(str, ns.prefill_pods))}" if ns.prefill_pods else "")
        + "`",
        "",
    ]
    return "\n".join(lines)


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
    ap.add_argument("--no-write", action="store_true", help="print the report only")
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
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as tmp:
        for setup in setups:
            s, stalled = measure(setup, ns, Path(tmp))
            print(f"{setup.name}: {s.ok}/{s.requests} ok, TTFT p90 {s.ttft_p90:.3f}s,"
                  f" ITL p90 {s.itl_p90 * 1000:.1f}ms, gaps > {STALL_GAP * 1000:.0f} ms"
                  f" {stalled:.1%}", flush=True)  # fmt: skip
            rows.append((setup, s, stalled))
    text = report(rows, ns)
    print(text)
    if not ns.no_write:
        REPORT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
