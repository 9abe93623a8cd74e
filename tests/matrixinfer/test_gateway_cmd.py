"""`matrixinfer gateway --config DIR` in front of existing OpenAI-compatible endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from matrixinfer.process import free_port, http_ok, wait_until
from sim.fleet import Fleet

pytestmark = pytest.mark.timeout(180)

CONFIG = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: byo}}
spec:
  inferenceEngine: vLLM
  workloadSelector: {{matchLabels: {{app: byo}}}}
  workloadPort: {{port: {port}}}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: byo}}
spec:
  modelName: demo-model
  rules: [{{targets: [{{modelServerName: byo}}]}}]
---
apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: Endpoints
metadata: {{name: my-vllm}}
spec:
  endpoints:
{endpoints}
"""


BAD_ROUTE = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: extra}
spec:
  modelName: extra-model
  rules: [{targets: [{modelServerName: ghost, weight: WEIGHT}]}]
"""


def test_gateway_serves_existing_endpoints_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port("127.0.0.75")
    with Fleet(2, port=port, first_host="127.0.0.75", args=("--time-scale", "0.02")) as fleet:
        config = tmp_path / "config"
        config.mkdir()
        endpoints = "\n".join(
            f"  - {{name: {p.name}, address: {p.host}, labels: {{app: byo}}}}" for p in fleet.pods
        )
        (config / "byo.yaml").write_text(CONFIG.format(port=port, endpoints=endpoints))
        listen = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "matrixinfer.cli",
                "gateway",
                "--config",
                str(config),
                "--port",
                str(listen),
                "--run-dir",
                str(tmp_path / "run"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{listen}/v1"
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            wait_until(lambda: http_ok(f"{base}/models"), 90, "gateway")
            body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
            served = set()
            for _ in range(6):
                req = urllib.request.Request(
                    f"{base}/chat/completions",
                    data=json.dumps(body).encode(),
                    headers={"content-type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=10) as resp:
                    served.add(resp.headers["x-inference-pod"])
            assert served <= {"sim-0", "sim-1"} and served
            # a rejected reload is printed with its file and line, then the recovery
            wait_until(lambda: "Ctrl-C stops" in "".join(lines), 30, "the start-up lines")
            bad = config / "zz-extra.yaml"
            bad.write_text(BAD_ROUTE.replace("WEIGHT", "900"))
            wait_until(lambda: "configuration rejected" in "".join(lines), 30, "rejection shown")
            assert f"{bad}:1 (document 1)" in "".join(lines)
            bad.write_text(BAD_ROUTE.replace("WEIGHT", "90"))
            wait_until(lambda: "accepted again" in "".join(lines), 30, "recovery shown")
            # the fixed file still names a ModelServer that does not exist: a warning
            wait_until(lambda: "ModelServer 'ghost'" in "".join(lines), 30, "dangling warning")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            reader.join(timeout=10)
            out = "".join(lines)
            assert proc.returncode == 0, out
            assert "OpenAI API at" in out and "demo-model" in out
            assert not http_ok(f"{base}/models", timeout=0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_gateway_refuses_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        CONFIG.format(port=99999, endpoints="  - {name: a, address: 127.0.0.1}")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "matrixinfer.cli", "gateway", "--config", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stdout and "workloadPort.port" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
