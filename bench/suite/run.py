"""Run a suite: for each contender a fresh simulator fleet (cold KV caches), the routing layer in
front of it, an unloaded probe, the QPS sweep and the extra workloads; results as plain data.

Every contender sees the same fleet flags (timing model, sizes, ``--seed``) and the same
conversations (workload seeds): point *i* of the sweep uses workload seed ``seed + i``, so each
point brings new system prompts and does not profit from the previous point's cache.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen, workloads
from bench.contenders import CONTENDERS, KVEventPorts, start_contender
from bench.suite.config import SuiteConfig
from matrixinfer.process import free_port

__all__ = ["PointResult", "SuiteResult", "run_suite"]


@dataclass(slots=True)
class PointResult:
    contender: str
    workload: str
    mode: str  # "probe" (closed loop, concurrency 1) | "open"
    qps: float
    summary: dict[str, Any]
    ttfts: list[float]  # every successful request's TTFT (s), for the CDF
    machine_busy: float  # busy fraction of all cores during the run (0..1)
    loadgen_cpu: float  # load generator CPU seconds / wall seconds (1.0 = one core)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> cores used (CPU s / wall s)
    sim_state: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod -> /sim/state delta


@dataclass(slots=True)
class SuiteResult:
    config: dict[str, Any]
    started: str
    seconds: float
    points: list[PointResult]
    failures: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=float)


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    total = sum(parts[:8])
    return total - idle, total


def _label(cmdline: list[str]) -> str:
    joined = " ".join(cmdline)
    if "-m sim" in joined:
        return "sims"
    if "extproc" in joined:
        return "extproc"
    if "vllm-router" in joined or "vllm::router" in joined:  # it renames its process title
        return "vllm-router"
    if "envoy" in joined:
        return "envoy"
    return "other"


def child_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's direct children, summed by role."""
    out: dict[str, float] = {}
    me = os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue
        label = _label(cmd)
        out[label] = out.get(label, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _sim_state(pods: Sequence[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pod in pods:
        try:
            with urllib.request.urlopen(f"{pod.url}/sim/state", timeout=2) as resp:
                out[pod.name] = json.loads(resp.read())
        except (OSError, ValueError):
            out[pod.name] = {}
    return out


_COUNTERS = (
    "requests",
    "prompt_tokens",
    "prefill_computed_tokens",
    "prefix_cache_queries",  # the engines' own prefix-cache counters (vllm:prefix_cache_*)
    "prefix_cache_hits",
    "preemptions",
    "busy_time",
    "steps",
)


def _delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for pod, state in after.items():
        prev = before.get(pod, {})
        out[pod] = {
            k: state[k] - prev.get(k, 0) for k in _COUNTERS if isinstance(state.get(k), int | float)
        }
    return out


def _load_adapters(pods: Sequence[Any], names: Sequence[str]) -> None:
    for pod in pods:
        for name in names:
            body = json.dumps({"lora_name": name, "lora_path": f"/adapters/{name}"}).encode()
            req = urllib.request.Request(
                f"{pod.url}/v1/load_lora_adapter",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{pod.name}: loading adapter {name} answered {resp.status}")


def _measure(
    contender: str,
    workload: str,
    mode: str,
    qps: float,
    pods: Sequence[Any],
    work: Coroutine[Any, Any, loadgen.LoadResult],
) -> PointResult:
    before = _sim_state(pods)
    busy0, total0 = _cpu_times()
    children0 = child_cpu()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result: loadgen.LoadResult = loadgen.run(work)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    children1 = child_cpu()
    wall = wall1 - wall0
    busy1, total1 = _cpu_times()
    after = _sim_state(pods)
    summary = loadgen.summarize(result)
    return PointResult(
        contender=contender,
        workload=workload,
        mode=mode,
        qps=qps,
        summary=summary.as_dict(),
        ttfts=sorted(r.ttft for r in result.records if r.ok and r.ttft is not None),
        machine_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan"),
        loadgen_cpu=(cpu1 - cpu0) / wall,
        cpu={k: (v - children0.get(k, 0.0)) / wall for k, v in sorted(children1.items())},
        sim_state=_delta(before, after),
    )


def fleet_port(replicas: int, first_host: str = "127.0.0.10") -> int:
    """A port free on every sim address right now (other fleets may share 127.0.0.x)."""
    import ipaddress
    import socket

    base = ipaddress.ip_address(first_host)
    for _ in range(50):
        port = free_port(first_host)
        try:
            for i in range(1, replicas):
                with socket.socket() as s:
                    s.bind((str(base + i), port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all {replicas} addresses from {first_host}")


def _log(text: str) -> None:
    print(text, flush=True)


def _line(p: PointResult) -> str:
    s = p.summary
    return (
        f"  {p.contender:<24} {p.workload:<13} {p.mode:<5} qps={p.qps:<5g} "
        f"ok={s['ok']}/{s['requests']} ttft p50={s['ttft_p50'] * 1000:.0f}ms "
        f"p90={s['ttft_p90'] * 1000:.0f}ms tok/s={s['output_tok_per_s']:.0f} "
        f"cached={s['cached_fraction']:.2f} busy={p.machine_busy:.2f} "
        f"loadgen={p.loadgen_cpu:.2f} lag={s['max_send_lag'] * 1000:.0f}ms "
        + " ".join(f"{k}={v:.2f}" for k, v in p.cpu.items())
        + (f" errors={s['error_kinds']}" if s["errors"] else "")
    )


def _kv_events_config(ports: KVEventPorts) -> str:
    """The sims' --kv-events-config (vLLM's shape; ``*`` = the sim's own address)."""
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{ports.port}",
            "replay_endpoint": f"tcp://*:{ports.replay_port}",
        }
    )


def run_suite(config: SuiteConfig, run_dir: Path) -> SuiteResult:
    """Run every contender of ``config``; logs go under ``run_dir``."""
    from sim.fleet import Fleet

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.perf_counter()
    points: list[PointResult] = []
    failures: list[str] = []
    adapters = workloads.adapter_names(config.adapters)
    needed = list(config.contenders)
    for extra in config.extra:
        for name in extra.contenders:
            if name not in needed:
                needed.append(name)
    for name in needed:
        if name not in CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; known: {', '.join(sorted(CONTENDERS))}")
    sim_args = list(config.sim_args)
    kv_events: KVEventPorts | None = None
    if config.kv_events:
        kv_events = KVEventPorts(5557, 5558, "7")
        sim_args += ["--kv-events-config", _kv_events_config(kv_events)]
        os.environ["PYTHONHASHSEED"] = kv_events.hash_seed  # the sims inherit it
    for name in needed:
        contender = CONTENDERS[name]
        cdir = run_dir / name
        cdir.mkdir(parents=True, exist_ok=True)
        _log(f"== {name}: {contender.description}")
        fleet = Fleet(
            config.replicas,
            model=config.model,
            port=fleet_port(config.replicas),
            args=(*sim_args, *(contender.kv_events_sim_args if kv_events else ())),
            log_dir=cdir,
            name_prefix="sim",
        )
        try:
            with fleet:
                _load_adapters(fleet.pods, adapters)
                with start_contender(
                    contender,
                    fleet.pods,
                    cdir,
                    model=config.model,
                    adapters=adapters,
                    kv_events=kv_events,
                ) as url:
                    points.extend(_run_contender(config, name, url, fleet.pods))
        except Exception as exc:  # one broken contender must not lose the others' results
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            _log(f"  FAILED: {type(exc).__name__}: {exc}")
    return SuiteResult(
        config=config.model_dump(),
        started=started,
        seconds=time.perf_counter() - t0,
        points=points,
        failures=failures,
    )


def _run_contender(
    config: SuiteConfig, name: str, url: str, pods: Sequence[Any]
) -> list[PointResult]:
    out: list[PointResult] = []
    sweep = workloads.WORKLOADS[config.sweep_workload]
    if name in config.contenders and config.probe_requests > 0:
        probe_duration = 10.0 * config.probe_requests + 10.0  # ~10x more arrivals than needed
        convs = sweep(
            qps=1.0, duration=probe_duration, seed=config.seed + 1000, **config.sweep_args
        )[: config.probe_requests]
        p = _measure(
            name,
            config.sweep_workload,
            "probe",
            0.0,
            pods,
            loadgen.run_closed_loop(
                url,
                convs,
                concurrency=1,
                duration=config.duration * 3,
                drain_timeout=config.drain_timeout,
            ),
        )
        out.append(p)
        _log(_line(p))
    if name in config.contenders:
        for i, qps in enumerate(config.sweep_qps):
            convs = sweep(
                qps=qps, duration=config.duration, seed=config.seed + i, **config.sweep_args
            )
            p = _measure(
                name,
                config.sweep_workload,
                "open",
                qps,
                pods,
                loadgen.run_open_loop(
                    url,
                    convs,
                    duration=config.duration,
                    drain_timeout=config.drain_timeout,
                    qps=qps,
                ),
            )
            out.append(p)
            _log(_line(p))
    for j, extra in enumerate(config.extra):
        if name not in (extra.contenders or config.contenders):
            continue
        gen = workloads.WORKLOADS[extra.workload]
        duration = extra.duration or config.duration
        convs = gen(qps=extra.qps, duration=duration, seed=config.seed + 100 + j, **extra.args)
        p = _measure(
            name,
            extra.workload,
            "open",
            extra.qps,
            pods,
            loadgen.run_open_loop(
                url,
                convs,
                duration=duration,
                drain_timeout=config.drain_timeout,
                qps=extra.qps,
            ),
        )
        out.append(p)
        _log(_line(p))
    return out


def machine_info() -> dict[str, str]:
    import platform
    import sys

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
