"""Inter-token latency of one simulator carrying 300 streams (``python -m bench.sim_itl``).

One ``matrixinfer-sim`` process (time scale 1, ``--max-num-seqs 512`` so every stream runs in
the same batch) is started with :class:`matrixinfer.process.Child`. This process opens N
concurrent streaming chat completions (aiohttp client, uvloop) with short prompts and a fixed
``max_tokens``, timestamps every SSE read, and compares the measured inter-token latency with
the timing model's prediction for a pure-decode step of N sequences:

    predicted ITL = step_base + N x decode_per_seq

Per stream, ITL = (time of last token - time of token ``--skip``) / (tokens in between); the
first ``--skip`` tokens are left out so the ramp-up (prefill steps of late arrivals) does not
count. Also reported: the gap distribution, the sim's own ITL histogram mean, and the sim
process's CPU use (from /proc) during the run. Writes bench/reports/sim_itl.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.process import Child, free_port, http_ok
from sim.config import TimingModel
from sim.fleet import SimPod, sim_argv

REPORT = Path(__file__).parent / "reports" / "sim_itl.md"
HOST = "127.0.0.3"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def _stream(
    session: aiohttp.ClientSession, url: str, i: int, max_tokens: int
) -> list[tuple[float, int]]:
    """(time, tokens in this read) for every read of one stream."""
    body = {
        "model": "demo-model",
        "messages": [{"role": "user", "content": f"stream {i}: tell me a long story"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    reads: list[tuple[float, int]] = []
    async with session.post(url, data=orjson.dumps(body)) as resp:
        resp.raise_for_status()
        async for data in resp.content.iter_any():
            n = data.count(b'"delta":{"content"')
            if n:
                reads.append((time.perf_counter(), n))
    return reads


def _itl_of(reads: list[tuple[float, int]], skip: int) -> tuple[float | None, list[float]]:
    times: list[float] = []
    for t, n in reads:
        times.extend([t] * n)
    if len(times) <= skip + 1:
        return None, []
    kept = times[skip:]
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    return (kept[-1] - kept[0]) / (len(kept) - 1), gaps


async def _run(
    url: str, streams: int, max_tokens: int
) -> tuple[list[list[tuple[float, int]]], float]:
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_stream(session, url, i, max_tokens) for i in range(streams))
        )
        return list(results), time.perf_counter() - t0


def _sim_itl_mean(url: str) -> tuple[float, float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:  # loopback only
        text = r.read().decode()
    s = c = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "vllm:inter_token_latency_seconds_sum":
                s = smp.value
            elif smp.name == "vllm:inter_token_latency_seconds_count":
                c = smp.value
    return (s / c if c else 0.0), c


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--skip", type=int, default=10, help="first tokens left out per stream")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--no-report", action="store_true")
    ns = ap.parse_args(argv)

    timing = TimingModel()
    predicted = timing.step_time(0, ns.streams)
    port = free_port(HOST)
    pod = SimPod("bench-sim", HOST, port)
    logdir = Path(tempfile.mkdtemp(prefix="sim-itl-"))
    args = ["--time-scale", "1", "--max-num-seqs", "512", "--log-level", "warning"]
    child = Child(
        "bench-sim",
        sim_argv(pod, "demo-model", args),
        log_path=logdir / "sim.log",
        ready=lambda: http_ok(f"{pod.url}/health"),
    )
    with child:
        assert child.pid is not None
        cpu0, wall0 = _cpu_seconds(child.pid), time.perf_counter()
        try:
            import uvloop

            results, elapsed = uvloop.run(
                _run(f"{pod.url}/v1/chat/completions", ns.streams, ns.max_tokens)
            )
        except ImportError:
            results, elapsed = asyncio.run(
                _run(f"{pod.url}/v1/chat/completions", ns.streams, ns.max_tokens)
            )
        cpu = (_cpu_seconds(child.pid) - cpu0) / (time.perf_counter() - wall0)
        sim_mean, sim_count = _sim_itl_mean(pod.url)

    per_stream: list[float] = []
    gaps: list[float] = []
    tokens = 0
    for reads in results:
        tokens += sum(n for _, n in reads)
        itl, g = _itl_of(reads, ns.skip)
        if itl is not None:
            per_stream.append(itl)
            gaps.extend(g)
    complete = sum(1 for r in results if sum(n for _, n in r) == ns.max_tokens)
    med = statistics.median(per_stream)
    mean = statistics.fmean(per_stream)
    err = (med - predicted) / predicted
    ok = abs(err) <= ns.tolerance and complete == ns.streams

    rows = [
        ("streams (concurrent)", f"{ns.streams}"),
        ("max_tokens per stream", f"{ns.max_tokens}"),
        ("streams completed with all tokens", f"{complete}"),
        ("tokens received", f"{tokens}"),
        ("wall time", f"{elapsed:.2f} s"),
        ("predicted ITL (step_base + N x decode_per_seq)", f"{predicted * 1000:.2f} ms"),
        ("measured ITL, median of per-stream means", f"{med * 1000:.2f} ms"),
        ("measured ITL, mean of per-stream means", f"{mean * 1000:.2f} ms"),
        ("error of the median vs prediction", f"{err * 100:+.1f} %"),
        ("client-side gap p50 / p90 / p99", " / ".join(
            f"{_pct(gaps, q) * 1000:.1f} ms" for q in (0.5, 0.9, 0.99))),
        ("sim's own vllm:inter_token_latency_seconds mean", f"{sim_mean * 1000:.2f} ms "
         f"({int(sim_count)} samples, includes ramp-up)"),
        ("sim process CPU during the run", f"{cpu * 100:.0f} % of one core"),
        ("result", "PASS (within tolerance)" if ok else "FAIL"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    if not ns.no_report:
        cmd = "python -m bench.sim_itl " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = (
            f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'unknown'}), "
            f"Linux {platform.release()}, Python {platform.python_version()}"
        )
        lines = [
            "# Simulator inter-token latency at 300 concurrent streams",
            "",
            f"Command: `{cmd.strip()}`  ",
            f"Machine: {machine} (shared with other jobs)  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "",
            "One `matrixinfer-sim` process at `--time-scale 1 --max-num-seqs 512`, default timing",
            f"model (step_base {timing.step_base * 1000:g} ms, decode_per_seq "
            f"{timing.decode_per_seq * 1e6:g} us). The client (this process, aiohttp + uvloop)",
            "opens all streams at once; per-stream ITL leaves out the first "
            f"{ns.skip} tokens (ramp-up).",
            "",
            "| figure | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
            "",
        ]
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text("\n".join(lines))
        print(f"wrote {REPORT}")
    return 0 if ok else 1


if __name__ == "__main__":
    from matrixinfer.process import unwind_on_sigterm

    unwind_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the children started are stopped
    sys.exit(main())
