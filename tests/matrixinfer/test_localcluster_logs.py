"""What the local cluster serves for the console: a local pod's log (``GET .../pods/<name>/log``)
from the file its process writes, with ``tailLines`` and ``follow`` (until the process ends), and
the Node with simulated GPUs. The pod here is a real process (a shell writing lines); the kubelet
is its record, as the local kubelet keeps it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import pytest

from matrixinfer.localcluster import LOCAL_NODE, LocalCluster, LocalOptions


@dataclass
class FakePod:
    """What the log endpoint reads of the kubelet's pod record (matrixinfer.kubelet.LocalPod)."""

    log_path: Path
    proc: subprocess.Popen[bytes]
    failed: bool = False

    def all_procs(self) -> list[subprocess.Popen[bytes]]:
        return [self.proc]


@dataclass
class FakeKubelet:
    pods: dict[tuple[str, str, str], FakePod] = field(default_factory=dict)


@dataclass
class Request:
    namespace: str
    name: str
    params: dict[str, str]


def _cluster(tmp_path: Path, script: str) -> tuple[LocalCluster, FakePod]:
    log = tmp_path / "pod-default-p.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-u", "-c", script], stdout=out)
    pod = FakePod(log, proc)
    cluster = LocalCluster(LocalOptions(config_dir=tmp_path, run_dir=tmp_path))
    cluster.kubelet = FakeKubelet({("default", "p", "uid-p"): pod})  # type: ignore[assignment]
    return cluster, pod


async def _read(source: Any) -> bytes:
    return b"".join([chunk async for chunk in source])


async def test_the_log_is_the_process_output_and_tail_lines_cut_it(tmp_path: Path) -> None:
    cluster, pod = _cluster(tmp_path, "print('one'); print('two'); print('three')")
    pod.proc.wait(30)
    whole = await _read(cluster._pod_log(Request("default", "p", {})))
    assert whole == b"one\ntwo\nthree\n"
    tail = await _read(cluster._pod_log(Request("default", "p", {"tailLines": "2"})))
    assert tail == b"two\nthree\n"
    assert await _read(cluster._pod_log(Request("default", "p", {"tailLines": "0"}))) == b""


async def test_a_followed_log_grows_until_the_process_ends(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (
        "import os, time\nprint('line 0')\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\nprint('line 1')"
    )
    cluster, pod = _cluster(tmp_path, script)
    try:
        stream = cluster._pod_log(Request("default", "p", {"follow": "true"}))
        assert await anext(stream) == b"line 0\n"  # sent while the process still runs
        assert pod.proc.poll() is None
        go.touch()
        assert b"".join([c async for c in stream]) == b"line 1\n"  # the rest; ends with it
        assert pod.proc.poll() is not None
    finally:
        go.touch()  # the process ends whatever failed
        pod.proc.wait(30)


async def test_unknown_pods_and_bad_tail_lines_are_refused(tmp_path: Path) -> None:
    cluster, pod = _cluster(tmp_path, "print('x')")
    pod.proc.wait(30)
    with pytest.raises(kmock.KubernetesObjectNotFoundError, match="no process"):
        cluster._pod_log(Request("default", "other", {}))
    with pytest.raises(kmock.KubernetesError) as err:
        cluster._pod_log(Request("default", "p", {"tailLines": "many"}))
    assert err.value.status == 400 and "tailLines" in str(err.value.message)


def test_the_local_node_offers_gpus_by_label() -> None:
    labels = LOCAL_NODE["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert LOCAL_NODE["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert LocalOptions(config_dir=Path("."), run_dir=Path(".")).node == LOCAL_NODE
