from __future__ import annotations

import sys
from pathlib import Path

import pytest

from matrixinfer.process import Child, ReadinessTimeout, find_envoy, free_port, http_ok


def test_free_port_is_bindable() -> None:
    import socket

    p = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


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
