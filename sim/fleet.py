"""Start and stop fleets of simulator processes, one loopback address per pod.

Replica ``i`` is named ``f"{name_prefix}-{i}"`` and binds ``first_host + i`` (127.0.0.10,
127.0.0.11, ...) on the same port, as pods of one Deployment would. Each replica is a
:class:`matrixinfer.process.Child` (own process group, log file, readiness = ``GET /health``).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matrixinfer.process import Child, http_ok

__all__ = ["Fleet", "SimPod", "sim_argv"]


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
        self._children: list[Child] = [self._child(p) for p in self.pods]

    def _child(self, pod: SimPod) -> Child:
        health = f"{pod.url}/health"
        return Child(
            pod.name,
            sim_argv(pod, self.model, self.args),
            log_path=(self.log_dir / f"{pod.name}.log") if self.log_dir else None,
            env={"POD_NAME": pod.name, "PYTHONUNBUFFERED": "1"},
            ready=lambda: http_ok(health, timeout=0.5),
            ready_timeout=self.ready_timeout,
        )

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
        self._children[index].kill()

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
