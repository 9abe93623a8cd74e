"""The emulated Kubernetes API (kmock) plus a fake kubelet, for running the real operator.

kmock does no label selectors, no defaulting and no garbage collection, and runs no pods: the
`Kubelet` here marks new pods Running+Ready (through the API, so watchers see it), optionally with
a delay, and the operator deletes children itself on finalization.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kmock

from controllers.main import ControllerConfig
from matrixinfer.localcluster import REVIEW_GROUPS, VERBS, Emulator, OperatorThread, declare

__all__ = [
    "REVIEW_GROUPS",
    "VERBS",
    "Api",
    "Emulator",
    "Kubelet",
    "Operator",
    "Reviews",
    "declare",
    "emulator",
    "eventually",
    "operator",
    "ready_status",
    "serve_logs",
    "serve_reviews",
]

MI_PATH = "/apis/workload.matrixinfer.ai/v1alpha1/namespaces/{ns}/modelinfers"
MODEL_PATH = "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/{ns}/models"


@dataclass
class Reviews:
    """TokenReview and SubjectAccessReview as an API server with RBAC would answer them:
    ``tokens`` maps a bearer token to a user name; ``allow(user, attributes)`` decides each
    SubjectAccessReview (``attributes``: its spec.resourceAttributes). Every review is kept."""

    tokens: dict[str, str]
    allow: Callable[[str, dict[str, Any]], bool]
    seen: list[dict[str, Any]] = field(default_factory=list)

    def token_review(self, request: Any) -> dict[str, Any]:
        token = str(((request.data or {}).get("spec") or {}).get("token", ""))
        self.seen.append({"kind": "TokenReview", "token": token})
        user = self.tokens.get(token)
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is not None:
            status["user"] = {"username": user, "uid": f"uid-{user}", "groups": ["users"]}
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}

    def access_review(self, request: Any) -> dict[str, Any]:
        spec = (request.data or {}).get("spec") or {}
        attrs = dict(spec.get("resourceAttributes") or {})
        self.seen.append({"kind": "SubjectAccessReview", "user": spec.get("user"), **attrs})
        ok = self.allow(str(spec.get("user")), attrs)
        status = {"allowed": ok, "reason": "" if ok else "RBAC: no rule allows it"}
        return {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "status": status,
        }


def serve_reviews(k: kmock.KubernetesEmulator, reviews: Reviews) -> None:
    """Answer TokenReview and SubjectAccessReview creations with ``reviews``."""
    k["post /apis/authentication.k8s.io/v1/tokenreviews"] << reviews.token_review
    k["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << reviews.access_review


LogSource = str | Callable[[], AsyncIterator[bytes]]


def serve_logs(k: kmock.KubernetesEmulator, logs: dict[tuple[str, str], LogSource]) -> None:
    """Serve ``GET .../pods/<name>/log`` from ``logs[(namespace, pod)]``: a text (sent whole,
    then the end), or a function returning the chunks as they come (a followed log)."""

    def log(request: Any) -> Any:
        source = logs.get((request.namespace, request.name))
        if source is None:
            raise kmock.KubernetesObjectNotFoundError()
        if isinstance(source, str):
            return source.encode()  # bytes: served raw (a str would go out as JSON)
        return source()  # an async generator: kmock streams each chunk as it is yielded

    k[kmock.method.GET, kmock.subresource("log")] << log


@dataclass
class Api:
    """Test-side client of the emulator (what kubectl would do)."""

    k: Emulator
    url: str
    session: aiohttp.ClientSession
    rv: int = 1000

    def objects(
        self, group_version_plural: str, ns: str | None = "ns"
    ) -> dict[str, dict[str, Any]]:
        """Objects of one kind in namespace ``ns`` (None: cluster-scoped objects)."""
        out: dict[str, dict[str, Any]] = {}
        for key in list(self.k.objects):
            resource, namespace, name = key
            gvp = "/".join(x for x in (resource.group, resource.version, resource.plural) if x)
            if gvp == group_version_plural and namespace == ns:
                obj = self.k.objects[key]
                if not obj.deleted:
                    out[name] = obj.raw
        return out

    def pods(self, ns: str = "ns") -> dict[str, dict[str, Any]]:
        return self.objects("v1/pods", ns)

    def services(self, ns: str = "ns") -> dict[str, dict[str, Any]]:
        return self.objects("v1/services", ns)

    def modelinfer(self, name: str, ns: str = "ns") -> dict[str, Any] | None:
        return self.objects("workload.matrixinfer.ai/v1alpha1/modelinfers", ns).get(name)

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as r:
            text = await r.text()
            assert r.status < 400, f"{method} {path}: {r.status} {text[:300]}"
            return text

    async def _create(self, path: str, obj: dict[str, Any]) -> None:
        """POST ``obj`` with what the API server would set (uid, resourceVersion, generation)."""
        obj = dict(obj)
        meta = dict(obj["metadata"])
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = self.next_rv()
        meta.setdefault("generation", 1)
        meta.setdefault("namespace", "ns")
        obj["metadata"] = meta
        await self.request("POST", path.format(ns=meta["namespace"]), obj)

    async def _patch_spec(
        self, path: str, current: dict[str, Any] | None, spec_patch: dict[str, Any]
    ) -> None:
        """A spec change: the API server bumps generation and resourceVersion."""
        assert current is not None
        gen = int(current["metadata"].get("generation", 1)) + 1
        body = {
            "spec": spec_patch,
            "metadata": {"generation": gen, "resourceVersion": self.next_rv()},
        }
        await self.request("PATCH", path, body)

    async def create_modelinfer(self, obj: dict[str, Any]) -> None:
        await self._create(MI_PATH, obj)

    async def patch_modelinfer(self, name: str, spec_patch: dict[str, Any], ns: str = "ns") -> None:
        path = MI_PATH.format(ns=ns) + f"/{name}"
        await self._patch_spec(path, self.modelinfer(name, ns), spec_patch)

    def model(self, name: str, ns: str = "ns") -> dict[str, Any] | None:
        return self.objects("registry.matrixinfer.ai/v1alpha1/models", ns).get(name)

    async def create_model(self, obj: dict[str, Any]) -> None:
        await self._create(MODEL_PATH, obj)

    async def patch_model(self, name: str, spec_patch: dict[str, Any], ns: str = "ns") -> None:
        path = MODEL_PATH.format(ns=ns) + f"/{name}"
        await self._patch_spec(path, self.model(name, ns), spec_patch)

    async def delete_model(self, name: str, ns: str = "ns") -> None:
        await self.delete(MODEL_PATH.format(ns=ns) + f"/{name}")

    async def delete(self, path: str) -> None:
        await self.request("DELETE", path)

    async def delete_modelinfer(self, name: str, ns: str = "ns") -> None:
        await self.delete(MI_PATH.format(ns=ns) + f"/{name}")

    async def patch_pod_status(self, name: str, status: dict[str, Any], ns: str = "ns") -> None:
        await self.request(
            "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status}
        )


def ready_status() -> dict[str, Any]:
    now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
    }


@dataclass
class Kubelet:
    """Marks pods Running+Ready `delay` seconds after they appear (per pod, via the API)."""

    api: Api
    delay: float = 0.0
    interval: float = 0.02
    seen: dict[tuple[str, str], float] = field(default_factory=dict)
    paused: bool = False

    async def run(self) -> None:
        # a pod looked at and found deleted or with a phase is not looked at again until it has
        # a new version (kmock keeps every version): at 500 Models the scan of every pod each
        # tick was half of the emulator thread's samples
        settled: dict[tuple[Any, ...], tuple[int, int]] = {}  # key → (id of its object, versions)
        while True:
            if not self.paused:
                now = time.monotonic()
                objects = self.api.k.objects
                items = getattr(objects, "_objects", None)  # kmock's own dict: no view per key
                pairs = list(items.items()) if isinstance(items, dict) else list(objects.items())
                for key, obj in pairs:
                    resource, maybe_ns, name = key
                    if resource.plural != "pods" or resource.group != "" or maybe_ns is None:
                        continue
                    versions = (id(obj), len(obj.history))
                    if settled.get(key) == versions:
                        continue
                    ns = maybe_ns
                    if obj.deleted:
                        self.seen.pop((ns, name), None)
                        settled[key] = versions
                        continue
                    uid_key = (ns, name)
                    raw = obj.raw
                    if (raw.get("status") or {}).get("phase"):
                        settled[key] = versions
                        continue
                    first = self.seen.setdefault(uid_key, now)
                    if now - first >= self.delay:
                        with contextlib.suppress(AssertionError, aiohttp.ClientError):
                            await self.api.patch_pod_status(name, ready_status(), ns)
            await asyncio.sleep(self.interval)


@contextlib.asynccontextmanager
async def emulator(volcano: bool = False, history_limit: int | None = None) -> AsyncIterator[Api]:
    async with Emulator() as k, kmock.Server(k) as srv:
        k.history_limit = history_limit
        declare(k, volcano)
        async with aiohttp.ClientSession() as session:
            yield Api(k, str(srv.url).rstrip("/"), session)


@dataclass
class Operator:
    thread: threading.Thread
    stop: threading.Event
    ready: threading.Event
    errors: list[BaseException]


@contextlib.asynccontextmanager
async def operator(api: Api, **config: Any) -> AsyncIterator[Operator]:
    """The real Kopf operator (standalone, no peering) against the emulator, in its own thread
    (:class:`matrixinfer.localcluster.OperatorThread`)."""
    config.setdefault("queue_exit_timeout", 0.1)
    config.setdefault("resync_seconds", 5.0)
    op = OperatorThread(ControllerConfig(namespaces=["ns"], server=api.url, **config))
    op.start()
    assert op.thread is not None
    try:
        await eventually(op.ready.is_set, 30, "the operator to start")
        yield Operator(op.thread, op.stop_flag, op.ready, op.errors)
    finally:
        op.stop_flag.set()
        await eventually(lambda: not op.alive(), 30, "the operator to stop")
    assert not op.errors, f"the operator failed: {op.errors!r}"


async def eventually(check: Callable[[], Any], within: float = 45.0, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` after `within` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (AssertionError, KeyError) as exc:
            last = exc
            last_ok = False
        else:
            last_ok = bool(last)
        if last_ok:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what or check}: last={last!r}")
