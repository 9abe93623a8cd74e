"""The ModelInfer reconcile loop: gather what exists, ask the planner, apply its actions.

Thin edge over the pure planner. One loop per ModelInfer (a Kopf daemon) wakes on any event of
the ModelInfer or of its pods and Services, on the planner's own timers, and every `resync`
seconds. What it sees comes from Kopf indexes (filled before any handler starts, so a restarted
operator sees every existing pod before it plans). Its own recent creations and deletions are
overlaid as *expectations* until the watch catches up, so a lagging watch can never make it
believe a pod is missing and recreate or replace a group twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast

import kopf

from controllers.kube import ApiError, KubeClient
from controllers.metrics import ControllerMetrics
from controllers.modelinfer import observe
from controllers.modelinfer.planner import plan as make_plan
from controllers.modelinfer.spec import parse
from controllers.modelinfer.types import (
    API_GROUP,
    API_VERSION,
    LABEL_MODEL_INFER,
    PLURAL,
    ChildToCreate,
    GroupTemplate,
    Observed,
    ObservedPod,
    ObservedPodGroup,
    ObservedService,
    Plan,
    PlannerState,
)

Key = tuple[str, str]  # (namespace, ModelInfer name)
T = TypeVar("T")
CONTROLLER = "modelinfer"
EXPECTATION_TTL = 30.0
GANG_REFRESH = 60.0  # seconds between discoveries of the Volcano PodGroup CRD


def pods_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


def services_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/services" + (f"/{name}" if name else "")


def podgroups_path(ns: str, name: str | None = None) -> str:
    base = f"/apis/scheduling.volcano.sh/v1beta1/namespaces/{ns}/podgroups"
    return base + (f"/{name}" if name else "")


def revisions_path(ns: str, name: str | None = None) -> str:
    return f"/apis/apps/v1/namespaces/{ns}/controllerrevisions" + (f"/{name}" if name else "")


def modelinfer_path(ns: str, name: str, sub: str = "") -> str:
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{ns}/{PLURAL}/{name}"
    return path + (f"/{sub}" if sub else "")


@dataclass(slots=True)
class Expectations:
    """Pods this controller created or deleted that the watch has not reported yet."""

    created: dict[str, tuple[ObservedPod, float]] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)
    # uid of a created pod, once its create answered: an event or index entry of an earlier pod
    # of the same name (deleted for a recreate; Kopf may handle its DELETED after the new pod's
    # ADDED) is not taken for the new pod
    uids: dict[str, str] = field(default_factory=dict)

    def seen_pod(self, name: str, uid: str) -> None:
        """An event of pod ``name``: if it is of the pod this controller created (its uid, once
        the create answered), the index shows it (or its deletion) from now on."""
        known = self.uids.get(name)
        if known is not None and uid == known:
            self.forget(name)

    def forget(self, name: str) -> None:
        self.created.pop(name, None)
        self.uids.pop(name, None)

    def overlay(self, seen: dict[str, ObservedPod], now: float) -> list[ObservedPod]:
        for name, (pod, at) in list(self.created.items()):
            indexed = seen.get(name)
            known = self.uids.get(name)
            if indexed is None:
                mine = False
            elif known is not None and indexed.uid:
                mine = indexed.uid == known
            else:  # not the earlier pod of the name, which this controller deleted
                mine = not indexed.terminating
            if mine or now - at > EXPECTATION_TTL:
                self.forget(name)
            else:
                seen[name] = pod
        for name, at in list(self.deleted.items()):
            gone = seen.get(name)
            if gone is None or gone.terminating or now - at > EXPECTATION_TTL:
                del self.deleted[name]
            elif name not in self.created:
                seen[name] = replace(gone, terminating=True, ready=False)
        return list(seen.values())


@dataclass(slots=True)
class _Loop:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    state: PlannerState = field(default_factory=PlannerState)
    expect: Expectations = field(default_factory=Expectations)
    last_status_patch: float = -1e9  # monotonic


def _status_essentials(status: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must reach the API at once: generation, revisions, each condition's status."""
    conds = tuple(
        sorted((str(c.get("type")), str(c.get("status"))) for c in status.get("conditions") or [])
    )
    return (
        status.get("observedGeneration"),
        status.get("currentRevision"),
        status.get("updateRevision"),
        status.get("labelSelector"),
        conds,
    )


class ModelInferController:
    """Owns the per-ModelInfer loops; Kopf handlers call `wake`, `run` and `cleanup`."""

    def __init__(
        self,
        metrics: ControllerMetrics | None = None,
        resync: float = 30.0,
        clock: Callable[[], float] = time.time,
        debounce: float = 0.05,
        status_interval: float = 1.0,
    ) -> None:
        self.metrics = metrics or ControllerMetrics()
        self.client: KubeClient | None = None
        self.resync = resync
        self.clock = clock
        self.loops: dict[Key, _Loop] = {}
        self.deleting: set[Key] = set()
        self.closing = False  # the operator is shutting down: every loop exits
        self._gang: tuple[bool, float] | None = None
        self._gang_lock: asyncio.Lock | None = None
        self.debounce = debounce  # after a wake-up, let a burst of watch events land first
        self.status_interval = status_interval  # counters-only status patches at most this often

    # ---- wiring ------------------------------------------------------------------------------
    def connect(self, info: kopf.ConnectionInfo) -> None:
        self.client = KubeClient(info)

    async def close(self) -> None:
        """Stop every loop (also ones Kopf respawned late during its own shutdown)."""
        self.closing = True
        for loop in self.loops.values():
            loop.wake.set()
        if self.client is not None:
            await self.client.close()

    def loop_for(self, key: Key) -> _Loop:
        loop = self.loops.get(key)
        if loop is None:
            loop = self.loops[key] = _Loop()
        return loop

    def wake(self, key: Key | None) -> None:
        if key is not None and key in self.loops:
            self.loops[key].wake.set()

    def pod_event(self, key: Key | None, name: str, uid: str = "") -> None:
        """An event of the pod ``name`` (``uid``) of the ModelInfer ``key``: the index shows that
        pod (or its deletion) from now on, so the expectation of creating it is dropped; a pod
        deleted before a pass saw it indexed (Kopf may coalesce its ADDED and DELETED) would
        otherwise count as present until EXPECTATION_TTL, and not be replaced. An event of an
        earlier pod of the same name (a group recreated) leaves it: taken for the new pod, it
        hid that pod, which then looked missing and had its group recreated again, in a loop.
        Wakes the loop."""
        loop = self.loops.get(key) if key is not None else None
        if loop is not None:
            loop.expect.seen_pod(name, uid)
            loop.wake.set()

    async def gang_available(self) -> bool:
        """Discovery of the Volcano PodGroup CRD, cached; one request at a time for all loops."""
        if self._gang_lock is None:
            self._gang_lock = asyncio.Lock()
        async with self._gang_lock:
            now = time.monotonic()
            if self._gang is None or now - self._gang[1] > GANG_REFRESH:
                assert self.client is not None
                served = await self.client.resource_served(
                    "scheduling.volcano.sh/v1beta1", "podgroups"
                )
                self._gang = (served, time.monotonic())
            return self._gang[0]

    # ---- the loop ----------------------------------------------------------------------------
    async def run(
        self,
        key: Key,
        body: Mapping[str, Any],
        stopped: kopf.DaemonStopped,
        indexes: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        """The daemon of one ModelInfer: reconcile, then wait for an event, a timer or resync."""
        loop = self.loop_for(key)
        backoff = 0.5
        try:
            while not stopped.is_set() and key not in self.deleting and not self.closing:
                loop.wake.clear()
                meta = body.get("metadata") or {}
                if meta.get("deletionTimestamp"):
                    break
                delay = self.resync
                try:
                    p = await self.reconcile(key, body, indexes, logger)
                    backoff = 0.5
                    if p.requeue_after is not None:
                        delay = min(delay, max(p.requeue_after, 0.05))
                except Exception as exc:  # one bad reconcile must not kill the loop
                    reason = type(exc).__name__
                    self.metrics.reconcile_errors.labels(CONTROLLER, reason).inc()
                    logger.error(f"reconcile of ModelInfer {key[0]}/{key[1]} failed: {exc}")
                    delay, backoff = backoff, min(backoff * 2, 30.0)
                await self._wait(loop.wake, stopped, delay)
        finally:
            if stopped.is_set() or key in self.deleting or self.closing:
                self.loops.pop(key, None)

    async def _wait(self, wake: asyncio.Event, stopped: kopf.DaemonStopped, delay: float) -> None:
        async def _stop() -> None:
            await stopped.wait()

        waits = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(_stop())}
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        if wake.is_set() and not stopped.is_set():
            await asyncio.sleep(self.debounce)  # one plan for a burst of watch events

    # ---- one reconcile -----------------------------------------------------------------------
    async def observe(
        self, key: Key, body: Mapping[str, Any], indexes: Mapping[str, Any]
    ) -> Observed:
        ns, name = key
        now = self.clock()
        pods: dict[str, ObservedPod] = {}
        for pod in _store(indexes.get("modelinfer_pods"), key, ObservedPod):
            pods[pod.name] = pod
        loop = self.loop_for(key)
        services = tuple(_store(indexes.get("modelinfer_services"), key, ObservedService))
        revisions: dict[str, GroupTemplate] = {
            t.revision: t for t in _store(indexes.get("modelinfer_revisions"), key, GroupTemplate)
        }
        gang = await self.gang_available()
        podgroups: tuple[ObservedPodGroup, ...] = ()
        if gang:
            assert self.client is not None
            listed = await self.client.get(podgroups_path(ns) + _selector(name))
            items = (listed or {}).get("items") or []
            pgs = []
            for item in items:
                if ((item.get("metadata") or {}).get("labels") or {}).get(
                    LABEL_MODEL_INFER
                ) == name:
                    pg = observe.podgroup_from_json(item)
                    if pg is not None and not (item.get("metadata") or {}).get("deletionTimestamp"):
                        pgs.append(pg)
            podgroups = tuple(pgs)
        status = body.get("status") or {}
        return Observed(
            pods=tuple(loop.expect.overlay(pods, now)),
            services=services,
            podgroups=podgroups,
            revisions=revisions,
            gang_available=gang,
            current_revision=status.get("currentRevision"),
            conditions=observe.conditions_from_status(status),
            status=dict(status),
        )

    async def reconcile(
        self,
        key: Key,
        body: Mapping[str, Any],
        indexes: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> Plan:
        started = time.perf_counter()
        try:
            spec = parse(body)  # the one validation of the object; problems go to its status
            observed = await self.observe(key, body, indexes)
            loop = self.loop_for(key)
            p = make_plan(spec, observed, loop.state, self.clock())
            loop.state = p.state
            if p.has_changes:
                logger.debug(
                    f"plan: delete {len(p.delete_pods)} pods, create {len(p.create_pods)} pods, "
                    f"{len(p.create_services)}+/{len(p.delete_services)}- services, "
                    f"relabel {len(p.relabel_pods)}; groups "
                    + ", ".join(f"{k.value}={v}" for k, v in p.groups_by_state.items() if v)
                )
            failures = await self.apply(key, p, logger)
            if p.status is not None:
                since = time.monotonic() - loop.last_status_patch
                urgent = _status_essentials(p.status) != _status_essentials(observed.status)
                if urgent or since >= self.status_interval:
                    assert self.client is not None
                    await self.client.patch(modelinfer_path(*key, "status"), {"status": p.status})
                    loop.last_status_patch = time.monotonic()
                else:  # only counters moved: patch them a little later, together
                    wait = self.status_interval - since
                    p.requeue_after = (
                        wait if p.requeue_after is None else min(p.requeue_after, wait)
                    )
            for ev in p.events:
                kopf.event(
                    cast(kopf.Body, body), type=ev.type, reason=ev.reason, message=ev.message
                )
            self.metrics.set_groups(key[0], key[1], p.groups_by_state)
            if failures:
                p.requeue_after = min(p.requeue_after or 1.0, 1.0)
            return p
        finally:
            self.metrics.reconcile_duration.labels(CONTROLLER).observe(
                time.perf_counter() - started
            )

    async def apply(
        self, key: Key, p: Plan, logger: logging.Logger | logging.LoggerAdapter[Any]
    ) -> int:
        """Apply a plan: deletions, then creations (podgroups before pods). Returns failures."""
        assert self.client is not None
        client = self.client
        ns = key[0]
        loop = self.loop_for(key)
        now = self.clock()
        failures = 0

        async def run(action: str, coro: Any) -> None:
            nonlocal failures
            try:
                await coro
                self.metrics.actions.labels(CONTROLLER, action).inc()
            except (TimeoutError, ApiError, OSError) as exc:
                failures += 1
                self.metrics.reconcile_errors.labels(CONTROLLER, action).inc()
                logger.warning(f"{action} for ModelInfer {ns}/{key[1]} failed: {exc}")

        async def batch(items: Iterable[tuple[str, Any]]) -> None:
            pending = [run(a, c) for a, c in items]
            for i in range(0, len(pending), 16):
                await asyncio.gather(*pending[i : i + 16])

        for name in p.delete_pods:
            loop.expect.deleted[name] = now
            loop.expect.forget(name)
        await batch(
            [("delete_pod", client.delete(pods_path(ns, n))) for n in p.delete_pods]
            + [("delete_service", client.delete(services_path(ns, n))) for n in p.delete_services]
            + [
                ("delete_podgroup", client.delete(podgroups_path(ns, n)))
                for n in p.delete_podgroups
            ]
            + [
                ("delete_revision", client.delete(revisions_path(ns, n)))
                for n in p.delete_revisions
            ]
        )
        await batch(
            [
                ("create_revision", client.create(revisions_path(ns), c.manifest))
                for c in p.create_revisions
            ]
            + [
                ("create_podgroup", client.create(podgroups_path(ns), c.manifest))
                for c in p.create_podgroups
            ]
            + [
                ("patch_podgroup", client.patch(podgroups_path(ns, c.name), c.manifest))
                for c in p.patch_podgroups
            ]
            + [
                ("create_service", client.create(services_path(ns), c.manifest))
                for c in p.create_services
            ]
        )
        for c in p.create_pods:
            pod = observe.pod_from_json(c.manifest, now)
            if pod is not None:
                loop.expect.created[c.name] = (pod, now)
                loop.expect.uids.pop(c.name, None)
        await batch([("create_pod", self._create_pod(ns, c, loop.expect)) for c in p.create_pods])
        await batch(
            [
                (
                    "relabel_pod",
                    client.patch(pods_path(ns, lp.name), {"metadata": {"labels": lp.labels}}),
                )
                for lp in p.relabel_pods
            ]
        )
        return failures

    async def _create_pod(self, ns: str, c: ChildToCreate, expect: Expectations) -> None:
        assert self.client is not None
        made = await self.client.create_object(pods_path(ns), c.manifest)
        # 409: it exists; the watch will say
        uid = str(((made or {}).get("metadata") or {}).get("uid") or "")
        if uid and c.name in expect.created:
            expect.uids[c.name] = uid

    # ---- deletion ----------------------------------------------------------------------------
    async def cleanup(
        self,
        key: Key,
        indexes: Mapping[str, Any],
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> int:
        """Delete every child of a ModelInfer being deleted (no garbage collector is assumed)."""
        assert self.client is not None
        self.deleting.add(key)
        self.wake(key)
        ns, name = key
        loop = self.loops.get(key)
        pods = {p.name for p in _store(indexes.get("modelinfer_pods"), key, ObservedPod)}
        if loop is not None:
            pods.update(loop.expect.created)
        # the API is the truth here: also list, in case the index has not seen a fresh pod yet
        listed = await self.client.get(pods_path(ns) + _selector(name))
        for item in (listed or {}).get("items") or []:
            meta = item.get("metadata") or {}
            if (meta.get("labels") or {}).get(LABEL_MODEL_INFER) == name:
                pods.add(str(meta.get("name")))
        services = {
            s.name for s in _store(indexes.get("modelinfer_services"), key, ObservedService)
        }
        revisions = {
            f"{name}-{t.revision}"
            for t in _store(indexes.get("modelinfer_revisions"), key, GroupTemplate)
        }
        podgroups: set[str] = set()
        if await self.gang_available():
            listed = await self.client.get(podgroups_path(ns) + _selector(name))
            for item in (listed or {}).get("items") or []:
                meta = item.get("metadata") or {}
                if (meta.get("labels") or {}).get(LABEL_MODEL_INFER) == name:
                    podgroups.add(str(meta.get("name")))
        deleted = 0
        for path in (
            [pods_path(ns, n) for n in sorted(pods)]
            + [services_path(ns, n) for n in sorted(services)]
            + [podgroups_path(ns, n) for n in sorted(podgroups)]
            + [revisions_path(ns, n) for n in sorted(revisions)]
        ):
            if await self.client.delete(path):
                deleted += 1
        self.metrics.forget(ns, name)
        self.loops.pop(key, None)
        self.deleting.discard(key)
        logger.info(f"deleted {deleted} children of ModelInfer {ns}/{name}")
        return deleted


def _selector(name: str) -> str:
    """A labelSelector query (an emulator may ignore it: results are filtered again here)."""
    return "?labelSelector=" + urllib.parse.quote(f"{LABEL_MODEL_INFER}={name}")


def _store(index: object, key: Key, kind: type[T]) -> list[T]:
    """What a Kopf index (a mapping of key -> store of values) holds for `key`, of type `kind`."""
    if not isinstance(index, Mapping):
        return []
    store = index.get(key)
    return [v for v in store or () if isinstance(v, kind)]
