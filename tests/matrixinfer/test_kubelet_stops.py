"""A deleted pod is stopped beside the local kubelet's passes, not inside them: while a pod
that ignores SIGTERM waits out its grace, the next passes still start new pods; several
deleted pods are stopped at once (each killed after its grace, then said stopped); the
kubelet's end kills the pods still being stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from matrixinfer.kubelet import LocalKubelet
from matrixinfer.testing.kube import Api, emulator

pytestmark = pytest.mark.timeout(120)

STUBBORN = "trap '' TERM; while true; do sleep 0.1; done"  # exits only on SIGKILL


def _pod(name: str, script: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"containers": [{"name": "engine", "command": ["sh", "-c", script]}]},
    }


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as api:
        yield api


async def _until(kubelet: LocalKubelet, check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await kubelet.sync()
        await asyncio.sleep(0.05)


async def test_a_pod_slow_to_stop_holds_up_no_other_pod(api: Api, tmp_path: Path) -> None:
    said: list[str] = []
    kubelet = LocalKubelet(
        api.url, lambda: list(api.pods().values()), tmp_path / "run",
        first_host="127.0.0.230", say=said.append, stop_grace=30.0,
    )  # fmt: skip
    kubelet.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    try:
        for name in ("a", "b"):
            await api.request("POST", "/api/v1/namespaces/ns/pods", _pod(name, STUBBORN))
        await _until(kubelet, lambda: len(kubelet.pods) == 2, "pods a and b to start")
        procs = [p for local in kubelet.pods.values() for p in local.all_procs()]
        await asyncio.sleep(0.3)  # the shells set their trap
        for name in ("a", "b"):
            await api.request("DELETE", f"/api/v1/namespaces/ns/pods/{name}")
        await api.request("POST", "/api/v1/namespaces/ns/pods", _pod("c", "sleep 600"))
        # the passes go on while a and b wait out their 30 s grace: c starts meanwhile
        await _until(kubelet, lambda: any(k[1] == "c" for k in kubelet.pods), "pod c to start")
        assert all(p.poll() is None for p in procs), "a and b were stopped before c started"
        assert {k[1] for k in kubelet.stopping} == {"a", "b"}
        assert not any("deleted, process stopped" in line for line in said)
        for task in list(kubelet._stop_tasks):
            task.cancel()
        kubelet.stop_all(grace=0.0)  # the kubelet's end kills the pods being stopped too
        assert all(p.poll() is not None for p in procs)
    finally:
        kubelet.stop_all(grace=0.0)
        await kubelet.session.close()


async def test_deleted_pods_stop_together(api: Api, tmp_path: Path) -> None:
    said: list[str] = []
    kubelet = LocalKubelet(
        api.url, lambda: list(api.pods().values()), tmp_path / "run",
        first_host="127.0.0.240", say=said.append, stop_grace=2.0,
    )  # fmt: skip
    kubelet.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    names = ("a", "b", "c")
    try:
        for name in names:
            await api.request("POST", "/api/v1/namespaces/ns/pods", _pod(name, STUBBORN))
        await _until(kubelet, lambda: len(kubelet.pods) == 3, "three pods to start")
        await asyncio.sleep(0.3)
        for name in names:
            await api.request("DELETE", f"/api/v1/namespaces/ns/pods/{name}")
        await kubelet.sync()  # one pass hands all three to their stop tasks, waits for none
        assert {k[1] for k in kubelet.stopping} == set(names)
        tasks = list(kubelet._stop_tasks)
        assert len(tasks) == 3
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        stopped = [line for line in said if "deleted, process stopped" in line]
        assert sorted(stopped) == [f"pod {n}: deleted, process stopped" for n in names]
        assert kubelet.stopping == {} and kubelet.addresses.taken == set()
    finally:
        kubelet.stop_all(grace=0.0)
        await kubelet.session.close()
