"""Env key references on the local kubelet: a container whose ``secretKeyRef`` or
``configMapKeyRef`` names what the API does not hold is not created (the pod stays Pending with
``CreateContainerConfigError`` naming the Secret and key, in its status, its log and the
kubelet's lines), an ``optional`` one is skipped, and once the configuration directory's Secret
is applied (``stringData`` stored base64, as the API server does) the engine runs with the
values, ``$(VAR)`` expanded from them."""

from __future__ import annotations

import asyncio
import base64
import stat
from pathlib import Path
from typing import Any

import pytest

from matrixinfer.applier import CORE_KINDS, Applier, Key
from matrixinfer.kubelet import LocalKubelet
from matrixinfer.testing.kube import Api, emulator, eventually
from tests.matrixinfer.test_kubelet_engine import ENGINE, _get, _pod

pytestmark = pytest.mark.timeout(120)

CONFIG_MAP = """apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: ns}
data: {level: debug}
"""


def _secret(**string_data: str) -> str:
    data = ", ".join(f"{k}: {v}" for k, v in string_data.items())
    head = "apiVersion: v1\nkind: Secret\nmetadata: {name: hf, namespace: ns}\n"
    return head + f"stringData: {{{data}}}\n"


def _stored(api: Api) -> dict[Key, dict[str, Any]]:
    return {
        (kind, "ns", name): raw
        for kind, plural in CORE_KINDS.items()
        for name, raw in api.objects(f"v1/{plural}").items()
    }


def _waiting(api: Api) -> dict[str, Any]:
    status = api.pods()["p"].get("status") or {}
    return dict(status.get("containerStatuses", [{}])[0].get("state", {}).get("waiting") or {})


async def test_env_from_a_secret_waits_for_it_then_the_engine_runs_with_it(tmp_path: Path) -> None:
    script = tmp_path / "tiny-engine"
    script.write_text(ENGINE)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    args = ["--host", "0.0.0.0", "--port", "8000", "--token", "$(TOKEN)", "--level", "$(LEVEL)"]
    pod = _pod("p", [str(script)], args)
    pod["spec"]["containers"][0]["env"] += [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
        {"name": "EXTRA", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x",
                                                          "optional": True}}},
    ]  # fmt: skip
    config = tmp_path / "config"
    config.mkdir()
    (config / "settings.yaml").write_text(CONFIG_MAP)
    said: list[str] = []
    async with emulator() as api:
        kubelet = LocalKubelet(
            api.url, lambda: list(api.pods().values()), tmp_path / "run",
            config_maps=lambda: list(api.objects("v1/configmaps").values()),
            secrets=lambda: list(api.objects("v1/secrets").values()),
            first_host="127.0.0.210", say=said.append,
        )  # fmt: skip
        applier = Applier(config, api.url, lambda: _stored(api), api.k.next_version, said.append)
        assert (await applier.apply(api.session)).created == ["ConfigMap ns/settings"]
        task = asyncio.create_task(kubelet.run())
        try:
            await api.request("POST", "/api/v1/namespaces/ns/pods", pod)
            missing = 'CreateContainerConfigError: container engine: secret "hf" not found'
            await eventually(lambda: f"pod p: {missing}" in said, 10, "the missing Secret")
            await eventually(lambda: bool(_waiting(api)), 10, "the pod's waiting state")
            assert api.pods()["p"]["status"]["phase"] == "Pending"
            assert _waiting(api) == {
                "reason": "CreateContainerConfigError",
                "message": 'secret "hf" not found',
            }
            assert missing in (tmp_path / "run" / "pod-ns-p.log").read_text()
            assert not kubelet.pods  # no process

            # the Secret comes without the key: the message names the key
            (config / "secret.yaml").write_text(_secret(other="x"))
            await applier.apply(api.session)
            await eventually(
                lambda: _waiting(api).get("message") == "couldn't find key token in Secret ns/hf",
                10,
                "the missing key",
            )
            (config / "secret.yaml").write_text(_secret(token="s3cret"))
            assert (await applier.apply(api.session)).patched == ["Secret ns/hf"]
            stored = api.objects("v1/secrets")["hf"]
            assert stored["data"] == {"token": base64.b64encode(b"s3cret").decode()}
            assert "stringData" not in stored

            def ready() -> bool:
                status = api.pods()["p"].get("status") or {}
                return any(c["type"] == "Ready" and c["status"] == "True"
                           for c in status.get("conditions") or ())  # fmt: skip

            await eventually(ready, 60, "the pod Ready")
            ip = api.pods()["p"]["status"]["podIP"]
            answer = await asyncio.to_thread(_get, f"http://{ip}:8000/")
            assert answer["argv"][-4:] == ["--token", "s3cret", "--level", "debug"]
            [local] = kubelet.pods.values()
            proc_env = Path(f"/proc/{local.procs['engine'].pid}/environ")
            environ = (await asyncio.to_thread(proc_env.read_bytes)).split(b"\0")
            assert b"TOKEN=s3cret" in environ and b"LEVEL=debug" in environ
            assert not any(e.startswith(b"EXTRA=") for e in environ)  # optional, missing: unset
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
