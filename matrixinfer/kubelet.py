"""The local kubelet: runs the pods of the local cluster's API as local processes.

For each pod it sees (Pending, no process yet) it takes a loopback address of its own (127.0.0.10,
127.0.0.11, ... by default, one whose port is free), starts the engine simulator with the model
name, LoRA adapters, port and the engine arguments the simulator understands taken from the pod's
engine container (:func:`sim_command`), and writes the pod's status through the API as the
kubelet would: ``podIP`` and phase Running at once, the Ready condition once ``GET /health``
answers 200. A process that exits turns its pod Failed (not ready, the exit code in
``containerStatuses``) so that the ModelInfer controller replaces it; a deleted pod's process is
stopped (SIGTERM, then SIGKILL). Every process gets SIGTERM when the kubelet's thread ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from controllers.modelinfer.types import LABEL_ROLE
from matrixinfer.process import die_with_parent, port_is_free

__all__ = ["LocalCommand", "LocalKubelet", "sim_command"]

log = logging.getLogger("matrixinfer.kubelet")

ENGINE_CONTAINER = "engine"  # the Model controller's name for it; else the first container
DEFAULT_PORT = 8000
# engine flags the kubelet sets itself, or reads (never passed through as they are)
_OWN = {"--host", "--port", "--model", "--model-path", "--served-model-name", "--pod-name"}
_LORA = {"--lora-modules", "--lora-paths"}


@dataclass(frozen=True, slots=True)
class LocalCommand:
    """How one pod runs here: the simulator's command line, the port it serves, and the engine
    arguments the simulator does not know (left out, reported in the pod's log)."""

    argv: list[str]
    port: int
    model: str
    ignored: list[str] = field(default_factory=list)


def _sim_options() -> set[str]:
    from sim.cli import serve_parser

    return {o for o in serve_parser()._option_string_actions if o.startswith("--")}


def engine_container(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    containers = list((pod.get("spec") or {}).get("containers") or ())
    for c in containers:
        if c.get("name") == ENGINE_CONTAINER:
            return dict(c)
    return dict(containers[0]) if containers else None


def _options(tokens: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--flag v1 v2 --other=v`` → [("--flag", ["v1", "v2"]), ("--other", ["v"])]; tokens
    before the first flag (the program and its positionals) come under the name ""."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for t in tokens:
        if t.startswith("--"):
            name, eq, value = t.partition("=")
            out.append((name, [value] if eq else []))
        else:
            out[-1][1].append(t)
    return out


def sim_command(
    pod: Mapping[str, Any],
    host: str,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> LocalCommand:
    """The simulator command line for ``pod`` on ``host``. Reads the engine container's
    ``command`` + ``args`` (``vllm serve MODEL ...`` or ``python3 -m sglang.launch_server
    --model-path MODEL ...``): ``--served-model-name`` (else the model) is the model the
    simulator serves, ``--port`` (else the container port, else 8000) its port, LoRA adapters
    (``--lora-modules`` / ``--lora-paths NAME=PATH``) are loaded, every other flag the
    simulator knows is passed on, the rest listed in ``ignored``; a pod of role ``prefill`` or
    ``decode`` (the ModelInfer controller's role label) runs that role. ``extra``: simulator flags
    for every pod (e.g. ``--time-scale``), given last."""
    meta = pod.get("metadata") or {}
    name = str(meta.get("name") or "")
    c = engine_container(pod) or {}
    tokens = [str(t) for t in [*(c.get("command") or ()), *(c.get("args") or ())]]
    engine = "sglang" if any("sglang" in t for t in tokens) else "vllm"
    options = _options(tokens)
    head = options[0][1]
    model = head[2] if len(head) > 2 and head[1] == "serve" else ""  # vllm serve MODEL
    served: list[str] = []
    ports = [p.get("containerPort") for p in c.get("ports") or () if p.get("containerPort")]
    port = int(ports[0]) if ports else DEFAULT_PORT
    lora: list[str] = []
    passed: list[str] = []
    ignored: list[str] = []
    known = _sim_options()
    for flag, values in options[1:]:
        if flag == "--served-model-name":
            served = values
        elif flag in ("--model", "--model-path") and values:
            model = values[0]
        elif flag == "--port" and values:
            port = int(values[0])
        elif flag in _LORA:
            lora += values
        elif flag in _OWN or flag == "--enable-lora":
            continue
        elif flag in known:
            passed += [flag, *values]
        else:
            ignored += [flag, *values]
    served_name = served[0] if served else model or name
    argv = [
        python, "-m", "sim", "--model", served_name, "--engine", engine,
        "--host", host, "--port", str(port), "--pod-name", name,
    ]  # fmt: skip
    if len(served) > 1:
        argv += ["--served-model-name", *served]
    if lora:
        argv += ["--lora-modules", *lora]
    role = str((meta.get("labels") or {}).get(LABEL_ROLE) or "")
    if role in ("prefill", "decode"):  # a disaggregated backend's role pods
        argv += ["--role", role]
    return LocalCommand([*argv, *passed, *extra], port, served_name, ignored)


class Addresses:
    """Loopback addresses for pods: the lowest from ``first`` up that is not taken and whose
    ``port`` is free (another program may hold it); released when the pod's process is gone."""

    def __init__(self, first: str = "127.0.0.10") -> None:
        self.first = ipaddress.IPv4Address(first)
        if not self.first.is_loopback:
            raise ValueError(f"pod addresses must be in 127.0.0.0/8, got {first}")
        self.taken: set[str] = set()

    def take(self, port: int) -> str:
        ip = self.first
        while ip.is_loopback:
            host = str(ip)
            last = int(ip) & 0xFF
            if last not in (0, 255) and host not in self.taken and port_is_free(host, port):
                self.taken.add(host)
                return host
            ip += 1
        raise RuntimeError(f"no free loopback address from {self.first} for port {port}")

    def release(self, host: str) -> None:
        self.taken.discard(host)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LocalPod:
    """One pod's process."""

    namespace: str
    name: str
    uid: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float
    ready: bool = False
    failed: bool = False


Event = Callable[[str], None]


def _spawn(command: LocalCommand, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start one pod's process (own session, output appended to ``log_path``); it gets SIGTERM
    when the thread that started it ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        if command.ignored:
            note = " ".join(command.ignored)
            out.write(f"local kubelet: engine flags the simulator ignores: {note}\n".encode())
            out.flush()
        return subprocess.Popen(
            command.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
            preexec_fn=die_with_parent(os.getpid(), any_thread=True),
        )  # fmt: skip


class LocalKubelet:
    """Runs the pods of the API at ``url`` (read from ``objects``: the emulator's store, in this
    process) as local simulator processes. Runs in the local cluster's event loop; ``say``
    receives a line per pod transition (started, ready, exited, stopped)."""

    def __init__(
        self,
        url: str,
        objects: Callable[[], list[dict[str, Any]]],
        log_dir: Path,
        *,
        first_host: str = "127.0.0.10",
        sim_args: Sequence[str] = (),
        interval: float = 0.1,
        say: Event | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.objects = objects
        self.log_dir = log_dir
        self.addresses = Addresses(first_host)
        self.sim_args = list(sim_args)
        self.interval = interval
        self.say = say or (lambda line: log.info("%s", line))
        self.pods: dict[tuple[str, str, str], LocalPod] = {}
        self.startup: dict[str, float] = {}  # pod -> seconds from process start to /health 200
        self.started: dict[str, float] = {}  # pod -> time.monotonic() its process started
        self.ready_at: dict[str, float] = {}  # pod -> time.monotonic() it turned Ready
        self.session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            while True:
                try:
                    await self.sync()
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.warning("local kubelet: %s; trying again", exc)
                await asyncio.sleep(self.interval)
        finally:
            self.stop_all()
            await self.session.close()

    async def sync(self) -> None:
        """One pass: start new pods, report readiness and exits, stop deleted pods."""
        live: set[tuple[str, str, str]] = set()
        for pod in self.objects():
            meta = pod.get("metadata") or {}
            key = (str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid")))
            if meta.get("deletionTimestamp"):
                continue
            live.add(key)
            if key not in self.pods:
                if not (pod.get("status") or {}).get("phase"):
                    await self._start(key, pod)
                continue
            await self._check(self.pods[key])
        for key in [k for k in self.pods if k not in live]:
            local = self.pods.pop(key)
            await self._stop(local)
            self.say(f"pod {local.name}: deleted, process stopped")

    async def _start(self, key: tuple[str, str, str], pod: Mapping[str, Any]) -> None:
        ns, name, uid = key
        port = sim_command(pod, "127.0.0.1").port
        host = self.addresses.take(port)
        command = sim_command(pod, host, self.sim_args)
        log_path = self.log_dir / f"pod-{ns}-{name}.log"
        env = {**os.environ, "POD_NAME": name, "POD_NAMESPACE": ns, "PYTHONUNBUFFERED": "1"}
        proc = _spawn(command, log_path, env)
        local = LocalPod(ns, name, uid, host, command.port, proc, log_path, time.monotonic())
        self.pods[key] = local
        self.started.setdefault(name, local.started)
        await self._status(local, running=True, ready=False)
        self.say(f"pod {name}: started {command.model} at {host}:{command.port}")

    async def _check(self, local: LocalPod) -> None:
        if local.failed:
            return
        code = local.proc.poll()
        if code is not None:
            local.failed = True
            self.addresses.release(local.host)
            await self._status(local, running=False, ready=False, exit_code=code)
            self.say(f"pod {local.name}: process exited with code {code}; pod Failed")
            return
        if not local.ready and await self._healthy(local):
            local.ready = True
            await self._status(local, running=True, ready=True)
            took = time.monotonic() - local.started
            self.startup[local.name] = took
            self.ready_at.setdefault(local.name, time.monotonic())
            self.say(f"pod {local.name}: ready ({took:.1f}s)")

    async def _healthy(self, local: LocalPod) -> bool:
        assert self.session is not None
        try:
            url = f"http://{local.host}:{local.port}/health"
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _status(
        self, local: LocalPod, running: bool, ready: bool, exit_code: int | None = None
    ) -> None:
        state: dict[str, Any]
        if exit_code is None:
            state = {"running": {"startedAt": _now()}}
        else:
            state = {"terminated": {"exitCode": exit_code, "reason": "Error", "finishedAt": _now()}}
        status = {
            "phase": "Running" if running else "Failed",
            "podIP": local.host,
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False",
                 "lastTransitionTime": _now()},
            ],
            "containerStatuses": [
                {"name": ENGINE_CONTAINER, "ready": ready, "restartCount": 0, "state": state}
            ],
        }  # fmt: skip
        assert self.session is not None
        path = f"{self.url}/api/v1/namespaces/{local.namespace}/pods/{local.name}/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(path, json={"status": status}, headers=headers) as r:
            if r.status >= 400 and r.status != 404:  # 404: deleted meanwhile
                raise aiohttp.ClientError(f"PATCH pod {local.name} status: HTTP {r.status}")

    async def _stop(self, local: LocalPod, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; waits without blocking the loop (the
        API server shares it)."""
        _signal(local, signal.SIGTERM)
        try:
            await asyncio.to_thread(local.proc.wait, grace)
        except subprocess.TimeoutExpired:
            _signal(local, signal.SIGKILL)
            await asyncio.to_thread(local.proc.wait)
        self.addresses.release(local.host)

    def stop_all(self, grace: float = 5.0) -> None:
        """Every process: SIGTERM to all, then SIGKILL to those still running after ``grace``."""
        for local in self.pods.values():
            _signal(local, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for local in self.pods.values():
            try:
                local.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(local, signal.SIGKILL)
                local.proc.wait()
        self.pods.clear()


def _signal(local: LocalPod, sig: int) -> None:
    """``sig`` to the pod's process group (its own session), if it still runs."""
    if local.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(local.proc.pid, sig)
