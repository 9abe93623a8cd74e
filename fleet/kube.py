"""Configuration from the Kubernetes API: ModelRoute, ModelServer, Pods and the extproc Service.

One list + watch loop per kind (aiohttp, the API's plain HTTP watch): the list replaces the kind's
objects, the watch applies ADDED / MODIFIED / DELETED (BOOKMARKs move the resourceVersion); when a
watch ends or drops (network error, 410 Gone, API server restart) the kind is listed again — a
resync, so nothing missed while disconnected is lost. Changes are debounced and turned into one
:class:`~extproc.datastore.GatewayConfig` for ``Datastore.apply`` (and for the xDS generator,
which uses the same source).

- ModelRoute / ModelServer objects are validated by :mod:`crds` one by one: an invalid object is
  skipped with a log line naming it and the field (the others still apply);
- pods are kept only in a compact form (name, namespace, labels, IP, ready); a pod is an endpoint
  when a ModelServer of its namespace selects it (``matchLabels``; the API here may not filter
  by label, so the selection is done in this module), it has an IP, and it is ``Running`` with
  condition ``Ready=True`` (otherwise it is listed as not ready and the scheduler skips it).
- status is not written here: the controllers are its only writer.
- **Secrets** (only those named, policies on): the API-key Secret (``--api-keys-secret`` /
  ``apiKeysSecret``) and the Secrets named by the routes' ``rateLimit.global.redis.
  passwordSecretRef``. Each is listed and watched on its own with ``fieldSelector=metadata.name=``
  (so RBAC can grant ``resourceNames``; the name is checked here too, as emulators ignore field
  selectors); ``on_secret(namespace, name, secret or None)`` is called on every change. The set
  follows the routes: a Secret no route names any more is no longer watched.

Connection and credentials: :mod:`fleet.kubeconfig` (``--server``, ``--kubeconfig``,
``--context``, in-cluster; tokens refreshed, a 401 reloads them). The list + watch loop is
hand-written over aiohttp and orjson rather than ``kubernetes_asyncio``'s typed ``Watch``: on 2,000
pod events that deserialises 1.5k events/s against 18-60k here (``python -m bench.kube_watch
--typed``), and the datastore only needs a few fields of each pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson

from crds.networking import ModelRoute, ModelServer
from fleet.config import GatewayConfig, StaticEndpoint
from fleet.kubeconfig import KubeAccess, KubeCredentials
from fleet.pods import selects

__all__ = [
    "KINDS",
    "KubeSource",
    "PodInfo",
    "ReloadStatus",
    "extproc_endpoints",
    "pod_info",
    "route_secret_refs",
]

_Parsed = TypeVar("_Parsed", ModelRoute, ModelServer)

log = logging.getLogger("matrixinfer.extproc.kube")

# kind -> (API prefix, plural)
KINDS: dict[str, tuple[str, str]] = {
    "ModelRoute": ("/apis/networking.matrixinfer.ai/v1alpha1", "modelroutes"),
    "ModelServer": ("/apis/networking.matrixinfer.ai/v1alpha1", "modelservers"),
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
}


@dataclass(slots=True)
class ReloadStatus:
    applied: int = 0
    rejected: int = 0
    last_error: str | None = None
    resyncs: int = 0  # lists after the first one (a watch ended or dropped)
    synced: bool = False


@dataclass(slots=True, frozen=True)
class PodInfo:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str | None
    ready: bool


def pod_info(raw: Mapping[str, Any]) -> PodInfo:
    meta = raw.get("metadata") or {}
    status = raw.get("status") or {}
    conditions = status.get("conditions") or []
    ready = status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )
    if meta.get("deletionTimestamp"):
        ready = False  # terminating: leaves the rotation now
    return PodInfo(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace") or "default"),
        labels=dict(meta.get("labels") or {}),
        ip=status.get("podIP") or None,
        ready=ready,
    )


def _key(raw: Mapping[str, Any]) -> tuple[str, str]:
    meta = raw.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name", "")))


class KubeSource:
    """List + watch the four kinds; ``apply(GatewayConfig)`` after each (debounced) change.

    Same interface as ``ConfigWatcher``: ``status``, ``load_now()``, ``start()``, ``stop()``.
    """

    def __init__(
        self,
        access: KubeAccess | KubeCredentials | str | None,
        apply: Callable[[GatewayConfig], None],
        *,
        namespace: str | None = None,
        debounce: float = 0.05,
        watch_timeout: int = 300,
        backoff: float = 0.5,
        on_result: Callable[[bool], None] | None = None,
        secrets: Iterable[tuple[str, str]] = (),
        route_secrets: bool = False,
        on_secret: Callable[[str, str, Mapping[str, Any] | None], None] | None = None,
    ) -> None:
        # a URL string: that server without credentials (tests, emulators)
        self.access = (
            access if isinstance(access, KubeAccess | KubeCredentials) else KubeAccess(access)
        )
        self.credentials: KubeCredentials | None = (
            access if isinstance(access, KubeCredentials) else None
        )
        self.apply = apply
        self.namespace = namespace
        self.debounce = debounce
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.on_result = on_result
        self.status = ReloadStatus()
        self.routes: dict[tuple[str, str], dict[str, Any]] = {}
        self.servers: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self._listed: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._connect_lock = asyncio.Lock()
        self.invalid: dict[str, str] = {}  # "Kind ns/name" -> error, for /debug/state
        # Secrets: always watched (the API keys), and watched while a route names them (Redis)
        self.static_secrets = frozenset(secrets)
        self.route_secrets = route_secrets
        self.on_secret = on_secret
        self.secrets: dict[tuple[str, str], dict[str, Any] | None] = {}  # None: listed, absent
        self._secret_tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    # ---- lifecycle ----------------------------------------------------------------------------
    async def connect(self) -> KubeCredentials:
        """Load the credentials (once); :class:`~fleet.kubeconfig.KubeConfigError` when there
        are none. Programs call it before anything else, to fail at once with one line; the
        watches call it too (``start()`` without ``connect()`` works for a ``--server`` URL)."""
        async with self._connect_lock:
            if self.credentials is None:
                assert isinstance(self.access, KubeAccess)
                self.credentials = await self.access.load()
            if self._session is None:
                self._session = self.credentials.session(
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
                )
            return self.credentials

    def load_now(self) -> bool:
        log.info("waiting for the first list of %s from the Kubernetes API", ", ".join(KINDS))
        return False

    def start(self) -> None:
        if self._tasks:
            return
        for kind in KINDS:
            self._tasks.append(asyncio.create_task(self._watch(kind), name=f"kube-watch-{kind}"))
        self._tasks.append(asyncio.create_task(self._apply_loop(), name="kube-apply"))
        self.watch_secrets(self.static_secrets)

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._secret_tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._secret_tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- list + watch -------------------------------------------------------------------------
    def _path(self, kind: str) -> str:
        prefix, plural = KINDS[kind]
        if self.namespace:
            return f"{prefix}/namespaces/{self.namespace}/{plural}"
        return f"{prefix}/{plural}"

    def _store(self, kind: str) -> dict[tuple[str, str], Any]:
        stores: dict[str, dict[tuple[str, str], Any]] = {
            "ModelRoute": self.routes,
            "ModelServer": self.servers,
            "Pod": self.pods,
            "Service": self.services,
        }
        return stores[kind]

    def _put(self, kind: str, raw: dict[str, Any]) -> None:
        store = self._store(kind)
        store[_key(raw)] = pod_info(raw) if kind == "Pod" else raw

    async def _get(
        self, url: str, params: Mapping[str, str] | None = None, limit: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """GET ``url`` (a path on the API server) with the current credentials."""
        credentials = await self.connect()
        assert self._session is not None
        extra: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=limit)} if limit else {}
        return credentials.request(
            self._session, "GET", credentials.base + url, params=params, **extra
        )

    async def _list(self, kind: str) -> str:
        async with await self._get(self._path(kind), limit=30) as resp:
            if resp.status >= 400:
                raise RuntimeError(f"list {kind}: HTTP {resp.status}: {(await resp.text())[:200]}")
            data = orjson.loads(await resp.read())
        store = self._store(kind)
        store.clear()
        for item in data.get("items") or []:
            self._put(kind, item)
        if kind in self._listed:
            self.status.resyncs += 1
        self._listed.add(kind)
        self._dirty.set()
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_params(self, rv: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Query of a watch from resource version ``rv`` (bookmarks on, server-side timeout)."""
        params = {
            **(extra or {}),
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout),
        }
        if rv:
            params["resourceVersion"] = rv
        return params

    async def _stream(self, kind: str, rv: str) -> None:
        async with await self._get(self._path(kind), self._watch_params(rv)) as resp:
            if resp.status >= 400:
                raise RuntimeError(f"watch {kind}: HTTP {resp.status}")
            async for line in resp.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                etype, obj = event.get("type"), event.get("object") or {}
                if etype in ("ADDED", "MODIFIED"):
                    self._put(kind, obj)
                elif etype == "DELETED":
                    self._store(kind).pop(_key(obj), None)
                elif etype == "ERROR":
                    raise RuntimeError(f"watch {kind}: {obj.get('message', obj)}")
                else:
                    continue  # BOOKMARK
                self._dirty.set()

    async def _watch(self, kind: str) -> None:
        failures = 0
        while True:
            try:
                rv = await self._list(kind)
                failures = 0
                await self._stream(kind, rv)
                log.debug("watch of %s ended; listing again", kind)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1  # unreachable or refusing: back off up to 30 s, not a log flood
                wait = min(30.0, self.backoff * 2 ** min(failures - 1, 10))
                log.warning("watch of %s dropped (%s); resyncing in %.1fs", kind, exc, wait)
                await asyncio.sleep(wait)

    # ---- Secrets ------------------------------------------------------------------------------
    def watch_secrets(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Watch exactly ``wanted`` plus the static Secrets: start new watches, stop old ones."""
        want = set(wanted) | self.static_secrets
        for ref in list(self._secret_tasks):
            if ref not in want:
                self._secret_tasks.pop(ref).cancel()
                self.secrets.pop(ref, None)
                log.info("Secret %s/%s is no longer needed: not watched any more", *ref)
        for ref in sorted(want - set(self._secret_tasks)):
            self._secret_tasks[ref] = asyncio.create_task(
                self._watch_secret(*ref), name=f"kube-watch-Secret-{ref[0]}/{ref[1]}"
            )

    def secrets_synced(self) -> bool:
        """Every static Secret was listed once (present or not)."""
        return all(ref in self.secrets for ref in self.static_secrets)

    def _secret_changed(self, ns: str, name: str, obj: dict[str, Any] | None) -> None:
        ref = (ns, name)
        known = ref in self.secrets
        if known and self.secrets[ref] == obj:
            return
        self.secrets[ref] = obj
        if not known:
            self._dirty.set()  # readiness may wait for the first list of a static Secret
        if self.on_secret is not None:
            try:
                self.on_secret(ns, name, obj)
            except Exception:  # a consumer's bug must not end the watch
                log.exception("handling a change of Secret %s/%s failed", ns, name)

    async def _watch_secret(self, ns: str, name: str) -> None:
        """List + watch one Secret by name (fieldSelector for the API server and RBAC
        ``resourceNames``; the name is also checked here: emulators ignore field selectors)."""
        url = f"/api/v1/namespaces/{ns}/secrets"
        selector = {"fieldSelector": f"metadata.name={name}"}
        failures = 0
        while True:
            try:
                async with await self._get(url, selector, limit=30) as resp:
                    if resp.status >= 400:
                        text = (await resp.text())[:200]
                        raise RuntimeError(f"list: HTTP {resp.status}: {text}")
                    data = orjson.loads(await resp.read())
                found = [
                    item
                    for item in data.get("items") or []
                    if (item.get("metadata") or {}).get("name") == name
                ]
                self._secret_changed(ns, name, found[0] if found else None)
                failures = 0
                rv = str((data.get("metadata") or {}).get("resourceVersion") or "")
                params = self._watch_params(rv, selector)
                async with await self._get(url, params) as resp:
                    if resp.status >= 400:
                        raise RuntimeError(f"watch: HTTP {resp.status}")
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        event = orjson.loads(line)
                        etype, obj = event.get("type"), event.get("object") or {}
                        if etype == "ERROR":
                            raise RuntimeError(str(obj.get("message", obj)))
                        if (obj.get("metadata") or {}).get("name") != name:
                            continue  # another Secret (no field selector on this server)
                        if etype in ("ADDED", "MODIFIED"):
                            self._secret_changed(ns, name, obj)
                        elif etype == "DELETED":
                            self._secret_changed(ns, name, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1  # e.g. HTTP 403 (RBAC): back off up to 30 s, not a log flood
                wait = min(30.0, self.backoff * 2 ** min(failures - 1, 10))
                log.warning(
                    "watch of Secret %s/%s dropped (%s); resyncing in %.1fs", ns, name, exc, wait
                )
                await asyncio.sleep(wait)

    # ---- building the configuration ------------------------------------------------------------
    async def _apply_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)
            self._dirty.clear()
            if len(self._listed) < len(KINDS) or not self.secrets_synced():
                continue
            try:
                config = self.build()
                if self.route_secrets:
                    self.watch_secrets(route_secret_refs(config.routes))
                self.apply(config)
            except Exception as exc:  # never let the loop die; the last config stays
                self.status.rejected += 1
                self.status.last_error = str(exc)
                log.exception("applying the Kubernetes configuration failed")
                if self.on_result:
                    self.on_result(False)
                continue
            self.status.applied += 1
            self.status.synced = True
            self.status.last_error = None
            if self.on_result:
                self.on_result(True)

    def _parsed(
        self, store: Mapping[tuple[str, str], dict[str, Any]], model: type[_Parsed]
    ) -> list[_Parsed]:
        import crds

        kind = model.__name__
        out: list[_Parsed] = []
        for (ns, name), raw in sorted(store.items()):
            where = f"{kind} {ns}/{name}"
            try:
                obj = crds.parse_object(raw, where)
                if not isinstance(obj, model):
                    raise ValueError(f"a {obj.kind} where a {kind} was listed")
            except (crds.InvalidObject, ValueError) as exc:
                if self.invalid.get(where) != str(exc):
                    log.error("%s is invalid and is ignored: %s", where, exc)
                self.invalid[where] = str(exc)
                continue
            self.invalid.pop(where, None)
            out.append(obj)
        return out

    def build(self) -> GatewayConfig:
        routes = self._parsed(self.routes, ModelRoute)
        servers = self._parsed(self.servers, ModelServer)
        # selectors indexed by (namespace, one of their label pairs): a pod is checked only against
        # the selectors that can match it (not every ModelServer: 5,000 pods x 50 servers)
        by_pair: dict[tuple[str, str, str], list[Mapping[str, str]]] = {}
        for server in servers:
            sel = server.spec.workload_selector.match_labels
            if sel:
                ns = server.metadata.namespace or "default"
                k, v = next(iter(sorted(sel.items())))
                by_pair.setdefault((ns, k, v), []).append(sel)
        endpoints: list[StaticEndpoint] = []
        for pod in self.pods.values():
            if pod.ip is None:
                continue
            candidates = [
                sel for k, v in pod.labels.items() for sel in by_pair.get((pod.namespace, k, v), ())
            ]
            if not any(selects(s, pod.labels) for s in candidates):
                continue
            # "namespace/name": pods of two namespaces may share a name
            endpoints.append(
                StaticEndpoint(
                    f"{pod.namespace}/{pod.name}",
                    pod.ip,
                    pod.labels,
                    pod.ready,
                    f"Pod {pod.namespace}",
                    namespace=pod.namespace,
                )
            )
        endpoints.sort(key=lambda e: e.name)
        return GatewayConfig(
            routes=routes,
            servers=servers,
            endpoints=endpoints,
            source=f"kubernetes {self.credentials.base if self.credentials else self.access}",
        )


def route_secret_refs(routes: Iterable[ModelRoute]) -> set[tuple[str, str]]:
    """(namespace, name) of the Secrets named by routes' ``rateLimit.global.redis.
    passwordSecretRef`` (in the route's namespace)."""
    out: set[tuple[str, str]] = set()
    for route in routes:
        limit = route.spec.rate_limit
        g = limit.global_ if limit is not None else None
        ref = g.redis.password_secret_ref if g is not None else None
        if ref is not None:
            out.add((route.metadata.namespace or "default", ref.name))
    return out


def extproc_endpoints(source: KubeSource, service: str, port: int) -> list[str]:
    """Ready pods behind the extproc Service (its ``spec.selector``), as ``ip:port``."""
    out: list[str] = []
    for (ns, name), raw in source.services.items():
        if name != service:
            continue
        selector = (raw.get("spec") or {}).get("selector") or {}
        for pod in source.pods.values():
            if pod.namespace == ns and pod.ready and pod.ip and selects(selector, pod.labels):
                out.append(f"{pod.ip}:{port}")
    return sorted(set(out))
