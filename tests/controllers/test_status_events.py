"""The status controller recomputes status on the events that can change it, not on a clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import controllers.status.handlers as status_handlers
from controllers.status.compute import PodView, ServerSelector, label_keys, servers_to_wake
from matrixinfer.testing.kube import Api, eventually, operator
from tests.xds.kube import create_pod, create_route, create_server, kube, set_pod_ready

pytestmark = pytest.mark.timeout(120)

NET = "networking.matrixinfer.ai/v1alpha1"
IDLE_WINDOW = 3.0  # seconds of polled time in which an idle fleet must not be recomputed


def test_a_pod_change_wakes_only_the_servers_selecting_it() -> None:
    servers = [
        ServerSelector("ns", "a", (("app", "x"), ("entry", "true"))),
        ServerSelector("ns", "b", (("app", "y"), ("entry", "true"))),
        ServerSelector("other", "c", (("app", "x"),)),
        ServerSelector("ns", "empty", ()),
    ]
    index: dict[tuple[str, str, str], list[ServerSelector]] = {}
    for s in servers:
        for key in label_keys(s.namespace, dict(s.match_labels)):
            index.setdefault(key, []).append(s)

    def by_label(key: tuple[str, str, str]) -> list[ServerSelector]:
        return index.get(key, [])

    pod_x = PodView("ns", {"app": "x", "entry": "true", "pod": "p0"}, True)
    pod_y = PodView("ns", {"app": "y", "entry": "true", "pod": "p0"}, True)
    assert servers_to_wake(None, pod_x, by_label) == {("ns", "a")}
    assert servers_to_wake(pod_x, None, by_label) == {("ns", "a")}
    # relabelled: the server it left and the one it joined
    assert servers_to_wake(pod_x, pod_y, by_label) == {("ns", "a"), ("ns", "b")}
    assert servers_to_wake(None, PodView("ns", {"entry": "true"}, True), by_label) == set()


def _status(api: Api, plural: str, name: str) -> dict[str, Any]:
    return dict((api.objects(f"{NET}/{plural}").get(name) or {}).get("status") or {})


async def test_an_idle_fleet_is_not_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once status has converged nothing is recomputed while nothing changes (a timer per
    object recomputed each one every second); a pod that turns unready is still seen."""
    calls = {"server": 0, "route": 0}
    real_server = getattr(status_handlers, "server_status")  # noqa: B009 (not in __all__)
    real_route = getattr(status_handlers, "route_status")  # noqa: B009

    def counted_server(*args: Any, **kwargs: Any) -> Any:
        calls["server"] += 1
        return real_server(*args, **kwargs)

    def counted_route(*args: Any, **kwargs: Any) -> Any:
        calls["route"] += 1
        return real_route(*args, **kwargs)

    monkeypatch.setattr(status_handlers, "server_status", counted_server)
    monkeypatch.setattr(status_handlers, "route_status", counted_route)
    async with kube() as api:
        await create_server(api, "pool", {"app": "sim"}, 8000)
        await create_route(api, "chat", "m1", ["pool", "later"])
        await create_pod(api, "p0", "10.0.0.1", {"app": "sim"})
        await create_pod(api, "p1", "10.0.0.2", {"app": "sim"})
        async with operator(api):
            await eventually(
                lambda: _status(api, "modelservers", "pool").get("readyEndpoints") == 2,
                what="2 ready endpoints",
            )
            await eventually(
                lambda: _status(api, "modelroutes", "chat").get("conditions"),
                what="the route's conditions",
            )
            # the operator's own status patches come back as events: let them settle
            settled = dict(calls)
            while True:
                await asyncio.sleep(0.5)
                if calls == settled:
                    break
                settled = dict(calls)
            before = dict(calls)
            end = time.monotonic() + IDLE_WINDOW
            while time.monotonic() < end:
                await asyncio.sleep(0.1)
                if calls != before:
                    break
            assert calls == before, "an idle ModelServer/ModelRoute was recomputed"

            # what the status summarises changes: recomputed and patched
            await set_pod_ready(api, "p1", "10.0.0.2", False)
            await eventually(
                lambda: _status(api, "modelservers", "pool").get("readyEndpoints") == 1,
                what="1 ready endpoint after p1 turned unready",
            )
            assert calls["server"] > before["server"]
            # a ModelServer the route targets appears: the route resolves
            resolved = _status(api, "modelroutes", "chat")["conditions"][1]
            assert resolved["type"] == "ResolvedRefs" and resolved["status"] == "False"
            await create_server(api, "later", {"app": "none"}, 8000)
            await eventually(
                lambda: _status(api, "modelroutes", "chat")["conditions"][1]["status"] == "True",
                what="the route resolved once its target exists",
            )


def test_a_status_failing_again_and_again_is_retried_less_and_less_often() -> None:
    writer = status_handlers.StatusWriter(resync=300.0)
    delays = [writer.retry_delay(n) for n in (1, 2, 3, 4, 12, 100)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 300.0, 300.0]


async def test_a_status_that_cannot_be_computed_stops_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One ModelServer whose status computation fails (a bug, a body it cannot read) is retried
    until it succeeds, and the worker goes on with every other object: an exception escaping the
    worker ended it, and no status was written again (every later mark was lost)."""
    monkeypatch.setattr(status_handlers, "RETRY", 0.05)
    real_server = getattr(status_handlers, "server_status")  # noqa: B009 (not in __all__)
    broken = {"on": True, "tries": 0}

    def failing_server(raw: Any, *args: Any, **kwargs: Any) -> Any:
        if raw["metadata"]["name"] == "bad" and broken["on"]:
            broken["tries"] += 1
            raise RuntimeError("cannot compute the status of 'bad'")
        return real_server(raw, *args, **kwargs)

    monkeypatch.setattr(status_handlers, "server_status", failing_server)
    async with kube() as api:
        await create_server(api, "bad", {"app": "other"}, 8000)
        await create_server(api, "good", {"app": "sim"}, 8000)
        await create_pod(api, "p0", "10.0.0.1", {"app": "sim"})
        async with operator(api):
            await eventually(
                lambda: _status(api, "modelservers", "good").get("readyEndpoints") == 1,
                what="good: 1 ready endpoint",
            )
            await eventually(lambda: broken["tries"] >= 2, what="bad: tried again")
            # a later change to another ModelServer is still written
            await set_pod_ready(api, "p0", "10.0.0.1", False)
            await eventually(
                lambda: _status(api, "modelservers", "good").get("readyEndpoints") == 0,
                what="good: 0 ready endpoints after p0 turned unready",
            )
            broken["on"] = False  # fixed: the retry writes it
            await eventually(
                lambda: _status(api, "modelservers", "bad").get("readyEndpoints") == 0,
                what="bad: its status once it can be computed",
            )


async def test_a_status_changed_by_someone_else_is_written_again() -> None:
    """Someone else edits a ModelServer's status (or the object is deleted and created again
    while no event said so): the writer computes against the object as the API has it, not
    against its own last patch — which found nothing to change and left the wrong status for
    good, the resync included."""
    async with kube() as api:
        await create_server(api, "pool", {"app": "sim"}, 8000)
        await create_pod(api, "p0", "10.0.0.1", {"app": "sim"})
        async with operator(api):
            await eventually(
                lambda: _status(api, "modelservers", "pool").get("readyEndpoints") == 1,
                what="1 ready endpoint",
            )
            # a new resourceVersion, as a real API server gives every write (kmock does not)
            await api.request(
                "PATCH",
                f"/apis/{NET}/namespaces/ns/modelservers/pool/status",
                {"metadata": {"resourceVersion": "7001"}, "status": {"readyEndpoints": 99}},
            )
            await eventually(
                lambda: _status(api, "modelservers", "pool").get("readyEndpoints") == 1,
                what="the status written again after someone else's edit",
            )
