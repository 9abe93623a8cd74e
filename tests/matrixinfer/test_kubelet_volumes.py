"""The local kubelet against the emulated API server (no operator): a pod waits for the
ConfigMap its volume names, then runs its init container and its containers with their volumes
as local directories, and a changed ConfigMap reaches the running sidecar through the file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from matrixinfer.kubelet import LocalKubelet
from matrixinfer.testing.kube import Api, emulator, eventually

pytestmark = pytest.mark.timeout(120)


def _adapters(*names: str) -> dict[str, Any]:
    text = "".join(f"- name: {n}\n  uri: pvc://weights/{n}\n" for n in names)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "adapters", "namespace": "ns"},
            "data": {"adapters.yaml": text}}  # fmt: skip


POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "p", "namespace": "ns", "uid": "uid-p"},
    "spec": {
        "initContainers": [
            {"name": "download", "command": ["matrixinfer-downloader"],
             "args": ["pvc://weights/base", "--cache", "/cache", "--pvc-root", "/mnt/pvc"],
             "volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                              {"name": "weights", "mountPath": "/mnt/pvc/weights"}]},
        ],
        "containers": [
            {"name": "engine", "command": ["vllm", "serve", "/mnt/pvc/weights/base"],
             "args": ["--served-model-name", "base", "--port", "8000"],
             "ports": [{"containerPort": 8000}]},
            {"name": "runtime", "command": ["matrixinfer-runtime"],
             "args": ["--engine-url", "http://127.0.0.1:8000", "--port", "8100",
                      "--pvc-root", "/mnt/pvc", "--cache", "/cache", "--sync-interval", "300ms",
                      "--lora-adapters", "/etc/lora/adapters.yaml"],
             "ports": [{"name": "runtime", "containerPort": 8100}],
             "readinessProbe": {"httpGet": {"path": "/ready", "port": "runtime"}},
             "volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                              {"name": "weights", "mountPath": "/mnt/pvc/weights"},
                              {"name": "lora", "mountPath": "/etc/lora"}]},
        ],
        "volumes": [
            {"name": "cache", "emptyDir": {}},
            {"name": "weights", "persistentVolumeClaim": {"claimName": "weights"}},
            {"name": "lora", "configMap": {"name": "adapters"}},
        ],
    },
}  # fmt: skip


async def _loaded(session: aiohttp.ClientSession, ip: str) -> list[str]:
    async with session.get(f"http://{ip}:8100/v1/lora_adapters") as r:
        return [a["name"] for a in (await r.json())["adapters"]]


async def test_a_pod_waits_for_its_config_map_then_runs_and_follows_it(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    for name in ("base", "a", "b"):
        (claims / "weights" / name).mkdir(parents=True)
        (claims / "weights" / name / "config.json").write_text(json.dumps({"name": name}))
    said: list[str] = []
    async with emulator() as api:
        kubelet = LocalKubelet(
            api.url, lambda: list(api.pods().values()), tmp_path / "run",
            config_maps=lambda: list(api.objects("v1/configmaps").values()),
            claims=claims, first_host="127.0.0.190", say=said.append,
        )  # fmt: skip
        task = asyncio.create_task(kubelet.run())
        try:
            await _run(api, kubelet, said)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def _run(api: Api, kubelet: LocalKubelet, said: list[str]) -> None:
    await api.request("POST", "/api/v1/namespaces/ns/pods", POD)
    await eventually(lambda: "pod p: waiting: ConfigMap ns/adapters not found" in said, 10)
    await asyncio.sleep(0.5)
    assert not (api.pods()["p"].get("status") or {}).get("phase")  # no process yet
    await api.request("POST", "/api/v1/namespaces/ns/configmaps", _adapters("a"))

    def ready() -> bool:
        status = api.pods()["p"].get("status") or {}
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in status.get("conditions") or ())  # fmt: skip

    await eventually(ready, 60, "the pod to be Ready")
    status = api.pods()["p"]["status"]
    ip = status["podIP"]
    assert status["phase"] == "Running"
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert [c["name"] for c in status["containerStatuses"]] == ["engine", "runtime"]
    assert any(line.startswith("pod p: init container download started") for line in said)
    async with aiohttp.ClientSession() as session:
        assert await _loaded(session, ip) == ["a"]  # the sidecar read the ConfigMap's file
        # the ConfigMap changes: the kubelet rewrites the file, the sidecar follows it
        await api.request("PATCH", "/api/v1/namespaces/ns/configmaps/adapters",
                          {"data": _adapters("b")["data"]})  # fmt: skip
        deadline = asyncio.get_running_loop().time() + 30
        while await _loaded(session, ip) != ["b"]:
            assert asyncio.get_running_loop().time() < deadline, await _loaded(session, ip)
            await asyncio.sleep(0.1)
    [directory] = (kubelet.state_dir / "pods").iterdir()
    assert (directory / "volumes/lora/adapters.yaml").read_text() == _adapters("b")["data"][
        "adapters.yaml"
    ]
