"""The Model reconciler's edge behaviour without Kopf: failed writes are retried with backoff,
and the status and Events tell what failed."""

from __future__ import annotations

import copy
import logging
from typing import Any

import aiohttp
import pytest

from controllers.kube import ApiError
from controllers.metrics import ControllerMetrics
from controllers.model.reconciler import CREATED_TTL, MODEL_INDEX, ModelController
from controllers.model.types import ChildRef, EventNote
from matrixinfer.testing.kube import eventually

BODY: dict[str, Any] = {
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


class RecordingClient:
    """Records every write; ``existing``: objects by path that a create meets (409)."""

    def __init__(self, existing: dict[str, dict[str, Any]] | None = None) -> None:
        self.existing = existing or {}
        self.writes: list[str] = []

    async def create(self, path: str, body: dict[str, Any]) -> bool:
        self.writes.append(f"create {body['kind']} {body['metadata']['name']}")
        return f"{path}/{body['metadata']['name']}" not in self.existing

    async def get(self, path: str) -> Any:
        self.writes.append(f"get {path.rsplit('/', 1)[-1]}")
        return copy.deepcopy(self.existing.get(path))

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        if not path.endswith("/status"):
            self.writes.append(f"patch {path.rsplit('/', 1)[-1]}")
        return {}

    async def close(self) -> None:
        pass


async def test_children_it_just_created_are_not_created_again() -> None:
    """The watch has not shown the children yet (the indexes hold only the Model): a second
    reconcile must not create them again (kmock replaced them; an API server answers 409)."""
    now = [0.0]
    controller = ModelController(
        ControllerMetrics(), post_event=lambda _b, _ev: None, clock=lambda: now[0]
    )
    client = RecordingClient()
    controller.client = client  # type: ignore[assignment]
    indexes = {MODEL_INDEX: {("ns", "m"): [BODY]}}
    log = logging.getLogger("test")
    await controller.reconcile(("ns", "m"), indexes, log)
    created = ["create ModelInfer m-a", "create ModelRoute m", "create ModelServer m-a"]
    assert sorted(client.writes) == created
    await controller.reconcile(("ns", "m"), indexes, log)
    assert sorted(client.writes) == created, "a child created by the first reconcile again"
    # a child the watch never shows (deleted before it did) is created again after a while
    now[0] = CREATED_TTL + 1
    await controller.reconcile(("ns", "m"), indexes, log)
    assert sorted(client.writes) == sorted(created * 2)
    await controller.close()


async def test_a_child_deleted_before_a_reconcile_saw_it_indexed_is_created_again() -> None:
    """The watch shows a child just created and then its deletion, with no reconcile between
    (events coalesce under load): the child's events drop the memo of creating it, so the next
    reconcile creates it again at once, not after CREATED_TTL."""
    controller = ModelController(
        ControllerMetrics(), post_event=lambda _b, _ev: None, clock=lambda: 0.0
    )
    client = RecordingClient()
    controller.client = client  # type: ignore[assignment]
    indexes = {MODEL_INDEX: {("ns", "m"): [BODY]}}
    log = logging.getLogger("test")
    await controller.reconcile(("ns", "m"), indexes, log)
    assert "create ModelRoute m" in client.writes
    client.writes.clear()
    controller.child_event(("ns", "m"), ChildRef("ModelRoute", "m"))  # ADDED, then DELETED
    await controller.reconcile(("ns", "m"), indexes, log)
    assert client.writes == ["create ModelRoute m"]
    await controller.close()


async def test_a_create_that_meets_an_existing_child_reads_and_patches_it() -> None:
    """409 AlreadyExists: the child is read, and the next plan patches what differs instead
    of creating it again."""
    mi_path = "/apis/workload.matrixinfer.ai/v1alpha1/namespaces/ns/modelinfers/m-a"
    first = RecordingClient()
    probe = ModelController(ControllerMetrics(), post_event=lambda _b, _ev: None)
    probe.client = first  # type: ignore[assignment]
    indexes = {MODEL_INDEX: {("ns", "m"): [BODY]}}
    await probe.reconcile(("ns", "m"), indexes, logging.getLogger("test"))
    stale = copy.deepcopy(probe.created[("ns", "m")])
    (_, mi) = next(v for r, v in stale.items() if r.kind == "ModelInfer")
    existing = {
        "apiVersion": "workload.matrixinfer.ai/v1alpha1",
        "kind": "ModelInfer",
        "metadata": {"name": "m-a", "namespace": "ns", "labels": dict(mi.labels),
                     "ownerReferences": [dict(o) for o in mi.owner_refs]},
        "spec": {**copy.deepcopy(dict(mi.spec)), "replicas": 7},
    }  # fmt: skip
    controller = ModelController(ControllerMetrics(), post_event=lambda _b, _ev: None)
    client = RecordingClient({mi_path: existing})
    controller.client = client  # type: ignore[assignment]
    await controller.reconcile(("ns", "m"), indexes, logging.getLogger("test"))
    assert "get m-a" in client.writes
    await controller.reconcile(("ns", "m"), indexes, logging.getLogger("test"))
    assert client.writes.count("create ModelInfer m-a") == 1
    assert "patch m-a" in client.writes, "the existing child's differences were not patched"
    await controller.close()


async def test_an_unchanged_model_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconciles woken by child events reuse what the unchanged Model generates; a changed
    spec (or label) is parsed and planned anew."""
    import controllers.model.reconciler as reconciler
    from controllers.model.planner import desired as real

    calls: list[str] = []

    def counted(model: Any, *args: Any) -> Any:
        calls.append(model.spec.backends[0].image or "")
        return real(model, *args)

    monkeypatch.setattr(reconciler, "desired", counted)
    controller = ModelController(ControllerMetrics(), post_event=lambda _b, _ev: None)
    controller.client = RecordingClient()  # type: ignore[assignment]
    body = copy.deepcopy(BODY)
    indexes = {MODEL_INDEX: {("ns", "m"): [body]}}
    log = logging.getLogger("test")
    await controller.reconcile(("ns", "m"), indexes, log)
    body["metadata"]["resourceVersion"] = "2"  # e.g. its own status patch
    body["status"] = {"observedGeneration": 1}
    await controller.reconcile(("ns", "m"), indexes, log)
    assert len(calls) == 1
    body["spec"]["backends"][0]["image"] = "vllm:2"
    await controller.reconcile(("ns", "m"), indexes, log)
    assert calls[-1] == "vllm:2" and len(calls) == 2
    await controller.close()
