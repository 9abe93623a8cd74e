"""The Model reconciler's edge behaviour without Kopf: failed writes are retried with backoff,
and the status and Events tell what failed."""

from __future__ import annotations

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
    """Fails the first ``failures`` writes (alternating API errors and dropped connections)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
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
