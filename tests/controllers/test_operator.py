"""The real Kopf operator against the emulated API server (kmock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.controllers.fakecluster import make_object
from tests.controllers.kmockenv import Api, Kubelet, emulator, eventually, operator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as a:
        yield a


@pytest.fixture
async def kubelet(api: Api) -> AsyncIterator[Kubelet]:
    k = Kubelet(api)
    task = asyncio.create_task(k.run())
    try:
        yield k
    finally:
        task.cancel()
        with __import__("contextlib").suppress(asyncio.CancelledError):
            await task


def status_of(api: Api, name: str = "llama") -> dict[str, Any]:
    mi = api.modelinfer(name)
    return (mi or {}).get("status") or {}


def converged(api: Api, replicas: int, name: str = "llama") -> bool:
    st = status_of(api, name)
    conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
    return (
        st.get("readyReplicas") == replicas
        and st.get("updatedReplicas") == replicas
        and conds.get("Progressing") == "False"
    )


def env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


async def test_create_makes_pods_services_env_and_status(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=2))
        await eventually(lambda: converged(api, 2), what="2 ready groups")
    events = api.objects("v1/events")
    assert any(e.get("reason") == "CreatingGroups" for e in events.values()), events
    pods = api.pods()
    assert sorted(pods) == sorted(
        f"llama-{g}-{r}"
        for g in (0, 1)
        for r in ("prefill-0-0", "prefill-0-1", "decode-0-0", "decode-1-0")
    )
    assert sorted(api.services()) == ["llama-0-prefill-0", "llama-1-prefill-0"]
    w = pods["llama-0-prefill-0-1"]
    assert env(w)["ENTRY_ADDRESS"] == "llama-0-prefill-0-0.llama-0-prefill-0.ns.svc"
    assert env(w)["WORKER_INDEX"] == "1" and env(w)["GROUP_SIZE"] == "2"
    assert w["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    st = status_of(api)
    assert st["replicas"] == 2 and st["observedGeneration"] == 1
    assert st["labelSelector"].startswith("workload.matrixinfer.ai/model-infer=llama")
    mi = api.modelinfer("llama")
    assert mi is not None
    assert "workload.matrixinfer.ai/finalizer" in mi["metadata"].get("finalizers", [])
    assert len(api.objects("apps/v1/controllerrevisions")) == 1
