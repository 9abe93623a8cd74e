"""The gateway fed from the (emulated) Kubernetes API: the extproc process and the ADS server both
watch ModelRoute / ModelServer / Pods / the extproc Service; a real Envoy in front."""

from __future__ import annotations

import asyncio
import functools
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from matrixinfer.process import Child, free_port, http_ok
from sim.fleet import Fleet
from tests.xds.conftest import Envoy, ads_envoy, get_json
from tests.xds.kube import (
    NS,
    CuttableProxy,
    create_pod,
    create_route,
    create_server,
    create_service,
    kube,
    kube_xds_app,
    set_pod_ready,
)
from tests.xds.test_ads_envoy import PUSH_DEADLINE, until

pytestmark = pytest.mark.timeout(120)


async def served_by(session: aiohttp.ClientSession, url: str, model: str = "demo-model") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, (resp.status, text)
        return resp.headers.get("x-inference-pod", "")


def pod_ready(state: dict[str, Any], name: str) -> bool | None:
    for pod in state.get("pods", []):
        if pod["name"] == f"{NS}/{name}":  # Kubernetes pods are named namespace/name
            return bool(pod["ready"])
    return None


async def test_kubernetes_source_end_to_end(tmp_path: Path, fleet: Fleet) -> None:
    sim0, sim1 = fleet.pods
    async with kube() as api:
        grpc_port, http_port, listen_port = free_port(), free_port(), free_port()
        for pod in fleet.pods:
            await create_pod(api, pod.name, pod.host, {"app": "sim"})
        await create_pod(api, "unselected", "127.0.0.99", {"app": "other"})
        await create_server(api, "pool", {"app": "sim"}, fleet.port)
        await create_route(api, "demo", "demo-model", ["pool"])
        await create_service(api, "matrixinfer-extproc", {"app": "extproc"}, grpc_port)
        await create_pod(api, "extproc-0", "127.0.0.1", {"app": "extproc"})

        parsed = urllib.parse.urlparse(api.url)
        proxy = CuttableProxy(parsed.hostname or "127.0.0.1", parsed.port or 80)
        await proxy.start()
        extproc = Child(
            "extproc",
            [
                sys.executable,
                "-m",
                "extproc.main",
                "--source",
                "kubernetes",
                "--server",
                proxy.url,
                "--namespace",
                "ns",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--debug-state",
            ],
            log_path=tmp_path / "extproc.log",
            ready=functools.partial(http_ok, f"http://127.0.0.1:{http_port}/readyz"),
        )
        state_url = f"http://127.0.0.1:{http_port}/debug/state"
        app = kube_xds_app(api, grpc_port, listen_port)
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        envoy: Envoy | None = None
        try:
            await asyncio.to_thread(extproc.start)
            await until(lambda: app.bound_port, PUSH_DEADLINE, "ADS server up")
            await until(
                lambda: app.ads.cache.versions().get("LDS"), PUSH_DEADLINE, "first generated set"
            )
            child, admin = ads_envoy(tmp_path, app.bound_port)
            envoy = Envoy(child, admin, listen_port)
            await asyncio.to_thread(child.start)

            # the generated clusters: pods selected by the ModelServer, the extproc Service's pod
            eds = envoy.config_dump("dynamic_active_clusters")
            assert {c["cluster"]["name"] for c in eds} >= {"matrixinfer_pods"}
            clusters = get_json(f"{envoy.admin}/clusters?format=json")["cluster_statuses"]
            hosts = {
                c["name"]: sorted(
                    f"{h['address']['socket_address']['address']}:"
                    f"{h['address']['socket_address']['port_value']}"
                    for h in c.get("host_statuses", [])
                )
                for c in clusters
            }
            assert hosts["matrixinfer_pods"] == sorted(p.address for p in fleet.pods)
            assert hosts["matrixinfer_extproc"] == [f"127.0.0.1:{grpc_port}"]

            # ModelServer + pods -> requests route to both pods
            async with aiohttp.ClientSession() as session:
                seen = {await served_by(session, envoy.url) for _ in range(12)}
                assert seen == {sim0.name, sim1.name}

                # a pod turning not-ready leaves the rotation
                await set_pod_ready(api, sim1.name, sim1.host, False)
                await until(
                    lambda: pod_ready(get_json(state_url), sim1.name) is False,
                    PUSH_DEADLINE,
                    "sim-1 not ready",
                )
                seen = {await served_by(session, envoy.url) for _ in range(10)}
                assert seen == {sim0.name}

                # a ModelRoute (and its ModelServer) created in the API reaches Envoy
                await create_server(api, "pool-b", {"app": "sim"}, fleet.port)
                await create_route(api, "model-b", "model-b", ["pool-b"])
                await until(
                    lambda: "modelserver/ns/pool-b" in envoy.route_names(),
                    PUSH_DEADLINE,
                    "route in Envoy",
                )
                await until(
                    lambda: any(
                        r["modelName"] == "model-b" for r in get_json(state_url)["modelRoutes"]
                    ),
                    PUSH_DEADLINE,
                    "route in the extproc",
                )
                assert await served_by(session, envoy.url, "model-b") == sim0.name

                # a dropped watch: the extproc's API connections are cut, a pod becomes ready
                # again meanwhile; after the connection returns the resync finds it
                proxy.cut()
                await set_pod_ready(api, sim1.name, sim1.host, True)
                await asyncio.sleep(0.3)  # the extproc is disconnected for a while
                assert pod_ready(get_json(state_url), sim1.name) is False
                proxy.resume()
                await until(
                    lambda: pod_ready(get_json(state_url), sim1.name) is True,
                    PUSH_DEADLINE,
                    "resync",
                )
                seen = {await served_by(session, envoy.url) for _ in range(12)}
                assert seen == {sim0.name, sim1.name}
            assert child.pid is not None and child.running()
        finally:
            if envoy is not None:
                await asyncio.to_thread(envoy.child.stop)
            await asyncio.to_thread(extproc.stop)
            stop.set()
            await asyncio.wait_for(task, 10)
            await proxy.stop()
