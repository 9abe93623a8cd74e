"""The Model reconciler's edge behaviour without Kopf: failed writes are retried with backoff,
and the status and Events tell what failed."""

from __future__ import annotations

import copy
import logging
from typing import Any

import aiohttp

from controllers.kube import ApiError
from controllers.metrics import ControllerMetrics
from controllers.model.reconciler import MODEL_INDEX, ModelController
from controllers.model.types import EventNote
from matrixinfer.testing.kube import eventually

BODY = {
    "apiVersion": "registry.matrixinfer.ai/v1alpha1",
    "kind": "Model",
    "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 1},
    "spec": {"backends": [{"name": "a", "type": "vLLM", "modelURI": "hf://o/m"}]},
}


class FlakyClient:
    """Fails the first ``failures`` writes (alternating API errors and dropped connections),
    and the first ``status_failures`` status writes."""

    def __init__(self, failures: int, status_failures: int = 0) -> None:
        self.failures = failures
        self.status_failures = status_failures
        self.created: list[str] = []
        self.status: list[dict[str, Any]] = []

    def _maybe_fail(self, path: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            if self.failures % 2:
                raise ApiError("POST", path, 500, "boom")
            raise aiohttp.ServerDisconnectedError()

    async def create(self, path: str, body: dict[str, Any]) -> bool:
        self._maybe_fail(path)
        self.created.append(f"{body['kind']} {body['metadata']['name']}")
        return True

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        if path.endswith("/status"):
            if self.status_failures > 0:
                self.status_failures -= 1
                raise aiohttp.ServerDisconnectedError()
            self.status.append(body["status"])
        return {}

    async def close(self) -> None:
        pass


async def test_failed_writes_are_retried_and_reported() -> None:
    events: list[EventNote] = []
    controller = ModelController(ControllerMetrics(), post_event=lambda _b, ev: events.append(ev))
    client = FlakyClient(failures=3)
    controller.client = client  # type: ignore[assignment]
    indexes = {MODEL_INDEX: {("ns", "m"): [BODY]}}
    await controller.reconcile(("ns", "m"), indexes, logging.getLogger("test"))
    failed = {c["type"]: c for c in client.status[0]["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "ApplyFailed"
    assert "create ModelInfer m-a" in failed["message"]
    assert ("Warning", "ApplyFailed") in [(e.type, e.reason) for e in events]
    await eventually(
        lambda: sorted(client.created) == ["ModelInfer m-a", "ModelRoute m", "ModelServer m-a"],
        10,
        "every child created by the retries",
    )
    await eventually(
        lambda: (
            {c["type"]: c["status"] for c in client.status[-1]["conditions"]}["Failed"] == "False"
        ),
        10,
        "Failed back to False",
    )
    await controller.close()


async def test_a_failed_status_write_is_retried_and_its_events_posted_once() -> None:
    events: list[EventNote] = []
    controller = ModelController(ControllerMetrics(), post_event=lambda _b, ev: events.append(ev))
    client = FlakyClient(failures=0, status_failures=1)
    controller.client = client  # type: ignore[assignment]
    bad = copy.deepcopy(BODY)
    bad["spec"]["backends"][0]["modelURI"] = "ftp://x"
    indexes = {MODEL_INDEX: {("ns", "m"): [bad]}}
    await controller.reconcile(("ns", "m"), indexes, logging.getLogger("test"))
    assert client.status == []
    assert [(e.type, e.reason) for e in events] == [("Warning", "InvalidSpec")]
    await eventually(lambda: client.status, 10, "the status written by the retry")
    failed = {c["type"]: c for c in client.status[0]["conditions"]}["Failed"]
    assert failed["reason"] == "InvalidSpec"
    assert len(events) == 1  # announced once, not again by the retry
    await controller.close()
