"""A failing container restarts in place with Kubernetes' back-off instead of failing its pod
over and over: the local kubelet, driven pass by pass (``sync``) on an injected clock, keeps a
pod whose init container fails Pending in ``Init:CrashLoopBackOff`` and restarts the container
only when its back-off (10 s, 20 s, ...) is over, saying a repeated failure once with its count;
an engine that exits restarts alone and the pod turns Ready again; ``restartPolicy: Never``
fails the pod as before."""

from __future__ import annotations

import asyncio
import copy
import datetime
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from matrixinfer.get import table
from matrixinfer.kubelet import LocalKubelet, restart_delay, should_restart
from matrixinfer.testing.kube import Api, emulator
from tests.matrixinfer.test_kubelet_engine import ENGINE
from tests.matrixinfer.test_kubelet_volumes import POD

pytestmark = pytest.mark.timeout(120)
NOW = datetime.datetime.now(tz=datetime.UTC)


def test_restart_delay_doubles_from_10s_to_a_5_minute_cap() -> None:
    assert [restart_delay(n) for n in range(1, 9)] == [10, 20, 40, 80, 160, 300, 300, 300]
    assert restart_delay(3, base=0.5, cap=1.5) == 1.5
    assert restart_delay(10_000) == 300
    with pytest.raises(ValueError, match="failures must be >= 1, got 0"):
        restart_delay(0)
    assert should_restart("Always", 0) and should_restart("Always", 1)
    assert should_restart("OnFailure", 2) and not should_restart("OnFailure", 0)
    assert not should_restart("Never", 1)


def _failing_init_pod(policy: str | None = None) -> dict[str, Any]:
    """The volumes test's pod without its sidecar and ConfigMap volume, the downloader given a
    claim that does not exist: it exits with code 4."""
    pod = copy.deepcopy(POD)
    spec = pod["spec"]
    spec["initContainers"][0]["args"][0] = "pvc://no-such-claim/weights"
    spec["containers"] = spec["containers"][:1]
    spec["volumes"] = [v for v in spec["volumes"] if "configMap" not in v]
    if policy is not None:
        pod["spec"]["restartPolicy"] = policy
    return pod


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _until(kubelet: LocalKubelet, check: Callable[[], bool], what: str) -> None:
    """Run the kubelet's passes until ``check`` holds (processes run for real meanwhile)."""
    deadline = time.monotonic() + 60  # real time: the processes run for real
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await kubelet.sync()
        await asyncio.sleep(0.05)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as api:
        yield api


async def _kubelet(api: Api, tmp_path: Path, said: list[str], clock: Clock) -> LocalKubelet:
    kubelet = LocalKubelet(
        api.url, lambda: list(api.pods().values()), tmp_path / "run",
        first_host="127.0.0.220", say=said.append, clock=clock,
    )  # fmt: skip
    kubelet.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    return kubelet


def _status(api: Api) -> dict[str, Any]:
    return dict(api.pods()["p"].get("status") or {})


async def test_a_failing_init_container_restarts_with_back_off(api: Api, tmp_path: Path) -> None:
    said: list[str] = []
    clock = Clock()
    kubelet = await _kubelet(api, tmp_path, said, clock)
    try:
        await api.request("POST", "/api/v1/namespaces/ns/pods", _failing_init_pod())
        not_found = "pvc://no-such-claim/weights: not found"

        def failures() -> list[str]:
            return [x for x in said if "download" in x and ("exited" in x or "again" in x)]

        await _until(kubelet, lambda: len(failures()) == 1, "the first failure")
        assert not_found in failures()[0] and "exited with code 4" in failures()[0]
        assert failures()[0].endswith("restarting in 10s (CrashLoopBackOff, restart 1)")
        status = _status(api)
        [init] = status["initContainerStatuses"]
        assert status["phase"] == "Pending"  # not Failed: nothing recreates the pod
        assert init["restartCount"] == 0
        assert init["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert init["state"]["waiting"]["message"].startswith("back-off 10s restarting failed")
        assert init["lastState"]["terminated"]["exitCode"] == 4
        assert not_found in init["lastState"]["terminated"]["message"]
        assert table("pods", [api.pods()["p"]], NOW).splitlines()[1].split()[3] == (
            "Init:CrashLoopBackOff"
        )
        [local] = kubelet.pods.values()
        for _ in range(5):  # the back-off is not over: no restart, however many passes
            await kubelet.sync()
        assert local.init_proc is None and local.restarts == {}

        clock.now += 10  # the back-off is over: it restarts, fails again, is said briefly
        await _until(kubelet, lambda: len(failures()) == 2, "the second failure")
        assert failures()[1] == (
            "pod p: download failed again the same way (2 times in a row); "
            "restarting in 20s (CrashLoopBackOff, restart 2)"
        )
        [init] = _status(api)["initContainerStatuses"]
        assert init["restartCount"] == 1 and "back-off 20s" in init["state"]["waiting"]["message"]
        clock.now += 19
        for _ in range(5):
            await kubelet.sync()
        assert local.restarts == {"download": 1}  # 19 s of 20: still waiting
        clock.now += 1
        await _until(kubelet, lambda: len(failures()) == 3, "the third failure")
        assert failures()[2].endswith("(3 times in a row); restarting in 40s "
                                      "(CrashLoopBackOff, restart 3)")  # fmt: skip
        assert sum(not_found in x for x in said) == 1  # the whole text once
        log = (tmp_path / "run" / "pod-ns-p.log").read_text()
        assert "init container download (restart 2):" in log
        assert _status(api)["phase"] == "Pending" and list(api.pods()) == ["p"]
    finally:
        kubelet.stop_all()
        assert kubelet.session is not None
        await kubelet.session.close()


async def test_restart_policy_never_fails_the_pod(api: Api, tmp_path: Path) -> None:
    said: list[str] = []
    kubelet = await _kubelet(api, tmp_path, said, Clock())
    try:
        await api.request("POST", "/api/v1/namespaces/ns/pods", _failing_init_pod("Never"))
        await _until(kubelet, lambda: _status(api).get("phase") == "Failed", "the pod Failed")
        assert _status(api)["reason"] == "InitContainerFailed"
        assert "pvc://no-such-claim/weights: not found" in _status(api)["message"]
        assert any(x.endswith("; pod Failed") for x in said)
    finally:
        kubelet.stop_all()
        assert kubelet.session is not None
        await kubelet.session.close()


FLAKY = ENGINE.replace(
    "argv = sys.argv",
    "argv = sys.argv\n"
    "import pathlib\n"
    "runs = pathlib.Path(argv[argv.index('--runs') + 1])\n"
    "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
    "if len(runs.read_text()) == 1:\n"
    "    print('engine: out of memory', flush=True)\n"
    "    sys.exit(3)\n",
)


async def test_an_exiting_engine_restarts_and_the_pod_turns_ready(api: Api, tmp_path: Path) -> None:
    script = tmp_path / "flaky-engine"
    script.write_text(FLAKY)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    runs = tmp_path / "runs"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-p"},
        "spec": {"containers": [
            {"name": "engine", "command": [str(script)],
             "args": ["--host", "0.0.0.0", "--port", "8000", "--runs", str(runs)],
             "ports": [{"containerPort": 8000}]},
        ]},
    }  # fmt: skip
    said: list[str] = []
    clock = Clock()
    kubelet = await _kubelet(api, tmp_path, said, clock)
    try:
        await api.request("POST", "/api/v1/namespaces/ns/pods", pod)
        await _until(kubelet, lambda: any("exited with code 3" in x for x in said), "the exit")
        line = next(x for x in said if "exited with code 3" in x)
        assert line == (
            "pod p: container engine exited with code 3: engine: out of memory; "
            "restarting in 10s (CrashLoopBackOff, restart 1)"
        )
        status = _status(api)
        [engine] = status["containerStatuses"]
        assert status["phase"] == "Running" and engine["ready"] is False
        assert engine["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert (
            table("pods", [api.pods()["p"]], NOW).splitlines()[1].split()[3] == "CrashLoopBackOff"
        )
        clock.now += 10
        await _until(kubelet, lambda: any(x.startswith("pod p: ready") for x in said), "Ready")
        [engine] = _status(api)["containerStatuses"]
        assert engine["ready"] is True and engine["restartCount"] == 1
        assert "running" in engine["state"]
        assert engine["lastState"]["terminated"]["exitCode"] == 3
        assert runs.read_text() == "xx"
    finally:
        kubelet.stop_all()
        assert kubelet.session is not None
        await kubelet.session.close()
