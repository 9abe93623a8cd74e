"""Several extproc processes behind one Envoy (StackOptions.extproc_processes): Envoy's
least-request ext_proc cluster spreads the requests over both and every request is routed."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from sim.fleet import Fleet
from tests.extproc.conftest import start_stack
from tests.extproc.test_gateway_e2e import chat

pytestmark = pytest.mark.timeout(90)


def decisions(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("matrixinfer_gateway_pod_picks_total{")
    )


def test_two_extproc_processes_share_the_requests(
    tmp_path: Path, config_dir: Path, fleet: Fleet
) -> None:
    stack = start_stack(config_dir, tmp_path / "run", fleet, extproc_processes=2)
    try:
        assert len(stack.extprocs) == 2 and all(c.running() for c in stack.extprocs)
        with urllib.request.urlopen(f"{stack.admin_url}/clusters?format=json", timeout=10) as r:
            clusters = json.loads(r.read())["cluster_statuses"]
        extproc_hosts = {
            h["address"]["socket_address"]["port_value"]
            for c in clusters
            if c["name"] == "matrixinfer_extproc"
            for h in c.get("host_statuses", [])
        }
        assert extproc_hosts == set(stack.grpc_ports)
        pods = {p.name for p in fleet.pods}
        client = OpenAI(base_url=stack.url, api_key="unused", max_retries=0, timeout=20)
        try:
            # concurrent requests: least-request sends new streams to the less busy process
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                served = list(pool.map(lambda _: chat(client)[0], range(64)))
        finally:
            client.close()
        assert set(served) <= pods
        per_process = [decisions(port) for port in stack.http_ports]
        assert sum(per_process) == 64, per_process
        assert min(per_process) > 0, f"one process routed nothing: {per_process}"
    finally:
        stack.stop()
    assert not any(c.running() for c in stack.extprocs)
