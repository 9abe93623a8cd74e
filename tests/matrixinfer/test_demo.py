"""`matrixinfer demo` as a user runs it: a real fleet, extproc and Envoy, no terminal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matrixinfer.process import free_port, http_ok, wait_until

pytestmark = pytest.mark.timeout(240)


def _demo_argv(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "matrixinfer.cli",
        "demo",
        "--port",
        str(free_port()),
        "--first-host",
        "127.0.0.70",
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def test_demo_without_a_terminal_sends_requests_and_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.run(
        _demo_argv(tmp_path, "--replicas", "2", "--requests", "3"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "curl -s http://127.0.0.1:" in out and "from openai import OpenAI" in out
    answers = re.findall(r"request (\d)/3 \((chat|stream)\) -> (sim-\d): '(.+)'", out)
    assert len(answers) == 3 and all(a[3].strip() for a in answers), out
    assert "stream" in {a[1] for a in answers}
    assert "requests per pod:" in out and "stopped: simulators, extproc and Envoy" in out


def test_demo_live_view_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _demo_argv(tmp_path, "--replicas", "2", "--requests", "0"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("requests per pod:"):
                break
        text = "".join(lines)
        assert "Press Ctrl-C to stop." in text, text
        url = re.search(r"OpenAI API at (http://\S+/v1)", text)
        assert url is not None
        assert http_ok(url.group(1) + "/models")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, text + rest
        assert "stopped: simulators, extproc and Envoy" in rest
        # nothing it started still answers
        wait_until(lambda: not http_ok(url.group(1) + "/models", timeout=0.3), 5, "Envoy gone")
        for log in ("sim-0.log", "extproc.log", "envoy.log"):
            assert (tmp_path / log).exists(), log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
