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

from controllers.main import ControllerConfig, run_operator

MI_PATH = "/apis/workload.matrixinfer.ai/v1alpha1/namespaces/{ns}/modelinfers"
MODEL_PATH = "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/{ns}/models"
REVIEW_GROUPS = {"authentication.k8s.io", "authorization.k8s.io"}
VERBS = {"list", "watch", "get", "create", "patch", "delete"}


class Emulator(kmock.KubernetesEmulator):
    """kmock plus `metadata.generateName` (Kopf names its Events that way), and a
    `resourceVersion` and `uid` on every created object that has none (as the API server does).

    kmock matches every request against its whole recorded request history, which is quadratic
    over a long run; `history_limit` keeps only the newest requests (the benchmark sets it; tests
    keep everything to inspect it). `handled` counts every request either way.
    """

    _serial: int = 0
    history_limit: int | None = None
    handled: int = 0
    by_kind: dict[str, int] | None = None  # requests by "METHOD plural[/subresource]"

    async def _handle(self, request: Any) -> Any:
        self.handled += 1
        if self.by_kind is not None:
            res = getattr(request, "resource", None)
            sub = getattr(request, "subresource", None)
            kind = f"{request.method} {getattr(res, 'plural', '?')}" + (f"/{sub}" if sub else "")
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        limit = self.history_limit
        if limit is not None and len(self._requests) > 2 * limit:
            del self._requests[:-limit]  # the newest (including this one) stay matchable
        data = getattr(request, "data", None)
        if isinstance(data, dict) and request.method == "POST":
            meta = data.get("metadata")
            if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
                type(self)._serial += 1
                meta["name"] = f"{meta['generateName']}{type(self)._serial:06d}"
            if isinstance(meta, dict) and not meta.get("resourceVersion"):
                # the API server sets it on every object (controllers' creations included)
                type(self)._serial += 1
                meta["resourceVersion"] = str(type(self)._serial)
                meta.setdefault("uid", f"uid-{meta.get('name')}-{type(self)._serial}")
        if getattr(getattr(request, "resource", None), "group", None) in REVIEW_GROUPS:
            # reviews are answered, never stored (the emulator would store each under no name)
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        return await super()._handle(request)


def declare(k: kmock.KubernetesEmulator, volcano: bool = False) -> None:
    res = k.resources
    res["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS)
    res["v1/pods"] = kmock.ResourceInfo(
        kind="Pod", namespaced=True, verbs=VERBS, subresources={"status"}
    )
    res["v1/services"] = kmock.ResourceInfo(kind="Service", namespaced=True, verbs=VERBS)
    res["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS)
    res["v1/configmaps"] = kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs=VERBS)
    res["apps/v1/controllerrevisions"] = kmock.ResourceInfo(
        kind="ControllerRevision", namespaced=True, verbs=VERBS
    )
    res["workload.matrixinfer.ai/v1alpha1/modelinfers"] = kmock.ResourceInfo(
        kind="ModelInfer",
        singular="modelinfer",
        namespaced=True,
        verbs=VERBS,
        subresources={"status", "scale"},
    )
    for plural, kind, group in (
        ("models", "Model", "registry.matrixinfer.ai"),
        ("autoscalingpolicies", "AutoscalingPolicy", "registry.matrixinfer.ai"),
        ("modelservers", "ModelServer", "networking.matrixinfer.ai"),
        ("modelroutes", "ModelRoute", "networking.matrixinfer.ai"),
    ):
        res[f"{group}/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs=VERBS, subresources={"status"}
        )
    res["v1/nodes"] = kmock.ResourceInfo(kind="Node", namespaced=False, verbs=VERBS)
    for plural, kind in (
        ("validatingwebhookconfigurations", "ValidatingWebhookConfiguration"),
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration"),
    ):  # cluster-scoped; the operator keeps them when it serves admission webhooks
        res[f"admissionregistration.k8s.io/v1/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=False, verbs=VERBS
        )
    if volcano:
        res["scheduling.volcano.sh/v1beta1/podgroups"] = kmock.ResourceInfo(
            kind="PodGroup", namespaced=True, verbs=VERBS
        )


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
        while True:
            if not self.paused:
                now = time.monotonic()
                for key in list(self.api.k.objects):
                    resource, maybe_ns, name = key
                    if resource.plural != "pods" or resource.group != "" or maybe_ns is None:
                        continue
                    ns = maybe_ns
                    obj = self.api.k.objects[key]
                    if obj.deleted:
                        self.seen.pop((ns, name), None)
                        continue
                    uid_key = (ns, name)
                    raw = obj.raw
                    if (raw.get("status") or {}).get("phase"):
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
    """The real Kopf operator (standalone, no peering) against the emulator.

    It runs in its own thread and event loop, like a separate process would (and so that Kopf's
    shutdown does not wait for the emulator's own watch-stream tasks).
    """
    stop, ready = threading.Event(), threading.Event()
    config.setdefault("queue_exit_timeout", 0.1)
    config.setdefault("resync_seconds", 5.0)
    cfg = ControllerConfig(namespaces=["ns"], server=api.url, **config)
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run_operator(cfg, stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
    thread.start()
    try:
        await eventually(ready.is_set, 30, "the operator to start")
        yield Operator(thread, stop, ready, errors)
    finally:
        stop.set()
        await eventually(lambda: not thread.is_alive(), 30, "the operator to stop")
    assert not errors, f"the operator failed: {errors!r}"


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
