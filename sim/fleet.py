"""Start and stop fleets of simulator processes, one loopback address per pod.

Replica ``i`` is named ``f"{name_prefix}-{i}"`` and binds ``first_host + i`` (127.0.0.10,
127.0.0.11, ...) on the same port, as pods of one Deployment would. Each replica is its own
process (own session, optional log file) and is ready when ``GET /health`` answers 200. The
simulator stands alone, so this launcher uses nothing of the platform.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["Fleet", "SimPod", "SimProcess", "sim_argv"]


@dataclass(frozen=True, slots=True)
class SimPod:
    """One simulated pod's identity and address."""

    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def sim_argv(pod: SimPod, model: str, args: Sequence[str] = ()) -> list[str]:
    """The command line that runs one simulator for ``pod``."""
    return [
        sys.executable,
        "-m",
        "sim",
        "--model",
        model,
        "--host",
        pod.host,
        "--port",
        str(pod.port),
        "--pod-name",
        pod.name,
        *args,
    ]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """``preexec_fn``: the simulator gets SIGTERM when the launcher dies (even by SIGKILL). The
    kernel ties it to the forking thread, so only children of the main thread get it."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: no such guarantee
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return arm


class SimProcess:
    """One simulator process: started in its own session, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, pod: SimPod, argv: list[str], log_path: Path | None, timeout: float):
        self.pod = pod
        self.argv = argv
        self.log_path = log_path
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start and wait for ``/health``; raise (with the log's tail) if it exits or is slow."""
        out: int | IO[bytes] = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("ab")
        env = {**os.environ, "POD_NAME": self.pod.name, "PYTHONUNBUFFERED": "1"}
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            )  # fmt: skip
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own copy
        deadline = time.monotonic() + self.timeout
        while not _healthy(f"{self.pod.url}/health"):
            if not self.running() or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop()
                state = f"exited with code {code}" if code is not None else "not ready in time"
                raise RuntimeError(f"{self.pod.name} {state}{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-20:]
        return "; last log lines:\n" + "\n".join(lines)

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()


class Fleet:
    """N simulator processes; use as a context manager or call start() / stop()."""

    def __init__(
        self,
        replicas: int = 4,
        *,
        model: str = "demo-model",
        port: int = 8000,
        first_host: str = "127.0.0.10",
        args: Sequence[str] = (),
        log_dir: Path | None = None,
        name_prefix: str = "sim",
        ready_timeout: float = 30.0,
    ) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        first = ipaddress.IPv4Address(first_host)
        last = first + max(replicas - 1, 0)
        if not (first.is_loopback and last.is_loopback):
            raise ValueError(
                f"fleet addresses {first}..{last} must stay in 127.0.0.0/8 "
                f"(first_host={first_host})"
            )
        self.model = model
        self.port = port
        self.args = list(args)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.ready_timeout = ready_timeout
        self.pods: list[SimPod] = [
            SimPod(f"{name_prefix}-{i}", str(first + i), port) for i in range(replicas)
        ]
        self._children: list[SimProcess] = [self._child(p) for p in self.pods]

    def _child(self, pod: SimPod) -> SimProcess:
        log_path = (self.log_dir / f"{pod.name}.log") if self.log_dir else None
        return SimProcess(pod, sim_argv(pod, self.model, self.args), log_path, self.ready_timeout)

    def start(self) -> Fleet:
        """Start every pod and wait until each answers /health; on failure stop them all."""
        try:
            for child in self._children:
                child.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for child in self._children:
            child.stop()

    def kill(self, index: int) -> None:
        """SIGKILL one pod (a crash); it stays down until restart()."""
        child = self._children[index]
        child.signal(signal.SIGKILL)
        if child.proc is not None:
            child.proc.wait()

    def restart(self, index: int) -> None:
        """Stop (if still running) and start pod ``index`` again, waiting for its /health."""
        child = self._children[index]
        child.stop()
        self._children[index] = self._child(self.pods[index])
        self._children[index].start()

    def running(self, index: int) -> bool:
        return self._children[index].running()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
