"""Fixtures: simulator pods, the extproc on a config directory, the ADS server in-process (so the
tests can inspect it and inject resources) and real Envoys bootstrapped against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controllers.xds.main import XdsApp, parse_args
from matrixinfer.envoy_config import AdsBootstrap, render_ads_bootstrap
from matrixinfer.process import Child, envoy_child, free_port, http_ok
from sim.fleet import Fleet
from tests.conftest import E2E_MESSAGE_TIMEOUT_MS, sim_fleet

ROUTES = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: pool}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  trafficPolicy:
    retry: {attempts: 1, retryOn: [connect-failure]}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: demo}
spec:
  modelName: demo-model
  rules: [{targets: [{modelServerName: pool}]}]
"""


def endpoints_yaml(fleet: Fleet) -> str:
    rows = "".join(
        f"  - {{name: {p.name}, address: '{p.address}', labels: {{app: sim}}}}\n"
        for p in fleet.pods
    )
    return (
        "apiVersion: gateway.matrixinfer.ai/v1alpha1\nkind: Endpoints\n"
        f"metadata: {{name: sims}}\nspec:\n  endpoints:\n{rows}"
    )


@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sim_fleet(tmp_path_factory, "127.0.0.80", 2, "--time-scale", "0.01", logs="xds-sims") as f:
        yield f


def ads_envoy(
    directory: Path, xds_port: int, name: str = "envoy", node_id: str = "matrixinfer-gateway"
) -> tuple[Child, int]:
    """An Envoy (one worker) bootstrapped against the ADS server on ``xds_port``, not started,
    and its admin port."""
    admin = free_port()
    bootstrap = directory / f"{name}.yaml"
    bootstrap.write_text(
        render_ads_bootstrap(AdsBootstrap(admin_port=admin, xds_port=xds_port, node_id=node_id))
    )
    return envoy_child(name, bootstrap, admin, directory / f"{name}.log", concurrency=1), admin


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@dataclass
class Envoy:
    child: Child
    admin_port: int
    listen_port: int

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def config_dump(self, resource: str) -> list[dict[str, Any]]:
        data = get_json(f"{self.admin}/config_dump?resource={resource}")
        return list(data.get("configs", []))

    def route_names(self) -> set[str]:
        out: set[str] = set()
        for cfg in self.config_dump("dynamic_route_configs"):
            for vhost in cfg["route_config"].get("virtual_hosts", []):
                out.update(r.get("name", "") for r in vhost.get("routes", []))
        return out


@dataclass
class Gateway:
    config_dir: Path
    app: XdsApp
    extproc: Child
    envoys: list[Envoy] = field(default_factory=list)

    def nacks(self) -> float:
        metric = self.app.ads.metrics.nacks
        return sum(
            s.value
            for fam in metric.collect()
            for s in fam.samples
            if s.name == "matrixinfer_xds_nacks_total"
        )


async def chat(session: aiohttp.ClientSession, url: str, model: str = "demo-model") -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


@contextlib.asynccontextmanager
async def gateway(tmp: Path, fleet: Fleet, nodes: int = 1) -> AsyncIterator[Gateway]:
    config = tmp / "config"
    config.mkdir()
    (config / "routes.yaml").write_text(ROUTES)
    (config / "endpoints.yaml").write_text(endpoints_yaml(fleet))
    grpc_port, http_port = free_port(), free_port()
    extproc = Child(
        "extproc",
        [
            sys.executable,
            "-m",
            "extproc.main",
            "--config",
            str(config),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--config-poll",
            "0.1",
        ],
        log_path=tmp / "extproc.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{http_port}/readyz"),
    )
    listen_port = free_port()
    args = parse_args(
        [
            "--config",
            str(config),
            "--config-poll",
            "0.1",
            "--port",
            "0",
            "--extproc",
            f"127.0.0.1:{grpc_port}",
            "--listen-port",
            str(listen_port),
            "--debounce",
            "0.02",
            "--message-timeout",
            f"{E2E_MESSAGE_TIMEOUT_MS}ms",
        ]
    )
    app = XdsApp(args)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    gw = Gateway(config, app, extproc)
    try:
        await asyncio.to_thread(extproc.start)
        for _ in range(600):  # up to 30 s: a loaded CI machine starts things slowly
            if app.bound_port:
                break
            await asyncio.sleep(0.05)
        assert app.bound_port, "the ADS server did not start"
        for i in range(nodes):
            child, admin = ads_envoy(tmp, app.bound_port, f"envoy-{i}", f"node-{i}")
            gw.envoys.append(Envoy(child, admin, listen_port))
            await asyncio.to_thread(child.start)
        yield gw
    finally:
        for envoy in gw.envoys:
            await asyncio.to_thread(envoy.child.stop)
        await asyncio.to_thread(extproc.stop)
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
