"""Kopf handlers writing ModelRoute and ModelServer status (the only writer of it).

Status is recomputed when something it summarises changes, not on a clock: an idle fleet costs
nothing. Indexes: the bodies of ModelServers and ModelRoutes, ModelServer names per namespace,
every ModelRoute's claims on model names and LoRA adapters (``fleet.claims`` decides who serves
a contested name) and its target ModelServers, each ModelServer under each label of its
selector, and a compact view of every pod (namespace, labels, ready) under each of its labels (a
ModelServer checks only the pods of its selector's rarest label, not every pod).

Event handlers mark what an event can change (:class:`StatusWriter`):

- a ModelServer: itself, and the ModelRoutes that target it (``ResolvedRefs``);
- a ModelRoute: itself, and every route claiming a name it claims or claimed (``Accepted``);
- a pod: the ModelServers whose selector it matches, now or before — only when its namespace,
  labels or readiness changed (a pod's other status updates wake nothing).

One worker recomputes the marked objects (pure functions in :mod:`controllers.status.compute`)
and patches a status only when it changed. An object whose status could not be written (a failed
patch, or an error computing it) is marked again after ``RETRY`` seconds, doubled at each failure
in a row up to ``resync``; the others go on. A slow resync (``RESYNC`` seconds) marks everything,
a safety net for a missed event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from controllers.kube import ApiError, KubeClient
from controllers.status.compute import (
    PodView,
    ServerSelector,
    label_keys,
    route_claims,
    route_status,
    route_targets,
    selected_candidates,
    server_selector,
    server_status,
    servers_to_wake,
    taken_names,
)
from fleet.claims import Claim
from fleet.kube import pod_info

__all__ = ["StatusWriter", "register"]

GROUP, VERSION = "networking.matrixinfer.ai", "v1alpha1"
SERVERS, ROUTES = "modelservers", "modelroutes"
BODIES = {SERVERS: "status_server_bodies", ROUTES: "status_route_bodies"}  # plural → index
RESYNC = 300.0  # seconds between two recomputations of everything (a missed event's safety net)
RETRY = 1.0  # seconds before a status not written is tried again (doubled per failure in a row)
CONCURRENCY = 16  # status patches in flight
INDEX_IDS = (
    "gateway_servers",
    "gateway_route_claims",
    "gateway_pods",
    "status_server_bodies",
    "status_route_bodies",
    "status_route_targets",
    "status_server_selectors",
)
Ref = tuple[str, str, str]  # (plural, namespace, name)
log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _validate(raw: Mapping[str, Any]) -> str | None:
    import crds

    doc = {k: v for k, v in raw.items() if k != "status"}
    try:
        crds.parse_object(doc, "ModelRoute")
    except (crds.InvalidObject, ValueError) as exc:
        return str(exc)[:1000]
    return None


def _changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())


def _pod_view(body: Mapping[str, Any], namespace: str | None) -> PodView:
    """A pod as status sees it: ready as the gateway routes to it (``fleet.kube.pod_info``:
    Running, Ready, not terminating) and with an IP."""
    pod = pod_info(body)
    return PodView(namespace or "default", pod.labels, pod.ready and pod.ip is not None)


def _first(index: Any, key: Any) -> Any:
    if not isinstance(index, Mapping):
        return None
    for value in index.get(key) or ():
        return value
    return None


class StatusWriter:
    """Recomputes and patches the status of the ModelRoutes and ModelServers marked dirty."""

    def __init__(self, resync: float = RESYNC) -> None:
        self.resync = resync
        self.client: KubeClient | None = None
        self.indexes: dict[str, Any] = {}  # Kopf's live indexes, from the first event
        self.dirty: dict[Ref, None] = {}  # insertion-ordered set
        # our last patch of each status, and the object's resourceVersion it was computed from:
        # while the index still shows that version, it does not show the patch yet
        self.written: dict[Ref, tuple[str | None, dict[str, Any]]] = {}
        self.pods: dict[str, PodView] = {}  # by uid: what a pod looked like at its last event
        self.claimed: dict[tuple[str, str], set[tuple[str, str]]] = {}  # route → its claims
        self.computed = 0  # status computations (the idle cost: flat while nothing changes)
        self.failures: dict[Ref, int] = {}  # objects whose status failed: failures in a row
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def connect(self, info: kopf.ConnectionInfo) -> None:
        self.client = KubeClient(info)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        if self.dirty:  # marked by events before the start
            self._wake.set()
        self._task = asyncio.create_task(self._run(), name="status-writer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.client is not None:
            await self.client.close()

    # ---- what an event marks ---------------------------------------------------------------
    def observe(self, kwargs: Mapping[str, Any]) -> None:
        if not self.indexes:
            self.indexes = {k: kwargs[k] for k in INDEX_IDS if k in kwargs}

    def mark(self, ref: Ref) -> None:
        self.dirty[ref] = None
        if self._wake is not None:
            self._wake.set()

    def _own_event(self, ref: Ref, deleted: bool) -> None:
        """An event of the object ``ref`` itself: gone, it is forgotten; else marked."""
        if deleted:
            self.written.pop(ref, None)
            self.failures.pop(ref, None)
        else:
            self.mark(ref)

    def server_event(self, ns: str, name: str, deleted: bool) -> None:
        self._own_event((SERVERS, ns, name), deleted)
        for route in self.indexes.get("status_route_targets", {}).get((ns, name), ()):
            self.mark((ROUTES, ns, route))

    def route_event(self, ns: str, name: str, body: Mapping[str, Any], deleted: bool) -> None:
        now = set() if deleted else {(k, c.name) for k, c in route_claims(body)}
        before = self.claimed.pop((ns, name), set())
        if not deleted:
            self.claimed[(ns, name)] = now
        self._own_event((ROUTES, ns, name), deleted)
        claims = self.indexes.get("gateway_route_claims", {})
        for key in before | now:
            for claim in claims.get(key, ()):
                route_ns, _, route_name = claim.route.partition("/")
                self.mark((ROUTES, route_ns, route_name))

    def pod_event(self, uid: str, view: PodView | None) -> None:
        before = self.pods.pop(uid, None)
        if view is not None:
            self.pods[uid] = view
        if before == view:
            return
        by_label = self.indexes.get("status_server_selectors", {})
        for ns, name in servers_to_wake(before, view, lambda key: by_label.get(key, ())):
            self.mark((SERVERS, ns, name))

    # ---- the worker ------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self.resync
        sem = asyncio.Semaphore(CONCURRENCY)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_resync - loop.time()))
            self._wake.clear()
            if loop.time() >= next_resync:
                next_resync = loop.time() + self.resync
                self._mark_all()
            batch, self.dirty = list(self.dirty), {}
            if batch and self.client is not None and self.indexes:
                # one object's failure (a patch refused, a body the computation cannot read)
                # must neither stop the worker nor lose the other objects' marks
                done = await asyncio.gather(
                    *(self._refresh(ref, sem) for ref in batch), return_exceptions=True
                )
                for ref, outcome in zip(batch, done, strict=True):
                    if isinstance(outcome, Exception):
                        self._retry(ref, outcome)
                    else:
                        self.failures.pop(ref, None)
            elif batch:  # not connected or no index yet: keep them for later
                for ref in batch:
                    self.dirty.setdefault(ref, None)
                await asyncio.sleep(RETRY)
                self._wake.set()

    def _mark_all(self) -> None:
        for plural, index_id in BODIES.items():
            for ns, name in list(self.indexes.get(index_id, {})):
                self.dirty[(plural, ns, name)] = None

    async def _refresh(self, ref: Ref, sem: asyncio.Semaphore) -> None:
        plural, ns, name = ref
        body = _first(self.indexes.get(BODIES[plural]), (ns, name))
        if body is None:  # gone (or not indexed yet: its event marks it again)
            self.written.pop(ref, None)
            return
        version = (body.get("metadata") or {}).get("resourceVersion")
        written = self.written.get(ref)
        if written is not None and written[0] == version:
            old = written[1]  # the index does not show our patch yet
        else:  # a later version (our patch, someone else's status edit, a new object): as is
            old = body.get("status") or {}
        raw = {**body, "status": old}
        self.computed += 1
        status = self._server(ns, raw) if plural == SERVERS else self._route(raw)
        if not _changed(old, status):
            return
        assert self.client is not None
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{plural}/{name}/status"
        async with sem:
            try:
                await self.client.patch(path, {"status": status})
            except ApiError as exc:
                if exc.status == 404:  # deleted meanwhile
                    return
                raise
        self.written[ref] = (version, status)

    def retry_delay(self, failures: int) -> float:
        """Seconds before an object whose status failed ``failures`` times in a row is tried
        again: ``RETRY``, doubled per failure, at most ``resync``."""
        return min(RETRY * 2.0 ** min(failures - 1, 30), self.resync)

    def _retry(self, ref: Ref, exc: Exception) -> None:
        failures = self.failures[ref] = self.failures.get(ref, 0) + 1
        delay = self.retry_delay(failures)
        expected = isinstance(exc, (ApiError, TimeoutError, OSError, aiohttp.ClientError))
        log.warning(
            f"status of {ref[0]} {ref[1]}/{ref[2]} not written (failure {failures} in a row), "
            f"retrying in {delay:g}s: {exc!r}",
            exc_info=None if expected else exc,  # a bug: its traceback
        )
        asyncio.get_running_loop().call_later(delay, self.mark, ref)

    def _server(self, ns: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        pods_index = self.indexes.get("gateway_pods", {})
        pods = selected_candidates(ns, server_selector(raw), lambda key: pods_index.get(key, ()))
        return server_status(raw, pods, _now())

    def _route(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        servers = self.indexes.get("gateway_servers", {})
        claims = self.indexes.get("gateway_route_claims", {})

        def exists(ns: str, name: str) -> bool:
            return name in servers.get(ns, ())

        def claims_of(kind: str, name: str) -> list[Claim]:
            return list(claims.get((kind, name), ()))

        return route_status(raw, exists, _validate, _now(), taken_names(raw, claims_of))


def register(registry: kopf.OperatorRegistry, resync: float = RESYNC) -> StatusWriter:
    """Register the status handlers; the writer they feed (connect it at login)."""
    writer = StatusWriter(resync)

    # every indexer and handler here is async: Kopf runs a sync one in a thread per call

    @kopf.index(GROUP, VERSION, SERVERS, id="gateway_servers", registry=registry)
    async def gateway_servers(namespace: str | None, name: str | None, **_: Any) -> Any:
        return {namespace or "default": name}

    async def bodies(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        return {(namespace or "default", name): dict(body)}

    for plural, index_id in BODIES.items():
        kopf.index(GROUP, VERSION, plural, id=index_id, registry=registry)(bodies)

    @kopf.index(GROUP, VERSION, SERVERS, id="status_server_selectors", registry=registry)
    async def server_selectors(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> Any:
        ns = namespace or "default"
        selector = server_selector(body)
        entry = ServerSelector(ns, name, tuple(sorted(selector.items())))
        return {key: entry for key in label_keys(ns, selector)}

    @kopf.index(GROUP, VERSION, ROUTES, id="gateway_route_claims", registry=registry)
    async def gateway_route_claims(body: kopf.Body, **_: Any) -> Any:
        return {(kind, claim.name): claim for kind, claim in route_claims(dict(body))}

    @kopf.index(GROUP, VERSION, ROUTES, id="status_route_targets", registry=registry)
    async def route_target_index(
        namespace: str | None, name: str, body: kopf.Body, **_: Any
    ) -> Any:
        ns = namespace or "default"
        return {(ns, target): name for target in route_targets(body)}

    @kopf.index("pods", id="gateway_pods", registry=registry)
    async def gateway_pods(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
        view = _pod_view(body, namespace)
        return {key: view for key in label_keys(view.namespace, view.labels)}

    @kopf.on.event(GROUP, VERSION, SERVERS, id="modelserver-status", registry=registry)
    async def server_event(
        namespace: str | None, name: str, type: str | None, **kwargs: Any
    ) -> None:
        writer.observe(kwargs)
        writer.server_event(namespace or "default", name, type == "DELETED")

    @kopf.on.event(GROUP, VERSION, ROUTES, id="modelroute-status", registry=registry)
    async def route_event(
        namespace: str | None, name: str, body: kopf.Body, type: str | None, **kwargs: Any
    ) -> None:
        writer.observe(kwargs)
        writer.route_event(namespace or "default", name, dict(body), type == "DELETED")

    @kopf.on.event("pods", id="modelserver-status-pods", registry=registry)
    async def pod_event(
        namespace: str | None, uid: str, body: kopf.Body, type: str | None, **kwargs: Any
    ) -> None:
        writer.observe(kwargs)
        view = None if type == "DELETED" else _pod_view(body, namespace)
        writer.pod_event(uid, view)

    @kopf.on.startup(id="status-writer-start", registry=registry)
    async def start(**_: Any) -> None:
        await writer.start()

    @kopf.on.cleanup(id="status-writer-stop", registry=registry)
    async def stop(**_: Any) -> None:
        await writer.close()

    return writer
