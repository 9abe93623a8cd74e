"""The real Kopf operator (with the autoscaler) against the emulated API server: a gateway
stand-in publishes the extproc demand gauges; the autoscaler scales a ModelInfer through /scale."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from controllers.autoscaling.sources import GATEWAY_IN_FLIGHT, GATEWAY_WAITING
from matrixinfer.process import free_port
from matrixinfer.testing.kube import Api, Kubelet, emulator, eventually, operator
from tests.controllers.fakecluster import make_object

pytestmark = pytest.mark.timeout(180)

POLICIES = "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/ns/autoscalingpolicies"
MI = "/apis/workload.matrixinfer.ai/v1alpha1/namespaces/ns/modelinfers"


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with emulator() as a:
        a.k.by_kind = {}
        yield a


class Gateway:
    """An extproc replica's /metrics, as far as the autoscaler reads it."""

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}

    async def metrics(self, _: web.Request) -> web.Response:
        lines = [f"# TYPE {GATEWAY_WAITING} gauge", f"# TYPE {GATEWAY_IN_FLIGHT} gauge"]
        for server, n in self.waiting.items():
            lines.append(f'{GATEWAY_WAITING}{{namespace="ns",server="{server}"}} {n}')
            lines.append(f'{GATEWAY_IN_FLIGHT}{{namespace="ns",server="{server}"}} 0')
        return web.Response(text="\n".join(lines) + "\n")


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, str]]:
    gw = Gateway()
    app = web.Application()
    app.router.add_get("/metrics", gw.metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield gw, f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    finally:
        await runner.cleanup()


def policy(name: str, created: str, **target: Any) -> dict[str, Any]:
    fast = {"instances": 10, "period": "1s"}
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "AutoscalingPolicy",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": created,
        },
        "spec": {
            "metrics": [{"name": "gateway_queue_length", "targetValue": 2}],
            "behavior": {
                "scaleUp": {"stablePolicy": fast},
                "scaleDown": {**fast, "stabilizationWindow": "1s"},
            },
            "homogeneousTarget": {
                "targetRef": {"name": "llama"},
                "minReplicas": 0,
                "maxReplicas": 4,
                "metricSources": [{"gateway": {}}],
                **target,
            },
        },
    }


async def create(api: Api, path: str, obj: dict[str, Any]) -> None:
    obj["metadata"]["resourceVersion"] = api.next_rv()
    await api.request("POST", path, obj)


def replicas(api: Api) -> int | None:
    mi = api.modelinfer("llama")
    return None if mi is None else mi["spec"]["replicas"]


def policy_status(api: Api, name: str) -> dict[str, Any]:
    obj = api.objects("registry.matrixinfer.ai/v1alpha1/autoscalingpolicies").get(name) or {}
    return obj.get("status") or {}


def condition(api: Api, name: str, type_: str) -> dict[str, Any] | None:
    conds = policy_status(api, name).get("conditions") or []
    return next((c for c in conds if c["type"] == type_), None)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """The operator's metrics: (sample name, target or reason) -> value, for policy llama."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("policy") == "llama":
                out[(s.name, s.labels.get("target") or s.labels.get("reason") or "")] = s.value
    return out


def event_reasons(api: Api) -> list[str]:
    return [str(e.get("reason")) for e in api.objects("v1/events").values()]


async def test_gateway_demand_scales_a_modelinfer_through_scale_up_down_to_zero_and_back(
    api: Api, kubelet: Kubelet, gateway: tuple[Gateway, str]
) -> None:
    gw, url = gateway
    port = free_port()
    async with operator(
        api,
        autoscale_interval=0.2,
        gateway_metrics_urls=[url],
        autoscale_stable_window=0.5,
        autoscale_panic_window=0.2,
        metrics_port=port,
        metrics_host="127.0.0.1",
    ):
        await api.create_modelinfer(make_object(replicas=1))
        gw.waiting["llama"] = 6
        await create(api, POLICIES, policy("llama", "2026-01-01T00:00:00Z"))
        await eventually(lambda: replicas(api) == 3, what="ceil(6 waiting / 2) = 3 replicas")
        assert api.k.by_kind is not None
        assert any(k.endswith("PATCH modelinfers/scale") for k in api.k.by_kind), api.k.by_kind
        await eventually(lambda: "ScaleUp" in event_reasons(api), what="a ScaleUp event")
        # the ModelInfer controller follows: three InferGroups of pods
        await eventually(
            lambda: {p.split("-")[1] for p in api.pods()} == {"0", "1", "2"},
            what="pods of three groups",
        )

        def target_status() -> dict[str, Any]:
            t = policy_status(api, "llama")["targets"][0]
            assert t["currentReplicas"] == 3 and t["desiredReplicas"] == 3, t
            return dict(t)

        t = await eventually(target_status, what="status of the target")
        assert t["name"] == "llama" and t["mode"] == "Stable"
        assert t["lastScaleReason"] == "ScaleUp" and t["lastScaleTime"].endswith("Z")
        owned = condition(api, "llama", "TargetOwned")
        assert owned is not None and owned["status"] == "True", owned
        page = await asyncio.to_thread(scrape, port)
        assert page[("matrixinfer_controller_autoscaler_desired_replicas", "llama")] == 3
        assert page[("matrixinfer_controller_autoscaler_decisions_total", "ScaleUp")] >= 1
        assert page[("matrixinfer_controller_autoscaler_panic", "")] == 0
        assert page[("matrixinfer_controller_autoscaler_max_replicas", "")] == 4  # maxReplicas

        # a human scales: the autoscaler says so, then goes on from the new count
        await api.request("PATCH", f"{MI}/llama", {"spec": {"replicas": 1}})
        await eventually(
            lambda: (condition(api, "llama", "ScaledExternally") or {}).get("status") == "True",
            what="the ScaledExternally condition",
        )
        await eventually(lambda: "ScaledExternally" in event_reasons(api), what="its Event")
        await eventually(lambda: replicas(api) == 3, what="back to the demand's 3 replicas")

        # idle: down to zero (minReplicas 0)
        gw.waiting["llama"] = 0
        await eventually(lambda: replicas(api) == 0, what="scale to zero")
        await eventually(lambda: "ScaleToZero" in event_reasons(api), what="a ScaleToZero event")

        # a request waits in the gateway's queue: wake up
        gw.waiting["llama"] = 1
        await eventually(lambda: replicas(api) == 1, what="wake from zero")
        await eventually(lambda: "WakeUp" in event_reasons(api), what="a WakeUp event")


async def test_one_writer_per_target_and_missing_gateway_never_scales_down(
    api: Api, gateway: tuple[Gateway, str]
) -> None:
    gw, url = gateway
    async with operator(
        api,
        autoscale_interval=0.2,
        gateway_metrics_urls=[url, "http://127.0.0.1:9/metrics"],  # one replica is down
        autoscale_stable_window=0.5,
    ):
        await api.create_modelinfer(make_object(replicas=2))
        gw.waiting["llama"] = 0
        await create(api, POLICIES, policy("first", "2026-01-01T00:00:00Z"))
        await create(api, POLICIES, policy("second", "2026-02-01T00:00:00Z"))

        def second_not_owner() -> bool:
            c = condition(api, "second", "TargetOwned")
            return c is not None and c["status"] == "False"

        await eventually(second_not_owner, what="the newer policy to yield the target")
        c = condition(api, "second", "TargetOwned")
        assert c is not None and "ModelInfer llama is scaled by first" in c["message"]

        def missing() -> bool:
            c = condition(api, "first", "MetricsAvailable")
            return c is not None and c["status"] == "False" and c["reason"] == "MetricsMissing"

        await eventually(missing, what="the missing gateway metric reported")
        c = condition(api, "first", "MetricsAvailable")
        assert c is not None and "127.0.0.1:9" in c["message"], c

        def held() -> bool:  # a decision on half the data: demand 0, yet no scale-down
            t = (policy_status(api, "first").get("targets") or [{}])[0]
            return t.get("currentReplicas") == 2 and t.get("desiredReplicas") == 2

        await eventually(held, what="a decision holding 2 replicas")
        assert replicas(api) == 2


async def test_invalid_policy_is_reported(api: Api) -> None:
    async with operator(api, autoscale_interval=0.2):
        await api.create_modelinfer(make_object(replicas=1))
        bad = policy("bad", "2026-01-01T00:00:00Z", minReplicas=5)  # min 5 > max 4
        await create(api, POLICIES, bad)

        def reported() -> bool:
            c = condition(api, "bad", "Active")
            return c is not None and c["reason"] == "InvalidSpec"

        await eventually(reported, what="the InvalidSpec condition")
        c = condition(api, "bad", "Active")
        assert c is not None and "minReplicas must not exceed maxReplicas" in c["message"]
        assert replicas(api) == 1


async def test_disaggregated_roles_scale_together_within_the_ratio(
    api: Api, gateway: tuple[Gateway, str]
) -> None:
    gw, url = gateway
    async with operator(
        api, autoscale_interval=0.2, gateway_metrics_urls=[url], autoscale_stable_window=0.5
    ):
        await api.create_modelinfer(make_object(replicas=1))  # roles prefill 1, decode 2
        gw.waiting["llama"] = 12
        pd = policy("pd", "2026-01-01T00:00:00Z")
        pd["spec"].pop("homogeneousTarget")
        pd["spec"]["disaggregatedTarget"] = {
            "targetRef": {"name": "llama"},
            "prefill": {"minReplicas": 1, "maxReplicas": 4},
            "decode": {"minReplicas": 2, "maxReplicas": 8},
            "ratioConstraint": {"prefill": 1, "decode": 2},
            "metricSources": [{"gateway": {}}],
        }
        await create(api, POLICIES, pd)

        def roles() -> dict[str, int]:
            mi = api.modelinfer("llama") or {}
            return {r["name"]: r["replicas"] for r in mi["spec"]["template"]["roles"]}

        # 12 waiting / 2 per instance = 6 role instances: 2 prefill + 4 decode
        await eventually(lambda: roles() == {"prefill": 2, "decode": 4}, what="roles 2:4")
        await eventually(
            lambda: (
                {x["name"] for x in policy_status(api, "pd")["targets"]}
                == {"llama/prefill", "llama/decode"}
            ),
            what="a status per role",
        )
        assert replicas(api) == 1
