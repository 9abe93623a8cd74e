"""Ctrl-C of `matrixinfer gateway` drains Envoy first: a stream in flight finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from openai import OpenAI

from matrixinfer.process import free_port, http_ok, wait_until
from sim.fleet import Fleet
from tests.matrixinfer.test_gateway_cmd import CONFIG

pytestmark = pytest.mark.timeout(180)

TOKENS = 40  # at ~10 simulated ms per token and --time-scale 10: about 4 s of streaming


def test_a_stream_in_flight_survives_ctrl_c_of_matrixinfer_gateway(tmp_path: Path) -> None:
    port = free_port("127.0.0.76")
    with Fleet(1, port=port, first_host="127.0.0.76", args=("--time-scale", "10")) as fleet:
        config = tmp_path / "config"
        config.mkdir()
        endpoints = "\n".join(
            f"  - {{name: {p.name}, address: {p.host}, labels: {{app: byo}}}}" for p in fleet.pods
        )
        (config / "byo.yaml").write_text(CONFIG.format(port=port, endpoints=endpoints))
        listen = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "matrixinfer.cli", "gateway", "--config", str(config),
             "--port", str(listen), "--run-dir", str(tmp_path / "run"), "--drain-timeout", "60s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
        reader.start()
        base = f"http://127.0.0.1:{listen}/v1"
        try:
            wait_until(lambda: "Ctrl-C stops" in "".join(lines), 90, "the gateway")
            client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
            stream = client.chat.completions.create(
                model="demo-model",
                messages=[{"role": "user", "content": "a long answer, please"}],
                max_tokens=TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = iter(stream)
            first = next(chunks)  # the stream is in flight
            proc.send_signal(signal.SIGINT)
            wait_until(lambda: "draining" in "".join(lines), 30, "the drain to start")
            # Envoy takes no new request meanwhile
            wait_until(lambda: not http_ok(f"{base}/models", timeout=0.5), 10, "listener closed")
            rest = list(chunks)
            usage = [c.usage for c in (first, *rest) if c.usage is not None]
            text = [c.choices[0].delta.content for c in (first, *rest) if c.choices]
            assert usage and usage[-1].completion_tokens == TOKENS, "".join(lines)
            assert rest[-2].choices[0].finish_reason == "length"
            assert len([t for t in text if t]) == TOKENS
            proc.wait(timeout=60)
            reader.join(timeout=10)
            out = "".join(lines)
            assert proc.returncode == 0, out
            assert "drain timeout" not in out
            assert not http_ok(f"{base}/models", timeout=0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
