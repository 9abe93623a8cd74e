"""`matrixinfer gateway` with the policy options: an API key is required once --auth-config is
given (401 without one, 200 with it), and bad policy flags are refused naming the flag."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from matrixinfer.process import free_port, wait_until
from sim.fleet import Fleet
from tests.matrixinfer.test_gateway_cmd import CONFIG
from tests.policies.conftest import keys_yaml

pytestmark = pytest.mark.timeout(180)


def _chat(base: str, key: str | None) -> int:
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"{base}/chat/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0  # not listening yet


def test_gateway_auth_config_requires_an_api_key(tmp_path: Path) -> None:
    port = free_port("127.0.0.76")
    with Fleet(1, port=port, first_host="127.0.0.76", args=("--time-scale", "0.02")) as fleet:
        config = tmp_path / "config"
        config.mkdir()
        endpoints = "\n".join(
            f"  - {{name: {p.name}, address: {p.host}, labels: {{app: byo}}}}" for p in fleet.pods
        )
        (config / "byo.yaml").write_text(CONFIG.format(port=port, endpoints=endpoints))
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "keys.yaml").write_text(keys_yaml({"sk-good": ("acme", "alice", [])}))
        auth = secrets / "auth.yaml"
        auth.write_text(f"apiKeysFile: {secrets / 'keys.yaml'}\n")
        listen = free_port()
        run = tmp_path / "run"
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "matrixinfer.cli", "gateway",
                "--config", str(config), "--port", str(listen), "--run-dir", str(run),
                "--auth-config", str(auth), "--ratelimit-fail", "closed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{listen}/v1"
        try:
            wait_until(lambda: _chat(base, "sk-good") == 200, 90, "gateway serving the key")
            assert _chat(base, None) == 401
            assert _chat(base, "sk-wrong") == 401
            assert _chat(base, "sk-good") == 200

            # Envoy's JSON access line is on by default: one object per request in envoy.log
            def lines() -> list[dict[str, object]]:
                text = (run / "envoy.log").read_text()
                return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

            wait_until(lambda: len(lines()) >= 4, 10, "JSON access lines")
            assert {line["status"] for line in lines()} == {200, 401}
            assert any(line["model_server"] == "byo" for line in lines())
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--auth-config", "/nonexistent/auth.yaml", "no such file: /nonexistent/auth.yaml"),
        ("--ratelimit-fail", "sometimes", "invalid choice: 'sometimes'"),
        ("--redis-headroom", "2", "must be in (0, 1], got 2"),
    ],
)
def test_gateway_refuses_bad_policy_flags(tmp_path: Path, flag: str, value: str, says: str) -> None:
    cli = [sys.executable, "-m", "matrixinfer.cli", "gateway", "--config", str(tmp_path)]
    proc = subprocess.run(
        [*cli, flag, value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert flag in proc.stderr and says in proc.stderr
