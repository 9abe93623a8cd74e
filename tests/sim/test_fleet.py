"""The Fleet Python API (the local stack builds on it) and the matrixinfer-sim command line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from matrixinfer.process import Child, http_ok, wait_until
from sim.fleet import Fleet, SimPod

from .conftest import get, post

pytestmark = pytest.mark.timeout(90)


def port_free_on(hosts: list[str]) -> int:
    """A port that is free on every host (each replica binds its own address, same port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for h in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no common free port")


def test_simpod_identity() -> None:
    pod = SimPod("sim-0", "127.0.0.10", 8000)
    assert pod.url == "http://127.0.0.10:8000" and pod.address == "127.0.0.10:8000"


def test_fleet_layout_without_starting() -> None:
    f = Fleet(3, port=9000, first_host="127.0.0.20", name_prefix="x")
    assert [(p.name, p.host, p.port) for p in f.pods] == [
        ("x-0", "127.0.0.20", 9000),
        ("x-1", "127.0.0.21", 9000),
        ("x-2", "127.0.0.22", 9000),
    ]
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        Fleet(2, first_host="10.0.0.1")


def test_fleet_start_kill_restart_stop(logdir: Path) -> None:
    hosts = ["127.0.0.230", "127.0.0.231"]
    port = port_free_on(hosts)
    fleet = Fleet(
        2, model="m", port=port, first_host=hosts[0], args=["--time-scale", "0.05"],
        log_dir=logdir, name_prefix="ft",
    )  # fmt: skip
    with fleet:
        for i, pod in enumerate(fleet.pods):
            status, headers, _ = get(f"{pod.url}/health")
            assert status == 200 and headers["x-inference-pod"] == f"ft-{i}"
            status, headers, _ = post(
                f"{pod.url}/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}
            )
            assert status == 200 and headers["x-inference-pod"] == f"ft-{i}"
        fleet.kill(0)
        assert not fleet.running(0)
        assert not http_ok(f"{fleet.pods[0].url}/health")
        assert http_ok(f"{fleet.pods[1].url}/health")
        fleet.restart(0)
        assert fleet.running(0) and http_ok(f"{fleet.pods[0].url}/health")
        assert (logdir / "ft-0.log").exists()
    assert not any(http_ok(f"{p.url}/health", timeout=0.3) for p in fleet.pods)


def test_cli_rejects_bad_config_cleanly() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sim", "--num-gpu-blocks", "4", "--max-model-len", "8192"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2
    assert "max_model_len 8192 does not fit the KV cache" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "sim", "--output-len", "zipf:3"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "output_len" in r.stderr and "Traceback" not in r.stderr


def test_cli_fleet_command(logdir: Path) -> None:
    hosts = ["127.0.0.240", "127.0.0.241"]
    port = port_free_on(hosts)
    argv = [
        sys.executable, "-m", "sim", "fleet", "--replicas", "2", "--first-host", hosts[0],
        "--port", str(port), "--log-dir", str(logdir), "--time-scale", "0.05",
    ]  # fmt: skip
    urls = [f"http://{h}:{port}/health" for h in hosts]
    with Child("fleet-cli", argv, log_path=logdir / "fleet-cli.log",
               ready=lambda: all(http_ok(u) for u in urls)):  # fmt: skip
        assert get(urls[1])[1]["x-inference-pod"] == "sim-1"
    wait_until(lambda: not any(http_ok(u, timeout=0.3) for u in urls), 10, "fleet stopped")
