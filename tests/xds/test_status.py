"""ModelRoute / ModelServer status written by the controllers (the real Kopf operator on kmock)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controllers.status.compute import (
    PodView,
    label_keys,
    route_claims,
    route_status,
    selected_candidates,
    server_status,
    taken_names,
)
from matrixinfer.process import free_port
from matrixinfer.testing.kube import Api, eventually, operator
from tests.xds.conftest import Envoy, ads_envoy
from tests.xds.kube import create_pod, create_route, create_server, kube, set_pod_ready
from tests.xds.test_ads_envoy import PUSH_DEADLINE, until

pytestmark = pytest.mark.timeout(180)

NET = "networking.matrixinfer.ai/v1alpha1"


def conditions(api: Api, plural: str, name: str) -> dict[str, dict[str, Any]]:
    obj = api.objects(f"{NET}/{plural}").get(name) or {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def ready_endpoints(api: Api, name: str) -> Any:
    obj = api.objects(f"{NET}/modelservers").get(name) or {}
    return (obj.get("status") or {}).get("readyEndpoints")


def test_route_status_pure() -> None:
    raw = {
        "metadata": {"name": "r", "namespace": "ns", "generation": 3},
        "spec": {"rules": [{"targets": [{"modelServerName": "a"}, {"modelServerName": "b"}]}]},
    }
    st = route_status(raw, lambda ns, n: n == "a", lambda _: None, "T1")
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Accepted"]["status"] == "True"
    assert cond["ResolvedRefs"]["status"] == "False"
    assert cond["ResolvedRefs"]["message"] == "ModelServer not found: b"
    assert st["observedGeneration"] == 3
    # unchanged status keeps its transition time
    raw["status"] = st
    st2 = route_status(raw, lambda ns, n: n == "a", lambda _: None, "T2")
    assert {c["lastTransitionTime"] for c in st2["conditions"]} == {"T1"}
    st3 = route_status(raw, lambda ns, n: True, lambda _: "spec.rules: bad", "T3")
    cond3 = {c["type"]: c for c in st3["conditions"]}
    assert (
        cond3["Accepted"]["reason"] == "Invalid" and cond3["Accepted"]["lastTransitionTime"] == "T3"
    )
    assert cond3["ResolvedRefs"]["lastTransitionTime"] == "T3"


def test_route_that_claims_a_served_model_is_not_accepted() -> None:
    def route(name: str, created: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"modelName": "chat", "loraAdapters": ["sql"], "rules": []},
        }

    old, new = route("zeta", "2025-01-01T00:00:00Z"), route("alpha", "2025-02-01T00:00:00Z")
    index: dict[tuple[str, str], list[Any]] = {}
    for raw in (old, new):
        for kind, claim in route_claims(raw):
            index.setdefault((kind, claim.name), []).append(claim)

    def claims_of(kind: str, name: str) -> list[Any]:
        return index.get((kind, name), [])

    assert taken_names(old, claims_of) == {}
    assert taken_names(new, claims_of) == {"chat": "ns/zeta", "sql": "ns/zeta"}
    st = route_status(new, lambda ns, n: True, lambda _: None, "T1", taken_names(new, claims_of))
    accepted = {c["type"]: c for c in st["conditions"]}["Accepted"]
    assert (accepted["status"], accepted["reason"]) == ("False", "ModelNameTaken")
    assert "'chat' is served by ModelRoute 'ns/zeta'" in accepted["message"]


def test_server_status_pure() -> None:
    raw = {
        "metadata": {"name": "s", "namespace": "ns"},
        "spec": {"workloadSelector": {"matchLabels": {"app": "x"}}},
    }
    pods = [
        PodView("ns", {"app": "x"}, True),
        PodView("ns", {"app": "x"}, False),
        PodView("other", {"app": "x"}, True),
        PodView("ns", {"app": "y"}, True),
    ]
    st = server_status(raw, pods, "T")
    assert st["readyEndpoints"] == 1 and st["conditions"][0]["status"] == "True"


def test_server_checks_only_the_pods_of_its_rarest_label() -> None:
    pods = [PodView("ns", {"entry": "true", "mi": f"m{i % 50}"}, i % 3 > 0) for i in range(200)]
    pods += [PodView("other", {"entry": "true", "mi": "m7"}, True)]
    index: dict[tuple[str, str, str], list[PodView]] = {}
    for p in pods:
        for key in label_keys(p.namespace, p.labels):
            index.setdefault(key, []).append(p)
    selector = {"entry": "true", "mi": "m7"}
    picked = selected_candidates("ns", selector, lambda key: index.get(key, []))
    assert len(picked) == 4  # the "mi": "m7" pods of ns, not the 200 "entry" ones
    raw = {"metadata": {"namespace": "ns"}, "spec": {"workloadSelector": {"matchLabels": selector}}}
    assert server_status(raw, picked, "T") == server_status(raw, pods, "T")
    assert selected_candidates("ns", {}, lambda key: index.get(key, [])) == ()
    assert selected_candidates("ns", {"mi": "none"}, lambda key: index.get(key, [])) == []


async def test_operator_writes_route_and_server_status() -> None:
    async with kube() as api:
        await create_server(api, "pool", {"app": "sim"}, 8000)
        await create_route(api, "good", "m1", ["pool"], created="2025-01-01T00:00:00Z")
        await create_route(api, "dangling", "m2", ["pool", "missing"])
        # claims m1 too, created later: not accepted, naming the route that serves m1
        await create_route(api, "aaa-late", "m1", ["pool"], created="2999-01-01T00:00:00Z")
        await create_pod(api, "p0", "10.0.0.1", {"app": "sim"})
        await create_pod(api, "p1", "10.0.0.2", {"app": "sim"})
        await create_pod(api, "other", "10.0.0.3", {"app": "other"})
        async with operator(api):
            await eventually(
                lambda: conditions(api, "modelroutes", "good")["ResolvedRefs"]["status"] == "True",
                what="good route resolved",
            )
            assert conditions(api, "modelroutes", "good")["Accepted"]["status"] == "True"
            await eventually(
                lambda: conditions(api, "modelroutes", "aaa-late")["Accepted"]["status"] == "False",
                what="the late duplicate route not accepted",
            )
            late = conditions(api, "modelroutes", "aaa-late")["Accepted"]
            assert late["reason"] == "ModelNameTaken" and "'ns/good'" in late["message"]
            await eventually(
                lambda: (
                    conditions(api, "modelroutes", "dangling")["ResolvedRefs"]["status"] == "False"
                ),
                what="dangling route not resolved",
            )
            msg = conditions(api, "modelroutes", "dangling")["ResolvedRefs"]["message"]
            assert "missing" in msg and "pool" not in msg.split(":")[-1]
            await eventually(lambda: ready_endpoints(api, "pool") == 2, what="2 ready endpoints")
            await set_pod_ready(api, "p1", "10.0.0.2", False)
            await eventually(lambda: ready_endpoints(api, "pool") == 1, what="1 ready endpoint")
            # the missing server appears: the route resolves
            await create_server(api, "missing", {"app": "none"}, 8000)
            await eventually(
                lambda: (
                    conditions(api, "modelroutes", "dangling")["ResolvedRefs"]["status"] == "True"
                ),
                what="dangling route resolved",
            )
            assert conditions(api, "modelservers", "missing")["Ready"]["status"] == "False"


async def test_controllers_serve_ads_from_the_api(tmp_path: Path) -> None:
    """matrixinfer-controllers --xds-port: the ADS server runs in the operator process."""
    xds_port, listen = free_port(), free_port()
    async with kube() as api:
        await create_server(api, "pool", {"app": "sim"}, 8000)
        await create_route(api, "good", "m1", ["pool"])
        await create_pod(api, "p0", "10.0.0.1", {"app": "sim"})
        async with operator(
            api,
            xds_port=xds_port,
            xds_host="127.0.0.1",
            xds_args=["--listen-port", str(listen)],
        ):
            child, admin = ads_envoy(tmp_path, xds_port)
            await asyncio.to_thread(child.start)
            try:
                envoy = Envoy(child, admin, listen)
                assert "modelserver/ns/pool" in envoy.route_names()
                await create_server(api, "pool-b", {"app": "sim"}, 8000)
                await create_route(api, "model-b", "m2", ["pool-b"])
                await until(
                    lambda: "modelserver/ns/pool-b" in envoy.route_names(),
                    PUSH_DEADLINE,
                    "new route",
                )
            finally:
                await asyncio.to_thread(child.stop)
