"""Long-running local clusters: Kopf's watches against the emulated API server.

Kopf takes a watch that brings no event for ``settings.watching.inactivity_timeout`` (70 s) for
dead and reconnects; kmock sends no BOOKMARKs, so every quiet watch of a local cluster
reconnected each 70 s. The emulator now sends one on each idle watch (as the API server does),
so no reconnect happens; and when one does (the API server restarts, a network error), the
operator still reconciles objects created afterwards. The inactivity timeout is shortened here
so that the test takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

import controllers.main
from matrixinfer.testing.kube import Api, Kubelet, emulator, eventually, operator
from tests.controllers.fakecluster import make_object

pytestmark = pytest.mark.timeout(300)

INACTIVITY = 1.0  # seconds; Kopf's default is 70


@pytest.fixture
def quick_inactivity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    make = controllers.main.make_settings

    def settings(config: controllers.main.ControllerConfig) -> object:
        s = make(config)
        s.watching.inactivity_timeout = INACTIVITY
        return s

    monkeypatch.setattr(controllers.main, "make_settings", settings)
    yield


async def _watches_during(api: Api, seconds: float) -> int:
    before = api.k.watches
    await asyncio.sleep(seconds)
    return api.k.watches - before


async def _new_modelinfer_gets_pods(api: Api, name: str) -> None:
    obj = make_object(name=name, replicas=1)
    obj["metadata"]["uid"] = f"uid-{name}"
    await api.create_modelinfer(obj)
    await eventually(
        lambda: any(p.startswith(f"{name}-") for p in api.pods()), 90, f"pods of {name}"
    )


@pytest.mark.usefixtures("quick_inactivity")
async def test_bookmarks_keep_quiet_watches_open() -> None:
    async with emulator() as api:
        api.k.bookmark_interval = INACTIVITY / 4
        kubelet = asyncio.create_task(Kubelet(api).run())
        async with operator(api):
            await _new_modelinfer_gets_pods(api, "first")
            await asyncio.sleep(1.0)  # the operator's own writes settle
            assert await _watches_during(api, 4 * INACTIVITY) == 0
            assert api.k.bookmarks > 0
            await _new_modelinfer_gets_pods(api, "second")
        kubelet.cancel()


@pytest.mark.usefixtures("quick_inactivity")
async def test_objects_created_after_reconnects_are_still_reconciled() -> None:
    async with emulator() as api:
        assert api.k.bookmark_interval is None  # kmock's own behaviour: no bookmarks
        kubelet = asyncio.create_task(Kubelet(api).run())
        async with operator(api):
            await _new_modelinfer_gets_pods(api, "first")
            assert await _watches_during(api, 4 * INACTIVITY) > 0  # the watches reconnected
            await _new_modelinfer_gets_pods(api, "second")
            await _new_modelinfer_gets_pods(api, "third")
        kubelet.cancel()


async def test_an_object_created_while_a_watch_sends_the_existing_ones_is_not_lost() -> None:
    """kmock's own watch joined the event stream only after sending the existing objects: an
    object created meanwhile never reached that watcher (after each Kopf reconnect, objects
    created during the re-listing were missed for good)."""
    import aiohttp

    async with emulator(history_limit=50) as api:
        padding = "x" * 50_000  # big objects: the server blocks on the socket while we wait
        for i in range(120):
            await api.request(
                "POST",
                "/api/v1/namespaces/ns/pods",
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": f"old-{i}", "namespace": "ns",
                              "annotations": {"padding": padding}}},
            )  # fmt: skip
        url = f"{api.url}/api/v1/namespaces/ns/pods?watch=true"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            first = await resp.content.readline()
            assert b"old-" in first  # the existing objects are being sent, we read slowly
            await api.request(
                "POST",
                "/api/v1/namespaces/ns/pods",
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "new", "namespace": "ns"}},
            )  # fmt: skip
            seen: set[str] = set()

            async def read() -> None:
                async for line in resp.content:
                    if b'"name": "new"' in line or b'"name":"new"' in line:
                        seen.add("new")
                        return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read(), 20)
            assert seen == {"new"}
