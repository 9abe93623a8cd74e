"""Soak (``python -m bench.soak``): the whole gateway under steady load for minutes. Not a test;
writes bench/reports/soak.md.

The stack: ``matrixinfer``'s local stack (xDS + extproc + Envoy) with policies on — API keys,
a Redis-shared rate limit (budgets far above the load: nothing is refused for it) and usage
accounting (Envoy's usage filters, the access log, the ledger) — in front of simulator pods.

1. **saturation**: a closed loop of ``--workers`` clients sends the request mix back to back
   for ``--saturation-seconds``; the completed requests per second are the saturation;
2. **soak**: ``--minutes`` of open-loop arrivals at ``--load`` (0.8) of that rate, evenly spaced,
   the kinds in a fixed rotation (:data:`MIX`): a chat answer, a stream read to its end, a
   stream the client drops after its first events (aborted), a gRPC ModelInfer call (the Open
   Inference Protocol, the pods' ``workloadPort.grpcPort``), bad requests (malformed JSON, an
   unknown model, a wrong API key: the 4xx they must get);
3. every ``--sample-seconds``: RSS (VmRSS) and open file descriptors of the Envoy and extproc
   processes (/proc);
4. after the last answer and the usage grace: the ledger's settlements (the extproc's
   ``matrixinfer_gateway_usage_reports_total`` by source) against the requests that reached a
   pod.

Verdict (:func:`verdict`): no unexpected outcome (anything but the answer a kind must get), RSS
growth after warm-up < 5 %, no FD growth after warm-up (the median open FDs of the last quarter
of the samples not above the first quarter's after warm-up: connection pools fill to their
size under the first bursts — Envoy's to the pods, the extproc's to Redis, at most 100 — and
are not a leak; the idle counts before and after and the kinds that moved are reported), every
routed request settled exactly once and none unreported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from controllers.xds.generate import GRPC_PODS_CLUSTER

REPORT = Path(__file__).parent / "reports" / "soak.md"
MODEL = "soak-model"
KEY = "soak-key-0123456789"
# the request kinds in the order they are sent (one rotation = 20 requests): 8 chat answers,
# 5 streams read to the end, 2 aborted streams, 2 gRPC ModelInfer calls (the Open Inference
# Protocol), 3 bad requests
MIX: tuple[str, ...] = (
    "chat", "stream", "chat", "aborted", "grpc", "stream", "bad_json", "chat", "stream", "chat",
    "unknown_model", "grpc", "chat", "aborted", "chat", "stream", "bad_key", "chat", "stream",
    "chat",
)  # fmt: skip
# what each kind must get (a gRPC call: its status code's number, 0 = OK)
EXPECTED: dict[str, int] = {
    "chat": 200,
    "stream": 200,
    "aborted": 200,
    "grpc": 0,
    "bad_json": 400,
    "unknown_model": 404,
    "bad_key": 401,
}
# the kinds that reach a pod (each must be settled once)
ROUTED = frozenset(("chat", "stream", "aborted", "grpc"))
USAGE_SOURCES = ("reported", "aborted", "estimated", "error", "unreported")


# ---- the pure parts (tests/bench/test_soak.py) ------------------------------------------------
def kind_at(index: int) -> str:
    """The kind of the ``index``-th request (the rotation of :data:`MIX`)."""
    return MIX[index % len(MIX)]


def outcome(kind: str, status: int, error: str | None) -> tuple[bool, str]:
    """``(expected, label)`` of one request: expected when it got what its kind must get; the
    label names the outcome (``200``, ``404``, ``timeout``, ``ClientPayloadError`` ...)."""
    if error is not None:
        return False, error
    return status == EXPECTED[kind], str(status)


@dataclass(slots=True)
class Sample:
    at: float  # seconds since the soak started
    rss_kib: dict[str, int]  # process name -> VmRSS
    fds: dict[str, int]  # process name -> open file descriptors
    done: int  # requests finished so far
    in_flight: int
    # the most the load generator sent a request after its due time since the previous sample
    # (seconds: the client itself was starved of CPU), and the 1-minute load average
    send_lag: float = 0.0
    load1: float = 0.0


@dataclass(slots=True, frozen=True)
class Growth:
    first: float  # median over the first post-warm-up window
    last: float  # median over the last window

    @property
    def percent(self) -> float:
        return 100.0 * (self.last - self.first) / self.first if self.first else 0.0


def growth(samples: Sequence[Sample], warmup: float, series: str, name: str) -> Growth:
    """How ``series`` (``rss_kib`` | ``fds``) of process ``name`` moved after ``warmup``
    seconds: the median of the first quarter of the later samples against the median of the
    last quarter (at least one sample each)."""
    values = [float(getattr(s, series)[name]) for s in samples if s.at >= warmup]
    if not values:
        raise ValueError(f"no sample after the warm-up of {warmup:g}s")
    n = max(1, len(values) // 4)
    return Growth(statistics.median(values[:n]), statistics.median(values[-n:]))


@dataclass(slots=True)
class Tally:
    """Outcomes of the soak's requests, by kind."""

    sent: Counter[str] = field(default_factory=Counter)
    expected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, label)
    unexpected: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    # the first answer text of each unexpected outcome (the error message it carried)
    details: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(
        self, kind: str, status: int, error: str | None, seconds: float, detail: str = ""
    ) -> None:
        ok, label = outcome(kind, status, error)
        (self.expected if ok else self.unexpected)[(kind, label)] += 1
        if ok and kind in ROUTED:
            self.latencies.append(seconds)
        if not ok:
            self.details.setdefault((kind, label), detail[:300].strip())

    @property
    def routed(self) -> int:
        """Requests that reached a pod as they should: each must be settled once."""
        return sum(n for (kind, _), n in self.expected.items() if kind in ROUTED)


def verdict(
    tally: Tally,
    samples: Sequence[Sample],
    warmup: float,
    settled: dict[str, float],
    idle: tuple[dict[str, int], dict[str, int]],
    max_rss_growth: float = 5.0,
) -> list[tuple[str, bool, str]]:
    """The soak's checks: ``(check, passed, figures)``. ``settled``: the usage reports by
    source counted during the soak; ``idle``: each process's open FDs before and after it, with
    no load and the load's connections closed (reported, not judged)."""
    out: list[tuple[str, bool, str]] = []
    unexpected = sum(tally.unexpected.values())
    kinds = ", ".join(f"{k} {label}: {n}" for (k, label), n in sorted(tally.unexpected.items()))
    out.append(("zero unexpected errors", unexpected == 0, f"{unexpected} ({kinds or 'none'})"))
    names = sorted(samples[0].rss_kib) if samples else []
    for name in names:
        g = growth(samples, warmup, "rss_kib", name)
        out.append(
            (
                f"{name} RSS growth after warm-up < {max_rss_growth:g} %",
                g.percent < max_rss_growth,
                f"{g.first / 1024:.1f} MiB -> {g.last / 1024:.1f} MiB ({g.percent:+.2f} %)",
            )
        )
        f = growth(samples, warmup, "fds", name)
        before, after = idle[0][name], idle[1][name]
        out.append(
            (
                f"{name} no FD growth after warm-up",
                f.last <= f.first,
                f"median {f.first:g} after warm-up, {f.last:g} at the end (idle: {before} "
                f"before the soak, {after} after; the kinds that moved are below)",
            )
        )
    total = sum(v for k, v in settled.items() if k != "unreported")
    unreported = settled.get("unreported", 0.0)
    by_source = ", ".join(f"{k} {v:g}" for k, v in settled.items() if v)
    out.append(
        (
            "every usage report settled",
            total == tally.routed and unreported == 0,
            f"{tally.routed} routed requests, {total:g} settled ({by_source or 'none'})",
        )
    )
    return out


# ---- the stack ----------------------------------------------------------------------------------
def config_yaml(pods: Iterable[tuple[str, str]], redis: str, grpc_port: int) -> str:
    endpoints = "\n".join(
        f"  - {{name: {name}, address: '{address}', labels: {{app: soak}}}}"
        for name, address in pods
    )
    budget = (
        "{requestsPerUnit: 1000000000, inputTokensPerUnit: 1000000000, "
        "outputTokensPerUnit: 1000000000, unit: minute, scope: user, "
        f'global: {{redis: {{address: "{redis}"}}}}}}'
    )
    return f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: soak}}
spec:
  inferenceEngine: vLLM
  model: demo-model
  workloadSelector: {{matchLabels: {{app: soak}}}}
  workloadPort: {{port: 8000, grpcPort: {grpc_port}}}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: soak}}
spec:
  modelName: {MODEL}
  rateLimit: {budget}
  rules: [{{targets: [{{modelServerName: soak}}]}}]
---
apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: Endpoints
metadata: {{name: soak-sims}}
spec:
  endpoints:
{endpoints}
"""


def proc_stats(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open file descriptors) of process ``pid``."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _tcp_sockets() -> dict[str, tuple[int, str, bool]]:
    """Socket inode -> (local port, remote "ip:port", listening) of every TCP socket (IPv4)."""
    out: dict[str, tuple[int, str, bool]] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            rip, rport = remote.split(":")
            ip = ".".join(str(int(rip[i : i + 2], 16)) for i in (6, 4, 2, 0))
            out[inode] = (int(local.split(":")[1], 16), f"{ip}:{int(rport, 16)}", state == "0A")
    return out


def fd_kinds(pid: int) -> Counter[str]:
    """What process ``pid``'s open FDs are: ``listen :P``, ``in :P`` (a connection accepted on
    its port P), ``out ip:port`` (a connection it made), ``pipe``, ``anon_inode:...``, files."""
    tcp = _tcp_sockets()
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
    listening = set()
    for target in fds.values():
        entry = tcp.get(target[8:-1]) if target.startswith("socket:[") else None
        if entry is not None and entry[2]:
            listening.add(entry[0])
    out: Counter[str] = Counter()
    for target in fds.values():
        if target.startswith("socket:["):
            entry = tcp.get(target[8:-1])
            if entry is None:
                out["socket (not TCP/IPv4)"] += 1
            elif entry[2]:
                out[f"listen :{entry[0]}"] += 1
            elif entry[0] in listening:
                out[f"in :{entry[0]}"] += 1
            else:
                out[f"out {entry[1]}"] += 1
        elif target.startswith("pipe:"):
            out["pipe"] += 1
        elif target.startswith("anon_inode:"):
            out[target] += 1
        else:
            out["file"] += 1
    return out


def fd_changes(before: Counter[str], after: Counter[str]) -> str:
    """The kinds whose count changed, e.g. ``out 127.0.0.1:6379 2 -> 3``."""
    keys = sorted(set(before) | set(after))
    moved = [f"{k} {before[k]} -> {after[k]}" for k in keys if before[k] != after[k]]
    return "; ".join(moved) or "no kind changed"


def usage_reports(http_port: int) -> dict[str, float]:
    """``matrixinfer_gateway_usage_reports_total`` by source, from the extproc's metrics."""
    from matrixinfer.testing.metrics import port_metric

    name = "matrixinfer_gateway_usage_reports_total"
    return {source: port_metric(http_port, name, source=source) for source in USAGE_SOURCES}


# ---- the load ---------------------------------------------------------------------------------
class Load:
    def __init__(
        self, session: aiohttp.ClientSession, url: str, grpc_target: str, timeout: float
    ) -> None:
        import grpc

        from fleet.oip import grpc_predict_v2_pb2_grpc as oip_grpc

        self.session = session
        self.url = url
        self.seconds = timeout
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = oip_grpc.GRPCInferenceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.in_flight = 0
        self.done = 0

    async def grpc_call(self, index: int) -> tuple[int, str]:
        """One ModelInfer call: its status code's number (0: OK) and its details."""
        import grpc

        from fleet.oip import grpc_predict_v2_pb2 as oip

        tensor = oip.ModelInferRequest.InferInputTensor(
            name="text_input",
            datatype="BYTES",
            shape=[1],
            contents=oip.InferTensorContents(bytes_contents=[f"soak call {index}".encode()]),
        )
        request = oip.ModelInferRequest(
            model_name=MODEL,
            inputs=[tensor],
            parameters={"max_tokens": oip.InferParameter(int64_param=48)},
        )
        try:
            await self.stub.ModelInfer(
                request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=self.seconds
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            return int(exc.code().value[0]), exc.details() or ""
        return 0, ""

    def _request(self, kind: str, index: int) -> tuple[bytes, dict[str, str]]:
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
        if kind == "bad_key":
            headers["authorization"] = "Bearer not-a-key"
        if kind == "bad_json":
            return b'{"model": "' + MODEL.encode() + b'", "messages": [', headers
        body = {
            "model": "no-such-model" if kind == "unknown_model" else MODEL,
            "messages": [{"role": "user", "content": f"soak request {index}: tell me a story"}],
            "max_tokens": 48,
            "stream": kind in ("stream", "aborted"),
        }
        return orjson.dumps(body), headers

    async def one(self, kind: str, index: int, tally: Tally) -> None:
        began = time.perf_counter()
        status, error, detail = 0, None, ""
        self.in_flight += 1
        try:
            if kind == "grpc":
                status, detail = await self.grpc_call(index)
            else:
                status, error, detail = await self.http_call(kind, index)
        except TimeoutError:
            error = "timeout"
        except Exception as exc:  # every other failure is an outcome to count, by its type
            error, detail = type(exc).__name__, str(exc)
        finally:
            self.in_flight -= 1
            self.done += 1
        tally.add(kind, status, error, time.perf_counter() - began, detail)

    async def http_call(self, kind: str, index: int) -> tuple[int, str | None, str]:
        """(status, error, the answer's text when it is not a 200)"""
        data, headers = self._request(kind, index)
        async with self.session.post(
            self.url, data=data, headers=headers, timeout=self.timeout
        ) as resp:
            if kind == "aborted" and resp.status == 200:
                events = 0
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        events += 1
                        if events >= 2:
                            break
                resp.close()  # the client goes away mid-stream
                return resp.status, None, ""
            body = await resp.read()
            if kind == "stream" and resp.status == 200 and b"data: [DONE]" not in body:
                return resp.status, "stream without [DONE]", body[-300:].decode(errors="replace")
            detail = body.decode(errors="replace") if resp.status != 200 else ""
            return resp.status, None, detail


async def closed_loop(load: Load, workers: int, seconds: float) -> tuple[float, Tally]:
    """Requests per second of ``workers`` clients sending the mix back to back."""
    tally = Tally()
    counter = iter(range(10**9))
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            i = next(counter)
            await load.one(kind_at(i), i, tally)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return (sum(tally.expected.values()) + sum(tally.unexpected.values())) / (
        time.perf_counter() - began
    ), tally


async def open_loop(
    load: Load, rate: float, seconds: float, sample_every: float, pids: dict[str, int]
) -> tuple[Tally, list[Sample]]:
    tally = Tally()
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    began = time.perf_counter()

    lag = [0.0]

    def sample() -> None:
        rss, fds = {}, {}
        for name, pid in pids.items():
            rss[name], fds[name] = proc_stats(pid)
        at = time.perf_counter() - began
        samples.append(Sample(at, rss, fds, load.done, load.in_flight, lag[0], os.getloadavg()[0]))
        lag[0] = 0.0

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(sample_every)

    sampling = asyncio.create_task(sampler())
    i = 0
    while True:
        due = began + i / rate
        if due - began >= seconds:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag[0] = max(lag[0], -delay)
        kind = kind_at(i)
        tally.sent[kind] += 1
        task = asyncio.create_task(load.one(kind, i, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks)
    sample()
    sampling.cancel()
    return tally, samples


# ---- the report ---------------------------------------------------------------------------------
def report(
    args: argparse.Namespace,
    saturation: float,
    rate: float,
    tally: Tally,
    samples: list[Sample],
    settled: dict[str, float],
    checks: list[tuple[str, bool, str]],
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
    warm: Tally,
) -> str:
    passed = all(ok for _, ok, _ in checks)
    lat = sorted(tally.latencies)

    def pct(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

    lines = [
        "# Soak",
        "",
        f"`python -m bench.soak --minutes {args.minutes:g}` on {platform.node()} "
        f"({os.cpu_count()} CPUs, shared; load average {load[0][0]:.2f} / {load[0][1]:.2f} / "
        f"{load[0][2]:.2f} before, {load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f} "
        "after). The local stack (xDS + one extproc + Envoy) with policies on — API key auth, a "
        "Redis-shared rate limit (budgets far above the load), usage accounting — in front of "
        f"{args.pods} simulator pods (`--time-scale {args.time_scale:g}`).",
        "",
        f"**Verdict: {'PASS' if passed else 'FAIL'}.**",
        "",
    ]
    findings = args.out.with_name(args.out.stem + ".findings.md")
    if findings.exists():  # hand-written commentary on the committed run, kept across runs
        lines += [findings.read_text().strip(), ""]
    lines += [
        "| check | result | figures |",
        "|---|---|---|",
        *(f"| {name} | {'pass' if ok else 'FAIL'} | {fig} |" for name, ok, fig in checks),
        "",
        "## Load",
        "",
        f"Saturation (closed loop, {args.workers} clients, {args.saturation_seconds:g} s, same "
        f"mix): **{saturation:.1f} req/s**. Soak: open loop at {args.load:.0%} of it, "
        f"**{rate:.1f} req/s** for {args.minutes:g} min, the kinds in a fixed rotation of "
        f"{len(MIX)} ({', '.join(f'{k} {MIX.count(k)}' for k in EXPECTED)}). Latency of the "
        f"routed requests that got their answer: p50 {pct(0.5):.0f} ms, p90 {pct(0.9):.0f} ms, "
        f"p99 {pct(0.99):.0f} ms.",
        "",
        f"The saturation run itself: {sum(warm.expected.values())} expected outcomes, "
        f"{sum(warm.unexpected.values())} unexpected"
        + "".join(f"; {k} {lab}: {n}" for (k, lab), n in sorted(warm.unexpected.items()))
        + " (not part of the verdict: that run is past saturation on purpose).",
        "",
        "| kind | sent | expected outcome | unexpected |",
        "|---|---|---|---|",
    ]
    for kind in EXPECTED:
        exp = ", ".join(
            f"{lab}: {n}" for (k, lab), n in sorted(tally.expected.items()) if k == kind
        )
        une = ", ".join(
            f"{lab}: {n}" for (k, lab), n in sorted(tally.unexpected.items()) if k == kind
        )
        lines.append(f"| {kind} | {tally.sent[kind]} | {exp or '-'} | {une or '0'} |")
    if tally.details:
        lines += ["", "The first answer of each unexpected outcome:", ""]
        lines += [f"- {k} {lab}: `{text}`" for (k, lab), text in sorted(tally.details.items())]
    lines += [
        "",
        "Usage settlements during the soak (extproc metrics, after the usage grace): "
        + ", ".join(f"{k} {v:g}" for k, v in settled.items())
        + f"; routed requests: {tally.routed}.",
        "",
        f"## Processes (a sample every {args.sample_seconds:g} s, shown: evenly spaced ones and "
        f"the 5 with the most requests in flight; warm-up: the first {args.warmup:g} s)",
        "",
    ]
    names = sorted(samples[0].rss_kib) if samples else []
    lines += [
        "Open FDs by kind, idle before the soak -> idle after it (`listen`/`in`: the process's "
        "own ports; `out`: connections it made):",
        "",
        *(f"- {n}: {args.fd_changes.get(n, '?')}" for n in names),
        "",
    ]
    header = "| t (s) | load avg | send lag s | done | in flight | " + " | ".join(
        f"{n} RSS MiB | {n} FDs" for n in names
    )
    lines += [header + " |", "|" + "---|" * (5 + 2 * len(names))]
    step = max(1, len(samples) // 20)
    # evenly spaced, the last one, and the 5 with the most requests in flight (the stalls)
    picked = set(range(0, len(samples), step)) | {len(samples) - 1}
    picked |= set(sorted(range(len(samples)), key=lambda i: -samples[i].in_flight)[:5])
    shown = [samples[i] for i in sorted(picked) if i >= 0]
    for s in shown:
        cells = " | ".join(f"{s.rss_kib[n] / 1024:.1f} | {s.fds[n]}" for n in names)
        lines.append(
            f"| {s.at:.0f} | {s.load1:.1f} | {s.send_lag:.2f} | {s.done} | {s.in_flight} | "
            f"{cells} |"
        )
    lines.append("")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--load", type=float, default=0.8, help="share of saturation (default 0.8)")
    p.add_argument("--workers", type=int, default=32, help="saturation clients (default 32)")
    p.add_argument(
        "--saturation-seconds", type=float, default=30.0, help="saturation run (default 30)"
    )
    p.add_argument("--warmup", type=float, default=60.0, help="warm-up seconds (default 60)")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="sampling (default 5)")
    p.add_argument("--pods", type=int, default=2, help="simulator pods (default 2)")
    p.add_argument("--time-scale", type=float, default=0.05, help="sims' (default 0.05)")
    p.add_argument("--out", type=Path, default=REPORT, help=f"report (default {REPORT})")
    p.add_argument("--run-dir", type=Path, help="logs (default: a temporary directory)")
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=12.0,
        help="wait for the usage reports after each run (default 12: the usage grace is 10)",
    )
    return p


def run(args: argparse.Namespace, run_dir: Path) -> tuple[str, bool]:
    from matrixinfer.process import free_port, wait_until
    from matrixinfer.stack import GatewayStack, StackOptions
    from matrixinfer.testing.redis import RedisServer
    from sim.fleet import Fleet

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench.soak: redis-server is missing (make system-deps)")
    (run_dir / "redis").mkdir(parents=True, exist_ok=True)
    redis = RedisServer(binary, run_dir / "redis")
    host = "127.0.0.150"
    grpc_port = free_port(host)
    fleet = Fleet(
        args.pods,
        port=free_port(host),
        first_host=host,
        args=("--time-scale", str(args.time_scale), "--output-len", "uniform:8:48",
              "--max-num-seqs", "256", "--grpc-port", str(grpc_port)),
        log_dir=run_dir,
        name_prefix="soak",
    )  # fmt: skip
    config = run_dir / "config"
    config.mkdir(exist_ok=True)
    secrets = run_dir / "secrets"
    secrets.mkdir(exist_ok=True)
    import hashlib

    digest = hashlib.sha256(KEY.encode()).hexdigest()
    (secrets / "keys.yaml").write_text(
        f"keys:\n- {{sha256: {digest}, tenant: soak, user: soak, groups: []}}\n"
    )
    (secrets / "auth.yaml").write_text("apiKeysFile: keys.yaml\n")
    redis.start()
    try:
        with fleet:
            pods = [(p.name, p.address) for p in fleet.pods]
            (config / "soak.yaml").write_text(config_yaml(pods, redis.address, grpc_port))
            stack = GatewayStack(
                config,
                run_dir / "stack",
                StackOptions(
                    extproc_log_level="WARNING",
                    policies=True,
                    auth_config=secrets / "auth.yaml",
                    message_timeout_ms=5000,
                ),
            ).start()
            with stack:
                wanted = {a for _, a in pods}
                grpc_wanted = {f"{a.rpartition(':')[0]}:{grpc_port}" for _, a in pods}
                wait_until(
                    lambda: (
                        stack.extproc_ready()
                        and wanted <= stack.envoy_hosts()
                        and grpc_wanted <= stack.envoy_hosts(GRPC_PODS_CLUSTER)
                    ),
                    60,
                    "the gateway ready, Envoy knowing the pods' HTTP and gRPC addresses",
                )
                pids = {"envoy": stack.envoy.pid, "extproc": stack.extproc.pid}
                if None in pids.values():
                    raise RuntimeError(f"a gateway process is not running: {pids}")
                url = stack.url + "/chat/completions"
                target = f"{stack.options.listen_host}:{stack.listen_port}"
                return asyncio.run(_drive(args, url, target, pids, stack.http_port))  # type: ignore[arg-type]
    finally:
        redis.stop()


async def _drive(
    args: argparse.Namespace, url: str, grpc_target: str, pids: dict[str, int], metrics: int
) -> tuple[str, bool]:
    """Saturation, then the soak, each with its own client connections, closed after it: the
    processes' FDs are compared idle (connections of the load closed, reports settled) before
    and after the soak."""
    before_load = os.getloadavg()
    settle = args.settle_seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        load = Load(session, url, grpc_target, timeout=60.0)
        print(f"saturation: {args.workers} clients for {args.saturation_seconds:g}s", flush=True)
        saturation, warm = await closed_loop(load, args.workers, args.saturation_seconds)
        await load.channel.close()
    rate = args.load * saturation
    print(f"saturation {saturation:.1f} req/s; soak at {rate:.1f} req/s", flush=True)
    await asyncio.sleep(settle)  # the saturation run's reports settle (usage grace 10 s)
    idle_before = {name: proc_stats(pid)[1] for name, pid in pids.items()}
    kinds_before = {name: fd_kinds(pid) for name, pid in pids.items()}
    settled_before = usage_reports(metrics)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        load = Load(session, url, grpc_target, timeout=60.0)
        tally, samples = await open_loop(load, rate, args.minutes * 60, args.sample_seconds, pids)
        await load.channel.close()
    await asyncio.sleep(settle)  # the last reports arrive (Envoy batches; the usage grace is 10 s)
    idle_after = {name: proc_stats(pid)[1] for name, pid in pids.items()}
    kinds_after = {name: fd_kinds(pid) for name, pid in pids.items()}
    args.fd_changes = {n: fd_changes(kinds_before[n], kinds_after[n]) for n in pids}
    after = usage_reports(metrics)
    settled = {k: after.get(k, 0.0) - settled_before.get(k, 0.0) for k in USAGE_SOURCES}
    args.warmup = min(args.warmup, args.minutes * 60 / 4)
    checks = verdict(tally, samples, args.warmup, settled, (idle_before, idle_after))
    args.raw = {
        "saturation": saturation,
        "rate": rate,
        "settled": settled,
        "idle": [idle_before, idle_after],
        "unexpected": {f"{k} {lab}": n for (k, lab), n in tally.unexpected.items()},
        "samples": [
            {"at": x.at, "rss_kib": x.rss_kib, "fds": x.fds, "done": x.done,
             "in_flight": x.in_flight, "send_lag": x.send_lag, "load1": x.load1}
            for x in samples
        ],
    }  # fmt: skip
    loads = (before_load, os.getloadavg())
    text = report(args, saturation, rate, tally, samples, settled, checks, loads, warm)
    return text, all(ok for _, ok, _ in checks)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.run_dir is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        text, passed = run(args, args.run_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            text, passed = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(args.raw, indent=1) + "\n")
    print(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
