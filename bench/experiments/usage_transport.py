"""PROTOTYPE driver (session 6; the switches it uses were removed in the next commit): where usage
accounting's latency goes. ``python -m bench.experiments.usage_transport [--rounds 40]
[--stacks data,usage,...]``. Not a test.

Stacks of ``bench.policy_overhead`` (nginx upstream, 200 req/s, interleaved rounds), each with
Envoy's stdout access log printing per-request durations in microseconds between Envoy's time
points (``%COMMON_DURATION(A:B:us)%``): DS_RX_END:US_TX_BEG is the wait for the extproc's
decision, DS_RX_BEG:DS_TX_END the whole request inside Envoy. Variants (env switches read by the
prototype code): ``usage`` (--policies), ``fluentd`` (usage reports as Fluentd-forward records to
a TCP listener of the extproc, cluster static EDS), ``sink`` (the gRPC access log to a separate
sink process: Envoy does all its accounting work, the extproc gets no reports), ``flush1s``
(access log flushed every 1 s, 256 KB buffer), ``nofilters`` (xDS --no-policy-filters); a
trailing ``#2`` runs a second identical stack (an A/A check of stack-to-stack bias).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics as st
import sys
import tempfile
from pathlib import Path

from bench.gateway_overhead import UPSTREAM_HOSTS, gateway_config, nginx_child, request_body
from bench.policy_overhead import hey, median_ci, paired_median, rotation
from matrixinfer.process import Child, free_port, unwind_on_sigterm, wait_until
from matrixinfer.stack import GatewayStack, StackOptions

SEGS = ("DS_RX_END:US_TX_BEG", "DS_RX_BEG:DS_TX_END")
SWITCHES = ("MI_SINK_ADDR", "MI_FLUENTD_PORT", "MI_FLUSH_MS", "MI_BUF")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.usage_transport")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--stacks", default="data,usage,fluentd,sink")
    args = p.parse_args(argv)
    os.environ["MI_AL_FORMAT"] = "SEG " + " ".join(f"%COMMON_DURATION({s}:us)%" for s in SEGS)
    os.environ["MI_AL_FORMAT"] += "\n"
    names = [n for n in args.stacks.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        port = free_port(UPSTREAM_HOSTS[0])
        wanted = {f"{h}:{port}" for h in UPSTREAM_HOSTS}
        body = run / "body.json"
        body.write_bytes(request_body())
        sink_port, sink_out = free_port(), run / "sink.json"
        sink = Child("sink", [sys.executable, "-m", "bench.experiments.usage_filters", "--sink",
                              str(sink_port), "--sink-out", str(sink_out)],
                     log_path=run / "sink.log", ready=sink_out.exists).start()  # fmt: skip
        stacks: list[tuple[str, GatewayStack, Path]] = []
        try:
            with nginx_child(run, port):
                for i, name in enumerate(names):
                    kind = name.split("#")[0]
                    for k in SWITCHES:
                        os.environ.pop(k, None)
                    if kind == "sink":
                        os.environ["MI_SINK_ADDR"] = f"127.0.0.1:{sink_port}"
                    elif kind == "fluentd":
                        os.environ["MI_FLUENTD_PORT"] = "7"
                    elif kind == "flush1s":
                        os.environ["MI_FLUSH_MS"], os.environ["MI_BUF"] = "1000", "262144"
                    extra = () if kind == "data" else ("--policies",)
                    xds = ("--no-policy-filters",) if kind == "nofilters" else ()
                    d = run / f"run-{i}"
                    s = GatewayStack(gateway_config(run / f"config-{i}", port), d, StackOptions(
                        extproc_log_level="WARNING", extra_extproc_args=extra,
                        extra_xds_args=xds, message_timeout_ms=2000, access_log=True)).start()  # fmt: skip
                    stacks.append((name, s, d))
                    wait_until(lambda: s.extproc_ready() and wanted <= s.envoy_hosts(), 30, "ready")
                for k in SWITCHES:
                    os.environ.pop(k, None)
                rows: dict[str, list] = {n: [] for n in names}
                for r in range(args.rounds):
                    for name, s, _ in rotation(stacks, r):
                        pids = (s.envoy.pid, s.extproc.pid)
                        rows[name].append(hey(name, f"{s.url}/chat/completions", body, 200.0,
                                              2.0, pids))  # fmt: skip
        finally:
            for _, s, _ in stacks:
                s.stop()
            sink.stop()
        base = rows[names[0]]
        for name, _, d in stacks:
            segs: dict[str, list[int]] = collections.defaultdict(list)
            for line in (d / "envoy.log").read_text().splitlines():
                if line.startswith("SEG "):
                    for k, v in zip(SEGS, line.split()[1:], strict=False):
                        if v != "-":
                            segs[k].append(int(v))
            ws = rows[name]
            lo, hi = median_ci([a.p50 - b.p50 for a, b in zip(ws, base, strict=True)])
            print(f"{name:12} p50 {st.median(w.p50 for w in ws):.2f} "
                  f"Δp50 {paired_median(ws, base, lambda w: w.p50):+.2f} ({lo:+.2f}..{hi:+.2f}) "
                  f"ΔEnvoy {paired_median(ws, base, lambda w: w.cpu_envoy_ms):+.3f} "
                  f"Δextproc {paired_median(ws, base, lambda w: w.cpu_extproc_ms):+.3f} | "
                  + " ".join(f"{k} {st.median(v) / 1000:.3f}" for k, v in segs.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    raise SystemExit(main())
