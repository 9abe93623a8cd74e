"""The Model reconcile: read the Model and its children, ask the planner, apply, write status.

Thin edge over :mod:`controllers.model.planner` and :mod:`controllers.model.status`. What exists
comes from Kopf indexes (filled before any handler runs, so a restarted operator sees every
child before it plans). A reconcile of one Model runs at a time; a request that arrives while
one runs makes it run once more afterwards, so a burst of child events costs at most two.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

from controllers.kube import ApiError, KubeClient
from controllers.metrics import ControllerMetrics
from controllers.model.observe import child_from_json
from controllers.model.planner import desired, owns, plan
from controllers.model.pod import DEFAULT_RUNTIME_IMAGE
from controllers.model.status import child_problems, model_status
from controllers.model.types import (
    CHILD_KINDS,
    LABEL_MODEL,
    Action,
    ChildKind,
    ChildRef,
    Desired,
    EventNote,
    ObservedChild,
    Problem,
    model_path,
)
from crds.loading import InvalidObject, parse_object
from crds.registry import Model

Key = tuple[str, str]  # (namespace, Model name)
CONTROLLER = "model"
MODEL_INDEX = "model_objects"
CHILD_INDEXES = tuple(f"model_{info.plural}" for info in CHILD_KINDS.values())
Logger = logging.Logger | logging.LoggerAdapter[Any]
RETRY_FIRST, RETRY_MAX = 0.5, 30.0  # seconds before a failed reconcile is tried again
# seconds a child this controller created counts as observed while the watch has not shown it
CREATED_TTL = 60.0
_VOLATILE = ("resourceVersion", "managedFields")  # metadata that says nothing about the spec


def name_key(ns: str, kind: str, name: str) -> tuple[str, str, str, str]:
    """Index key of a child by name (every object of the kind)."""
    return ("name", ns, kind, name)


def model_key(ns: str, model: str) -> tuple[str, str, str]:
    """Index key of the children labelled with a Model's name."""
    return ("model", ns, model)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    again: bool = False
    backoff: float = RETRY_FIRST
    retry: asyncio.TimerHandle | None = None


class ModelController:
    """Reconciles Models; Kopf handlers call :meth:`reconcile` and :meth:`cleanup`."""

    def __init__(
        self,
        metrics: ControllerMetrics | None = None,
        post_event: Callable[[Mapping[str, Any], EventNote], None] | None = None,
        runtime_image: str = DEFAULT_RUNTIME_IMAGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics or ControllerMetrics()
        self.runtime_image = runtime_image  # the downloader, sidecar and PD proxy in the pods
        self.post_event = post_event or _kopf_event
        self.client: KubeClient | None = None
        self.slots: dict[Key, _Slot] = {}
        self.deleting: set[Key] = set()
        self.states: dict[Key, str] = {}
        self.closing = False  # the operator is shutting down
        self._tasks: set[asyncio.Future[None]] = set()  # retries in flight
        # per Model, the status last written and the one whose transitions were last
        # announced: the Model index may not show either yet. They differ when a status write
        # failed; its Events are not posted twice when the write is retried, and a write whose
        # answer was lost cannot swallow its Events.
        self.written: dict[Key, dict[str, Any]] = {}
        self.announced: dict[Key, dict[str, Any]] = {}
        # per Model, the children this controller created (or found at a 409) that its indexes
        # may not show yet, with when: a reconcile woken by the first child's event must not
        # create the last one again. Dropped once an index shows the child, or after CREATED_TTL.
        self.created: dict[Key, dict[ChildRef, tuple[float, ObservedChild]]] = {}
        self.clock = clock
        # per Model, its object's fingerprint and what _desired made of it
        self.parsed: dict[Key, tuple[str, tuple[Model | None, Desired | None, Problem | None]]] = {}

    def connect(self, info: kopf.ConnectionInfo) -> None:
        self.client = KubeClient(info)

    async def close(self) -> None:
        """Refuse new reconciles and close the client."""
        self.closing = True
        for slot in self.slots.values():
            if slot.retry is not None:
                slot.retry.cancel()
        if self.client is not None:
            await self.client.close()

    # ---- entry points ------------------------------------------------------------------------
    async def reconcile(
        self,
        key: Key,
        indexes: Mapping[str, Any],
        logger: Logger,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        """Reconcile the Model ``key`` (its body from ``body`` or the Model index)."""
        slot = self.slots.setdefault(key, _Slot())
        if slot.lock.locked():
            slot.again = True  # the running reconcile goes once more
            return
        async with slot.lock:
            while True:
                slot.again = False
                current = body if body is not None else _model_body(indexes, key)
                body = None
                if current is None or key in self.deleting or self.closing:
                    return
                if (current.get("metadata") or {}).get("deletionTimestamp"):
                    return
                ok = await self._timed(key, current, indexes, logger)
                if not ok:
                    self._retry_later(key, slot, indexes, logger)
                    return
                slot.backoff = RETRY_FIRST
                if not slot.again:
                    return

    def _retry_later(
        self, key: Key, slot: _Slot, indexes: Mapping[str, Any], logger: Logger
    ) -> None:
        """Reconcile ``key`` again after a growing delay (a failed write or a dropped
        connection must not wait for the next event or resync)."""
        if slot.retry is not None or self.closing:
            return

        def fire() -> None:
            slot.retry = None
            task = asyncio.ensure_future(self.reconcile(key, indexes, logger))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        slot.retry = asyncio.get_running_loop().call_later(slot.backoff, fire)
        slot.backoff = min(slot.backoff * 2, RETRY_MAX)

    async def _timed(
        self, key: Key, body: Mapping[str, Any], indexes: Mapping[str, Any], logger: Logger
    ) -> bool:
        """One reconcile, measured; False when it failed (it is retried later)."""
        started = time.perf_counter()
        try:
            return await self._reconcile_once(key, body, indexes, logger)
        except Exception as exc:  # one bad reconcile must not stop the others
            self.metrics.reconcile_errors.labels(CONTROLLER, type(exc).__name__).inc()
            logger.error(f"reconcile of Model {key[0]}/{key[1]} failed: {exc!r}")
            return False
        finally:
            self.metrics.reconcile_duration.labels(CONTROLLER).observe(
                time.perf_counter() - started
            )

    async def _reconcile_once(
        self, key: Key, body: Mapping[str, Any], indexes: Mapping[str, Any], logger: Logger
    ) -> bool:
        ns, name = key
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        model, want, invalid = self._desired(key, body)
        problems: list[Problem] = [] if invalid is None else [invalid]
        backends: list[str] = []
        infers: dict[str, ObservedChild | None] = {}
        missing: tuple[ChildRef, ...] = ()
        if model is not None and want is not None:
            observed = self.known_children(key, observe_children(indexes, ns, name, want))
            p = plan(want, observed, name, uid)
            missing = p.missing
            problems += p.problems
            problems += await self.apply(ns, p.actions, logger, model=name)
            ours = [o for o in observed if owns(name, uid, o)]
            problems += child_problems(ours)
            by_ref = {o.ref: o for o in ours}
            backends = [b.name for b in model.spec.backends]
            for d in want.children:
                if d.ref.kind == "ModelInfer" and d.backend is not None:
                    infers[d.backend] = by_ref.get(d.ref)
        stored = body.get("status") or {}
        sp = model_status(
            generation=meta.get("generation"),
            backends=backends,
            infers=infers,
            missing=missing,
            problems=problems,
            spec_valid=model is not None,
            previous=self.announced.get(key) or stored,
            now=_now(),
        )
        for ev in sp.events:
            self.post_event(body, ev)
        self.announced[key] = sp.status
        if _differs(self.written.get(key) or stored, sp.status):
            assert self.client is not None
            await self.client.patch(model_path(ns, name, "status"), {"status": sp.status})
            self.written[key] = sp.status
        self.states[key] = sp.state
        self._publish_states()
        return not any(p.reason == "ApplyFailed" for p in problems)

    def _desired(
        self, key: Key, body: Mapping[str, Any]
    ) -> tuple[Model | None, Desired | None, Problem | None]:
        """The parsed Model and what it generates, or the problem with its spec. Most
        reconciles are woken by a child's event with the Model unchanged: the result is kept
        per Model until its object (status and resourceVersion aside) changes."""
        doc = {k: v for k, v in body.items() if k != "status"}
        meta = {k: v for k, v in (doc.get("metadata") or {}).items() if k not in _VOLATILE}
        fingerprint = json.dumps({**doc, "metadata": meta}, sort_keys=True, default=str)
        cached = self.parsed.get(key)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        ns = key[0]
        result: tuple[Model | None, Desired | None, Problem | None]
        try:
            parsed = parse_object(doc, f"namespace {ns}")
            assert isinstance(parsed, Model)
            parsed.metadata.namespace = parsed.metadata.namespace or ns
            result = (parsed, desired(parsed, self.runtime_image), None)
        except InvalidObject as exc:
            result = (None, None, Problem("InvalidSpec", str(exc)))
        self.parsed[key] = (fingerprint, result)
        return result

    def known_children(self, key: Key, observed: list[ObservedChild]) -> list[ObservedChild]:
        """``observed`` (from the indexes) plus the children this controller created for the
        Model ``key`` that the indexes do not show yet."""
        created = self.created.get(key)
        if not created:
            return observed
        seen = {o.ref for o in observed}
        now = self.clock()
        for ref, (since, _) in list(created.items()):
            if ref in seen or now - since > CREATED_TTL:
                del created[ref]
        if not created:
            del self.created[key]
            return observed
        return observed + [child for _, child in created.values()]

    def child_event(self, key: Key, ref: ChildRef) -> None:
        """An event of the child ``ref`` of the Model ``key``: the indexes show that child (or
        its deletion) from now on, so what this controller remembers of creating it is dropped.
        Otherwise a child deleted before any reconcile saw it indexed would count as present
        until CREATED_TTL, and not be created again."""
        created = self.created.get(key)
        if created is not None and created.pop(ref, None) is not None and not created:
            del self.created[key]

    def _remember(self, ns: str, model: str, kind: ChildKind, body: object) -> None:
        child = child_from_json(kind, body) if isinstance(body, Mapping) else None
        if model and child is not None:
            self.created.setdefault((ns, model), {})[child.ref] = (self.clock(), child)

    async def apply(
        self, ns: str, actions: Iterable[Action], logger: Logger, model: str = ""
    ) -> list[Problem]:
        """Creations, then patches, then deletions (a route drops a target before its
        ModelServer goes). Failed writes come back as ApplyFailed problems. A child created
        for ``model`` is remembered (:meth:`known_children`); a create that meets an existing
        child (409) reads it instead, so the next plan patches what differs."""
        assert self.client is not None
        order = {"create": 0, "patch": 1, "delete": 2}
        problems: list[Problem] = []
        for a in sorted(actions, key=lambda a: order[a.verb]):
            path = CHILD_KINDS[a.ref.kind].path(ns, None if a.verb == "create" else a.ref.name)
            try:
                if a.verb == "create":
                    assert a.body is not None
                    if await self.client.create(path, a.body):
                        self._remember(ns, model, a.ref.kind, a.body)
                    else:  # it exists (409): what it is now, for the next plan to patch
                        found = await self.client.get(f"{path}/{a.ref.name}")
                        self._remember(ns, model, a.ref.kind, found)
                elif a.verb == "patch":
                    assert a.body is not None
                    await self.client.patch(path, a.body)
                else:
                    await self.client.delete(path)
            except (TimeoutError, ApiError, OSError, aiohttp.ClientError) as exc:
                self.metrics.reconcile_errors.labels(CONTROLLER, a.verb).inc()
                logger.warning(f"{a.verb} {a.ref} in {ns} failed: {exc}")
                problems.append(Problem("ApplyFailed", f"{a.verb} {a.ref}: {exc}"))
                continue
            self.metrics.actions.labels(CONTROLLER, f"{a.verb}_{a.ref.kind}").inc()
            logger.info(f"{a.verb}d {a.ref}")
        return problems

    # ---- deletion ----------------------------------------------------------------------------
    async def cleanup(self, key: Key, uid: str, indexes: Mapping[str, Any], logger: Logger) -> int:
        """Delete every child of a Model being deleted. A cluster's garbage collector would do
        it through the owner references too; this does not rely on one."""
        assert self.client is not None
        self.deleting.add(key)
        ns, name = key
        refs: set[ChildRef] = set()
        for index_id in CHILD_INDEXES:
            for c in _store(indexes.get(index_id), model_key(ns, name)):
                if owns(name, uid, c):
                    refs.add(c.ref)
        # the API is the truth here: also list, in case an index has not seen a fresh child
        query = "?labelSelector=" + urllib.parse.quote(f"{LABEL_MODEL}={name}")
        for kind, info in CHILD_KINDS.items():
            listed = await self.client.get(info.path(ns) + query)
            for item in (listed or {}).get("items") or []:
                listed_child = child_from_json(kind, item)
                if listed_child is not None and owns(name, uid, listed_child):
                    refs.add(listed_child.ref)
        deleted = 0
        for ref in sorted(refs, key=lambda r: (r.kind, r.name)):
            if await self.client.delete(CHILD_KINDS[ref.kind].path(ns, ref.name)):
                deleted += 1
        self.states.pop(key, None)
        slot = self.slots.pop(key, None)
        if slot is not None and slot.retry is not None:
            slot.retry.cancel()
        self.written.pop(key, None)
        self.announced.pop(key, None)
        self.created.pop(key, None)
        self.parsed.pop(key, None)
        self._publish_states()
        self.deleting.discard(key)
        logger.info(f"deleted {deleted} children of Model {ns}/{name}")
        return deleted

    def _publish_states(self) -> None:
        counts = {"Active": 0, "Failed": 0, "Initializing": 0}
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        self.metrics.set_models(counts)


def observe_children(
    indexes: Mapping[str, Any], ns: str, model: str, want: Desired
) -> list[ObservedChild]:
    """The objects labelled with this Model, plus any object holding a name it wants."""
    seen: dict[ChildRef, ObservedChild] = {}
    for index_id in CHILD_INDEXES:
        for c in _store(indexes.get(index_id), model_key(ns, model)):
            seen[c.ref] = c
    by_kind = dict(zip(CHILD_KINDS, CHILD_INDEXES, strict=True))
    for ref in [d.ref for d in want.children] + list(want.held):
        if ref not in seen:
            for c in _store(indexes.get(by_kind[ref.kind]), name_key(ns, ref.kind, ref.name)):
                seen[c.ref] = c
    return list(seen.values())


def _kopf_event(body: Mapping[str, Any], ev: EventNote) -> None:
    """Post a Kubernetes Event on the Model through Kopf's event poster."""
    kopf.event(cast(kopf.Body, body), type=ev.type, reason=ev.reason, message=ev.message)


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _model_body(indexes: Mapping[str, Any], key: Key) -> Mapping[str, Any] | None:
    index = indexes.get(MODEL_INDEX)
    if not isinstance(index, Mapping):
        return None
    for body in index.get(key) or ():
        if isinstance(body, Mapping):
            return body
    return None


def _store(index: object, key: object) -> list[ObservedChild]:
    if not isinstance(index, Mapping):
        return []
    return [v for v in index.get(key) or () if isinstance(v, ObservedChild)]
