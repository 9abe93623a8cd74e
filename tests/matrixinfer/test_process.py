from __future__ import annotations

import sys
from pathlib import Path

import pytest

from matrixinfer.process import (
    Child,
    ReadinessTimeout,
    find_envoy,
    free_port,
    http_ok,
    wait_until,
)


def test_free_port_is_bindable() -> None:
    """A server (SO_REUSEADDR, as Envoy, grpc, aiohttp and Redis bind) takes the held port."""
    import socket

    p = free_port()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        s.listen()


def test_a_held_port_is_not_given_to_another_process() -> None:
    """While held, other processes' own probes (bind to port 0) never get the port: the race of a
    closed probe whose port the kernel hands to someone else before the child binds it."""
    import subprocess
    import sys

    held = {free_port() for _ in range(200)}
    probe = (
        "import socket\n"
        "for _ in range(3000):\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1]); s.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert not held & {int(x) for x in out.stdout.split()}


def test_free_port_does_not_hand_out_a_port_twice() -> None:
    # the kernel offers a closed probe's port again at random (about 10 repeats in 500 probes
    # here); a stack asks for its ports before its children bind them, so repeats must not pass
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_http_ok_is_false_for_a_server_that_does_not_speak_http1() -> None:
    import socket
    import threading

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def greet() -> None:  # an HTTP/2 server's first bytes (a SETTINGS frame)
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x00@\x00\x00\n")

        t = threading.Thread(target=greet, daemon=True)
        t.start()
        assert http_ok(f"http://127.0.0.1:{port}/healthz", timeout=5) is False
        t.join(5)


def test_child_waits_for_readiness_and_stops(logdir: Path) -> None:
    port = free_port()
    child = Child(
        "http.server",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        log_path=logdir / "http.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/"),
        ready_timeout=20,
    )
    with child:
        assert child.running()
        assert http_ok(f"http://127.0.0.1:{port}/")
    assert not child.running()
    assert not http_ok(f"http://127.0.0.1:{port}/")


def test_child_that_exits_early_reports_its_log(logdir: Path) -> None:
    child = Child(
        "crasher",
        [sys.executable, "-c", "import sys; print('boom happened'); sys.exit(3)"],
        log_path=logdir / "crash.log",
        ready=lambda: False,
        ready_timeout=20,
    )
    with pytest.raises(ReadinessTimeout, match=r"(?s)exited with code 3.*boom happened"):
        child.start()


def test_envoy_binary_is_found() -> None:
    assert Path(find_envoy()).is_file()


def test_sigterm_unwinds_and_stops_the_children(tmp_path: Path) -> None:
    """A command that called unwind_on_sigterm() and got SIGTERM stops what it started (by
    default Python would end at once and leave its child running)."""
    import os
    import signal
    import subprocess

    pid_file = tmp_path / "child.pid"
    script = f"""
import sys, time
from pathlib import Path
from matrixinfer.process import Child, unwind_on_sigterm
unwind_on_sigterm()
child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
              log_path=Path({str(tmp_path / "child.log")!r}), ready=lambda: True, ready_timeout=10)
with child:
    Path({str(pid_file)!r}).write_text(str(child.pid))
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(pid_file.exists, 20, "the child started")
        child_pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # the child was stopped (and reaped) by Child
            os.kill(child_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
