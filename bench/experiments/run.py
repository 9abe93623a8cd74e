"""Measure ext_proc transport variants behind the gateway's own Envoy bootstrap (not a test).

``python -m bench.experiments.run --variants aio-pb,aio-raw,real --reps 3 --seconds 5``

Each variant is a server (``bench.experiments.servers`` or ``real`` = the MatrixInfer extproc via
``GatewayStack``) behind Envoy rendered from ``envoy/gateway.yaml.tmpl`` (BUFFERED), nginx as the
upstream. Load: ``wrk -t1 -cC`` for S seconds (saturation); CPU per request = (utime + stime of
the process) / requests served, from /proc. Variants run round-robin ``--reps`` times so machine
load drifts hit them alike; the table shows best (lowest CPU) and the spread.
Extra per-variant flags: ``aio-raw+tuned`` passes ``--tuned``, ``+nouv`` ``--no-uvloop``,
``+gc`` ``--gc-freeze``; ``rate=N`` adds a ``hey`` fixed-rate latency window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.gateway_overhead import (
    UPSTREAM_HOSTS,
    WRK_LUA,
    baseline_envoy,
    cpu_seconds,
    gateway_config,
    nginx_child,
    request_body,
    run_hey,
    run_wrk,
)
from matrixinfer.envoy_config import EnvoySettings, render_bootstrap
from matrixinfer.process import Child, find_envoy, free_port, http_ok, wait_until
from matrixinfer.stack import GatewayStack, StackOptions

PROFILE = Path("/tmp/extproc-profile.prof")
FLAGS = {
    "tuned": ["--tuned"],
    "nouv": ["--no-uvloop"],
    "gc": ["--gc-freeze"],
    "inline": ["--inline"],
}


@dataclass
class Sample:
    rps: float
    cpu_ext_ms: float
    cpu_envoy_ms: float
    p50_ms: float
    errors: int


@dataclass
class Row:
    name: str
    samples: list[Sample] = field(default_factory=list)
    latency: list[str] = field(default_factory=list)


@contextlib.contextmanager
def variant_stack(
    spec: str, run: Path, upstream_port: int, body_mode: str
) -> Iterator[tuple[str, int | None, int | None]]:
    name, *flags = spec.split("+")
    if name == "envoy":  # plain Envoy round-robin (bench.gateway_overhead's baseline)
        baseline, url = baseline_envoy(run, upstream_port)
        with baseline:
            yield url, None, baseline.pid
        return
    if name in ("real", "real-h2", "real-h2lib"):
        profile = "profile" in flags
        extra = [f"--{f}" for f in flags if f != "profile"]
        stack = GatewayStack(
            gateway_config(run, upstream_port),
            run / f"real-{len(os.listdir(run))}",
            StackOptions(
                body_mode=body_mode,
                extproc_log_level="WARNING",
                extra_extproc_args=extra,
                # real-h2lib: the product's --transport h2 (extproc/transport_h2.py)
                transport="h2" if name == "real-h2lib" else "grpc",
            ),
        )
        if name == "real-h2":
            i = stack.extproc.argv.index("extproc.main")
            stack.extproc.argv[i] = "bench.experiments.h2_real"
        if profile:
            i = stack.extproc.argv.index("extproc.main")
            stack.extproc.argv[i : i + 1] = ["bench.experiments.profile_extproc", str(PROFILE)]
        with stack:
            wanted = {f"{h}:{upstream_port}" for h in UPSTREAM_HOSTS}
            wait_until(lambda: stack.extproc_ready() and wanted <= stack.envoy_hosts(), 20, "ready")
            yield f"{stack.url}/chat/completions", stack.extproc.pid, stack.envoy.pid
        return
    from extproc.envoy_eds import write_eds

    grpc_port, listen, admin = free_port(), free_port(), free_port()
    eds = run / f"eds-{grpc_port}" / "pods.json"
    write_eds(eds, "matrixinfer_pods", [f"{h}:{upstream_port}" for h in UPSTREAM_HOSTS])
    bootstrap = run / f"envoy-{grpc_port}.yaml"
    bootstrap.write_text(
        render_bootstrap(EnvoySettings(listen, admin, grpc_port, eds, body_mode=body_mode))
    )
    argv = [sys.executable, "-m", "bench.experiments.servers", name, str(grpc_port),
            f"{UPSTREAM_HOSTS[0]}:{upstream_port}"]  # fmt: skip
    argv += FLAGS.get(flags[0] if flags else "", [])
    for f in flags[1:]:
        argv += FLAGS[f]

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", grpc_port)) == 0

    server = Child(spec, argv, log_path=run / f"{name}-{grpc_port}.log", ready=listening,
                   ready_timeout=20)  # fmt: skip
    envoy = Child(
        "envoy",
        [find_envoy(), "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "warn",
         "--concurrency", "2"],
        log_path=run / f"envoy-{grpc_port}.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{admin}/ready"),
        ready_timeout=20,
    )  # fmt: skip
    with server, envoy:
        yield f"http://127.0.0.1:{listen}/v1/chat/completions", server.pid, envoy.pid


def one_window(url: str, run: Path, body: bytes, seconds: float, conns: int,
               ext: int | None, env: int | None) -> Sample:  # fmt: skip
    c0 = (cpu_seconds(ext), cpu_seconds(env))
    # wrk's own count of completed requests is the denominator
    rps, p50, errors = run_wrk_c(url, run, body, seconds, conns)
    c1 = (cpu_seconds(ext), cpu_seconds(env))
    n = max(1.0, rps * seconds)
    return Sample(rps, (c1[0] - c0[0]) * 1000 / n, (c1[1] - c0[1]) * 1000 / n, p50, errors)


def run_wrk_c(
    url: str, run: Path, body: bytes, seconds: float, conns: int
) -> tuple[float, float, int]:
    """``wrk -t1 -c<conns>`` with bench.gateway_overhead's POST script: (req/s, p50 ms, errors)."""
    if conns == 32:
        return run_wrk(url, run, body, seconds)
    script = run / "post.lua"
    script.write_text(WRK_LUA.format(body=json.dumps(body.decode())))
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    requests, duration_us, errors, p50_us = (int(x) for x in m.groups())
    return requests / (duration_us / 1e6), p50_us / 1000, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.run")
    p.add_argument("--variants", default="aio-pb,aio-raw,real")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--rate", type=int, default=0, help="also a hey window at this rate (latency)")
    p.add_argument("--body-mode", default="BUFFERED")
    args = p.parse_args(argv)
    body = request_body()
    specs = args.variants.split(",")
    rows = {s: Row(s) for s in specs}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="xp-") as tmp:
        run = Path(tmp)
        upstream_port = free_port(UPSTREAM_HOSTS[0])
        with nginx_child(run, upstream_port):
            for rep in range(args.reps):
                for spec in specs:
                    with variant_stack(spec, run, upstream_port, args.body_mode) as (url, ext, env):
                        one_window(url, run, body, 1.0, args.conns, ext, env)  # warm-up
                        s = one_window(url, run, body, args.seconds, args.conns, ext, env)
                        rows[spec].samples.append(s)
                        print(f"rep {rep} {spec:24s} {s.rps:7.0f} req/s  extproc "
                              f"{s.cpu_ext_ms:.3f} ms/req  envoy {s.cpu_envoy_ms:.3f} ms/req  "
                              f"p50 {s.p50_ms:.2f} ms  err {s.errors}", flush=True)  # fmt: skip
                        if args.rate:
                            (run / "body.json").write_bytes(body)
                            r = run_hey(url, run / "body.json", args.rate, args.seconds, (env, ext))
                            rows[spec].latency.append(
                                f"{r.achieved:.0f}/s p50 {r.p50:.2f} p99 {r.p99:.2f} ms, "
                                f"extproc {r.cpu_extproc_ms:.3f} ms/req"
                            )
                            print(f"      {spec} @ {args.rate}/s: {rows[spec].latency[-1]}")
    load1 = os.getloadavg()[0]
    print(f"\nload average {load0:.1f} -> {load1:.1f}; wrk -t1 -c{args.conns} "
          f"{args.seconds:g}s windows, {args.reps} reps, body mode {args.body_mode}\n")  # fmt: skip
    print("| variant | extproc CPU ms/req best (spread) | Envoy CPU ms/req | req/s best (spread) |")
    print("|---|---|---|---|")
    for row in rows.values():
        cpu = sorted(x.cpu_ext_ms for x in row.samples)
        rps = sorted(x.rps for x in row.samples)
        env_ms = min(x.cpu_envoy_ms for x in row.samples)
        print(f"| {row.name} | {cpu[0]:.3f} ({cpu[0]:.3f}-{cpu[-1]:.3f}) | {env_ms:.3f} | "
              f"{rps[-1]:.0f} ({rps[0]:.0f}-{rps[-1]:.0f}) |")  # fmt: skip
    for row in rows.values():
        for lat in row.latency:
            print(f"- {row.name} @ {args.rate}/s: {lat}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
