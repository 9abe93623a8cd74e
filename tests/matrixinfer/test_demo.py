"""`matrixinfer demo` as a user runs it: a real fleet, extproc and Envoy, no terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
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


def test_demo_lora_models_answer_from_pods_with_the_adapter(tmp_path: Path) -> None:
    """Issue #23: /v1/models lists demo-lora-a and demo-lora-b; requests for them answer 200 from
    a pod that has the adapter (every demo pod loads the adapters the demo's route declares)."""
    from openai import OpenAI

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
        text = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Press Ctrl-C to stop." not in text:
            line = proc.stdout.readline()
            if not line:
                break
            text += line
        url = re.search(r"OpenAI API at (http://\S+/v1)", text)
        assert url is not None, text
        pods = dict(re.findall(r"pod (sim-\d) at (http://\S+)", text))
        assert len(pods) == 2, text
        client = OpenAI(base_url=url.group(1), api_key="unused", max_retries=0, timeout=30)
        listed = {m.id for m in client.models.list()}
        assert {"demo-model", "demo-lora-a", "demo-lora-b"} <= listed
        for model in ("demo-lora-a", "demo-lora-b") * 4:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
            )
            assert raw.status_code == 200
            assert raw.parse().model == model
            pod = raw.headers["x-inference-pod"]
            assert model in pod_models(pods[pod]), (model, pod)
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def pod_models(pod_url: str) -> set[str]:
    """The models (base and adapters) one simulator pod serves, from its own /v1/models."""
    with urllib.request.urlopen(f"{pod_url}/v1/models", timeout=10) as resp:
        return {m["id"] for m in json.loads(resp.read())["data"]}
