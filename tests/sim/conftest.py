"""Start real simulator processes on loopback for the HTTP tests."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.process import Child, free_port, http_ok
from sim.fleet import SimPod, sim_argv

MODEL = "demo-model"

SimFactory = Callable[..., AbstractContextManager[SimPod]]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def run_sim(
    *args: str,
    log_dir: Path,
    host: str = "127.0.0.1",
    name: str = "sim-test",
    wait_health: bool = True,
) -> Iterator[SimPod]:
    pod = SimPod(name, host, free_port(host))
    ready: Callable[[], bool] = (
        (lambda: http_ok(f"{pod.url}/health", timeout=0.5))
        if wait_health
        else (lambda: port_open(pod.host, pod.port))
    )
    child = Child(
        name,
        sim_argv(pod, MODEL, args),
        log_path=log_dir / f"{name}-{pod.port}.log",
        ready=ready,
        ready_timeout=30,
    )
    child.start()
    try:
        yield pod
    finally:
        child.stop()


@pytest.fixture
def sim_factory(logdir: Path) -> SimFactory:
    """``with sim_factory("--flag", ...) as pod:`` starts a sim and stops it afterwards."""

    def make(*args: str, **kw: Any) -> AbstractContextManager[SimPod]:
        return run_sim(*args, log_dir=logdir, **kw)

    return make


@pytest.fixture(scope="module")
def shared_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimPod]:
    """One sim for read-mostly tests (fast time scale, LoRA modules preloaded)."""
    d = tmp_path_factory.mktemp("simlogs")
    with run_sim(
        "--time-scale", "0.05", "--lora-modules", "preloaded=/adapters/pre",
        log_dir=d, name="sim-shared",
    ) as pod:  # fmt: skip
        yield pod


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(url: str, body: Any, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    rq = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(rq, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metrics(pod: SimPod) -> dict[str, Any]:
    """name -> family, parsed with prometheus_client's own text parser."""
    status, _, body = get(f"{pod.url}/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample(fams: dict[str, Any], sample_name: str, **labels: str) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{sample_name} {labels} not exposed")


def state(pod: SimPod) -> dict[str, Any]:
    status, _, body = get(f"{pod.url}/sim/state")
    assert status == 200
    return dict(json.loads(body))
