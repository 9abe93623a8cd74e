"""Real Envoys bootstrapped against the ADS server (files source): config, live edits, NACKs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from google.protobuf import any_pb2

from controllers.xds.generate import CLUSTER, ROUTE_TYPE
from controllers.xds.protos import to_message
from sim.fleet import Fleet
from tests.xds.conftest import ROUTES, Gateway, chat, gateway

pytestmark = pytest.mark.timeout(90)

NEW_ROUTE = """---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: pool-b}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  trafficPolicy:
    timeout: 30s
    streamIdleTimeout: 45s
    retry: {attempts: 3, retryOn: [connect-failure, "503"]}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: model-b}
spec:
  modelName: model-b
  rules: [{targets: [{modelServerName: pool-b}]}]
"""


# a bound on a wait, not a latency claim (bench/xds_push.py measures how fast a push lands): a
# loaded CI machine is several times slower than a developer's, and a push has no other path
# into Envoy than the ADS stream, so any deadline proves the same thing
PUSH_DEADLINE = 30.0


async def until(check, within: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {within}s: {what} (last={last!r})")


@contextlib.asynccontextmanager
async def traffic(url: str) -> AsyncIterator[list[int]]:
    """Requests sent back to back for the duration of the block; their statuses."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def loop() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    statuses.append(await chat(session, url))
                except aiohttp.ClientError:
                    statuses.append(-1)

    task = asyncio.create_task(loop())
    try:
        yield statuses
    finally:
        stop.set()
        await task


def all_acked(gw: Gateway, nodes: int) -> bool:
    """Every stream of ``nodes`` Envoys has ACKed the current version of every type."""
    status = gw.app.ads.status()
    return len(status["streams"]) == nodes and all(
        versions["ackedVersion"] == status["versions"][t]
        for stream in status["streams"]
        for t, versions in stream["types"].items()
    )


async def test_envoys_get_generated_config_and_route(tmp_path: Path, fleet: Fleet) -> None:
    async with gateway(tmp_path, fleet, nodes=2) as gw:
        for envoy in gw.envoys:
            clusters = {c["cluster"]["name"] for c in envoy.config_dump("dynamic_active_clusters")}
            assert {"matrixinfer_pods", "matrixinfer_extproc"} <= clusters
            listeners = envoy.config_dump("dynamic_listeners")
            assert [x["name"] for x in listeners] == ["openai"]
            assert envoy.route_names() == {"grpc", "modelserver/default/pool", "default"}
        # an Envoy reports /ready once it has applied its routes; its RDS ACK may reach the server
        # a moment later (an inherent race, seen on a loaded machine): wait for the ACKs, then check
        for _ in range(int(PUSH_DEADLINE / 0.05)):
            if all_acked(gw, 2):
                break
            await asyncio.sleep(0.05)
        status = gw.app.ads.status()
        assert sorted(s["node"] for s in status["streams"]) == ["node-0", "node-1"]
        for stream in status["streams"]:
            for t, versions in stream["types"].items():
                assert versions["ackedVersion"] == status["versions"][t], (t, stream)
        async with aiohttp.ClientSession() as session:
            assert [await chat(session, gw.envoys[0].url) for _ in range(4)] == [200] * 4
        assert gw.nacks() == 0


async def test_route_file_edit_reaches_envoy_without_a_restart(
    tmp_path: Path, fleet: Fleet
) -> None:
    async with gateway(tmp_path, fleet) as gw:
        envoy = gw.envoys[0]
        pid = envoy.child.pid
        async with traffic(envoy.url) as statuses:
            await until(lambda: len(statuses) >= 3, 10, "traffic flowing")
            (gw.config_dir / "routes.yaml").write_text(ROUTES + NEW_ROUTE)
            await until(
                lambda: "modelserver/default/pool-b" in envoy.route_names(),
                PUSH_DEADLINE,
                "new route",
            )
            n = len(statuses)
            await until(lambda: len(statuses) >= n + 3, 10, "more traffic after the push")
        assert statuses and set(statuses) == {200}, statuses
        assert envoy.child.pid == pid and envoy.child.running()  # no restart
        # the ModelServer's trafficPolicy is on its route
        route = next(
            r
            for cfg in envoy.config_dump("dynamic_route_configs")
            for vh in cfg["route_config"]["virtual_hosts"]
            for r in vh["routes"]
            if r.get("name") == "modelserver/default/pool-b"
        )
        assert route["route"]["idle_timeout"] == "45s"
        policy = route["route"]["retry_policy"]
        assert policy["num_retries"] == 3 and policy["retriable_status_codes"] == [503]
        assert policy["per_try_idle_timeout"] == "30s"
        # the extproc polls the same directory itself: it may learn model-b after Envoy did
        deadline = time.monotonic() + PUSH_DEADLINE
        async with aiohttp.ClientSession() as session:
            status = await chat(session, envoy.url, "model-b")
            while status == 404 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                status = await chat(session, envoy.url, "model-b")
        assert status == 200


async def test_invalid_resource_is_nacked_and_old_config_serves(
    tmp_path: Path, fleet: Fleet
) -> None:
    async with gateway(tmp_path, fleet, nodes=2) as gw:
        envoy = gw.envoys[0]
        before = envoy.route_names()
        # two virtual hosts with the wildcard domain: schema-valid, rejected by Envoy
        vhost = {"domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {}}]}
        bad = {
            "@type": ROUTE_TYPE,
            "name": "openai",
            "virtual_hosts": [{"name": "a", **vhost}, {"name": "b", **vhost}],
        }
        packed = any_pb2.Any()
        packed.Pack(to_message(bad))
        async with traffic(envoy.url) as statuses:
            await until(lambda: len(statuses) >= 3, 10, "traffic flowing")
            gw.app.ads.cache.set_raw(ROUTE_TYPE, {"openai": packed})
            await until(
                lambda: gw.nacks() >= 2, PUSH_DEADLINE, "both nodes NACK the route configuration"
            )
            n = len(statuses)
            await until(lambda: len(statuses) >= n + 3, 10, "traffic after the NACK")
        assert set(statuses) == {200}, statuses
        assert envoy.route_names() == before
        errors = [s["types"]["RDS"]["lastError"] for s in gw.app.ads.status()["streams"]]
        assert all("wildcard" in e.lower() or "domain" in e.lower() for e in errors), errors
        # a valid change afterwards is accepted again (the last good cluster set is untouched)
        clusters_version = gw.app.ads.cache.versions()["CDS"]
        (gw.config_dir / "routes.yaml").write_text(ROUTES + NEW_ROUTE)
        await until(
            lambda: "modelserver/default/pool-b" in envoy.route_names(), PUSH_DEADLINE, "recovery"
        )
        assert gw.app.ads.cache.versions()["CDS"] == clusters_version
        assert CLUSTER in gw.app.ads.cache._types
