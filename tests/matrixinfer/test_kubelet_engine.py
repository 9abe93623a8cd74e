"""The local kubelet runs an engine container's own command where its program is here: a tiny
HTTP engine (a script on this machine) runs exactly as the pod template writes it, with
``$(VAR)`` expanded and ``--host`` set to the pod's address; an engine whose program is not
installed here (``vllm``) runs as the simulator, and each pod's log says which."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from matrixinfer.kubelet import LocalKubelet
from matrixinfer.testing.kube import emulator, eventually

pytestmark = pytest.mark.timeout(120)

ENGINE = f"""#!{sys.executable}
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

argv = sys.argv
host = argv[argv.index("--host") + 1]
port = int(argv[argv.index("--port") + 1])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"argv": argv}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


HTTPServer((host, port), Handler).serve_forever()
"""


def _pod(name: str, command: list[str], args: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
        "spec": {
            "containers": [
                {"name": "engine", "command": command, "args": args,
                 "env": [{"name": "ENGINE_PORT", "value": "8000"},
                         {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                 "ports": [{"containerPort": 8000}]},
            ],
        },
    }  # fmt: skip


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


async def test_the_engine_runs_its_own_command_or_else_the_simulator(tmp_path: Path) -> None:
    script = tmp_path / "tiny-engine"
    script.write_text(ENGINE)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    args = ["--host", "0.0.0.0", "--port", "$(ENGINE_PORT)", "--name", "$(ME)", "$$(ME)"]
    own = _pod("own", [str(script)], args)
    sim = _pod("sim", ["vllm", "serve", "/weights"], ["--served-model-name", "m", "--port", "8000"])
    async with emulator() as api:
        kubelet = LocalKubelet(
            api.url, lambda: list(api.pods().values()), tmp_path / "run", first_host="127.0.0.200"
        )
        task = asyncio.create_task(kubelet.run())
        try:
            for pod in (own, sim):
                await api.request("POST", "/api/v1/namespaces/ns/pods", pod)

            def ready() -> bool:
                return all(
                    any(c["type"] == "Ready" and c["status"] == "True"
                        for c in (p.get("status") or {}).get("conditions") or ())
                    for p in api.pods().values()
                )  # fmt: skip

            await eventually(ready, 60, "both pods Ready")
            own_ip = api.pods()["own"]["status"]["podIP"]
            sim_ip = api.pods()["sim"]["status"]["podIP"]
            answer = await asyncio.to_thread(_get, f"http://{own_ip}:8000/anything")
            assert answer["argv"] == [
                str(script), "--host", own_ip, "--port", "8000", "--name", "own", "$(ME)",
            ]  # fmt: skip
            models = await asyncio.to_thread(_get, f"http://{sim_ip}:8000/v1/models")
            assert [m["id"] for m in models["data"]] == ["m"]  # the simulator serves it
            log_dir = tmp_path / "run"
            assert f"engine: {script} runs as written" in (log_dir / "pod-ns-own.log").read_text()
            assert (
                "engine: vllm is not installed here; vllm runs as the simulator"
                in (log_dir / "pod-ns-sim.log").read_text()
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
