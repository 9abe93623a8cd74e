"""The local cluster: the same control plane as on Kubernetes, on one machine.

- :class:`Emulator`: an in-memory Kubernetes API server (kmock) on a loopback port, with the
  MatrixInfer kinds and the built-in ones the controllers use declared (:func:`declare`). It sets
  what the API server sets on creation (``uid``, ``resourceVersion``, ``generateName``) and, like
  the real one, sends a BOOKMARK on every idle watch so that watchers (Kopf's 70 s inactivity
  timer) never take a quiet stream for a dead one.
- :class:`OperatorThread`: the real Kopf operator (``controllers.main.run_operator``) against it,
  in its own thread and event loop, as a separate process would be.
- :class:`LocalKubelet` (``matrixinfer.kubelet``) runs its pods as local processes and
  :class:`~matrixinfer.applier.Applier` applies a configuration directory to it; the gateway reads
  it with ``--source kubernetes --server URL``; :class:`LocalCluster` starts all of them.
- The local cluster also serves what the console reads (``matrixinfer demo`` starts it): each
  local pod's log (``GET .../pods/<name>/log``, from the file the kubelet writes its output to,
  ``follow`` and ``tailLines`` as the API server takes them) and one Node whose labels and
  allocatable resources describe simulated GPUs (:data:`LOCAL_NODE`), so the console's
  recommendations have a GPU shape to offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kmock

from controllers.autoscaling.planner import DEFAULT_INTERVAL
from controllers.main import ControllerConfig, run_operator
from controllers.webhooks.handlers import KINDS
from matrixinfer.applier import CORE_KINDS, Applier, Key
from matrixinfer.get import state_path
from matrixinfer.kubelet import LocalKubelet, LocalPod

__all__ = [
    "LOCAL_NODE",
    "REVIEW_GROUPS",
    "VERBS",
    "Emulator",
    "LocalCluster",
    "LocalOptions",
    "OperatorThread",
    "declare",
    "state_path",
]

REVIEW_GROUPS = {"authentication.k8s.io", "authorization.k8s.io"}
VERBS = {"list", "watch", "get", "create", "patch", "delete"}

# The local cluster's one Node: the pods are simulators, the GPUs are labels (read by the
# console's recommendations as GPU feature discovery's labels on a real node)
LOCAL_NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "local",
        "labels": {
            "kubernetes.io/hostname": "local",
            "nvidia.com/gpu.product": "NVIDIA-L4",
            "matrixinfer.ai/simulated": "true",
        },
    },
    "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "8"}},
}
LOG_POLL = 0.2  # seconds between two looks at a followed log file


class Emulator(kmock.KubernetesEmulator):
    """kmock plus `metadata.generateName` (Kopf names its Events that way), and a
    `resourceVersion` and `uid` on every created object that has none (as the API server does).

    kmock decides which of its reactions serves a request by looking for the request in each
    reaction's view of the recorded request history (oldest first: ~14 reactions x the history
    per request, quadratic over a long run); `history_limit` keeps only the newest requests, in
    the emulator and in each reaction (the benchmark and the local cluster keep 1, the request
    being served; tests keep everything to inspect it). `handled` counts every request either
    way. `bookmark_interval` (seconds, None: off): a watch with no event for that long gets a
    BOOKMARK, as the API server sends one about every minute; without it Kopf declares a quiet
    watch dead after 70 s and reconnects.
    """

    _serial: int = 0
    history_limit: int | None = None
    handled: int = 0
    by_kind: dict[str, int] | None = None  # requests by "METHOD plural[/subresource]"
    bookmark_interval: float | None = None
    bookmarks: int = 0  # BOOKMARK events sent
    watches: int = 0  # watch requests served (a watcher's reconnect is one more)
    stamp_creation: bool = False  # set metadata.creationTimestamp on creation, as the API does

    def next_version(self) -> str:
        """A new ``resourceVersion`` (one counter for every object, as the API server keeps)."""
        type(self)._serial += 1
        return str(type(self)._serial)

    async def _handle(self, request: Any) -> Any:
        self.handled += 1
        if getattr(request, "action", None) == kmock.action.WATCH:
            self.watches += 1
        if self.by_kind is not None:
            res = getattr(request, "resource", None)
            sub = getattr(request, "subresource", None)
            kind = f"{request.method} {getattr(res, 'plural', '?')}" + (f"/{sub}" if sub else "")
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        limit = self.history_limit
        if limit is not None:  # the newest (including this one) stay matchable
            if len(self._requests) > limit:
                del self._requests[: len(self._requests) - max(limit, 1)]
            for reaction in self._payloads:
                seen = reaction._requests
                if len(seen) > 2 * limit:
                    del seen[: len(seen) - limit]
        data = getattr(request, "data", None)
        if isinstance(data, dict) and request.method == "POST":
            meta = data.get("metadata")
            if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
                type(self)._serial += 1
                meta["name"] = f"{meta['generateName']}{type(self)._serial:06d}"
            if isinstance(meta, dict) and not meta.get("resourceVersion"):
                # the API server sets it on every object (controllers' creations included)
                meta["resourceVersion"] = self.next_version()
                meta.setdefault("uid", f"uid-{meta.get('name')}-{type(self)._serial}")
            if isinstance(meta, dict) and self.stamp_creation:
                now = datetime.datetime.now(tz=datetime.UTC)
                meta.setdefault("creationTimestamp", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        if getattr(getattr(request, "resource", None), "group", None) in REVIEW_GROUPS:
            # reviews are answered, never stored (the emulator would store each under no name)
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        return await super()._handle(request)

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        """A watch: the existing objects as ADDED, then every change, with no gap between the
        two. kmock's own takes its place on the event bus only after it has sent the existing
        objects, so an object created meanwhile was never sent to that watcher: Kopf, which
        watches anew after each reconnect, missed objects created during it for good. Here the
        place is taken under the same lock as the snapshot. With ``bookmark_interval``, a
        BOOKMARK whenever the stream was idle that long."""
        yield b""  # the headers go out at once, even if nothing happens
        resource = request.resource
        bus = self._buses[resource]
        async with self._lock:
            marker = await bus.mark()
            events = [
                {"type": "ADDED", "object": obj.raw}
                for (res, ns, name), obj in self.objects.items()
                if not obj.deleted and _selects(request, res, ns, name)
            ]
        try:
            for event in events:
                yield event
            changes = bus.stream(since=marker)
            interval = self.bookmark_interval
            api_version = "/".join(x for x in (resource.group, resource.version) if x)
            pending: asyncio.Future[Any] = asyncio.ensure_future(anext(changes))
            try:
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=interval)
                    if not done:
                        self.bookmarks += 1
                        version = {"resourceVersion": str(type(self)._serial)}
                        yield {
                            "type": "BOOKMARK",
                            "object": {"apiVersion": api_version, "metadata": version},
                        }
                        continue
                    event = pending.result()
                    meta = (event.get("object") or {}).get("metadata") or {}
                    if _selects(request, resource, meta.get("namespace"), meta.get("name")):
                        yield event
                    pending = asyncio.ensure_future(anext(changes))
            finally:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
                close = getattr(changes, "aclose", None)  # an async generator's
                if close is not None:
                    await close()
        finally:
            await bus.unmark(marker)


def _selects(request: Any, resource: Any, namespace: str | None, name: str | None) -> bool:
    """Whether a watch ``request`` covers the object (kmock's own rule: a request without a
    namespace covers every namespace)."""
    return bool(
        resource == request.resource
        and (request.namespace is None or namespace == request.namespace)
        and (request.name is None or name == request.name)
    )


def declare(k: kmock.KubernetesEmulator, volcano: bool = False) -> None:
    """The kinds the controllers and the gateway use, in the emulator's discovery."""
    res = k.resources
    res["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS)
    res["v1/pods"] = kmock.ResourceInfo(
        kind="Pod", namespaced=True, verbs=VERBS, subresources={"status"}
    )
    res["v1/services"] = kmock.ResourceInfo(kind="Service", namespaced=True, verbs=VERBS)
    res["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS)
    res["v1/configmaps"] = kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs=VERBS)
    res["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=VERBS)
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
class OperatorThread:
    """The real Kopf operator (standalone, no peering) against an API server, in its own thread
    and event loop, like a separate process (and so that Kopf's shutdown does not wait for the
    emulator's own watch-stream tasks)."""

    config: ControllerConfig
    stop_flag: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def _main(self) -> None:
        try:
            asyncio.run(run_operator(self.config, stop_flag=self.stop_flag, ready_flag=self.ready))
        except BaseException as exc:  # reported by the owner, not lost in the thread
            self.errors.append(exc)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait_ready(self, timeout: float) -> bool:
        """Until Kopf is up (True), the thread ended or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.05):
                return True
            if not self.alive():
                return False
        return False

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask Kopf to stop; True once the thread ended within ``timeout`` seconds."""
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.alive()


@dataclass
class LocalOptions:
    config_dir: Path  # the YAML objects to apply (re-read on change)
    run_dir: Path  # logs of the pods; their volumes under run_dir/state
    first_host: str = "127.0.0.10"  # the first pod address
    sim_args: Sequence[str] = ()  # simulator flags for every pod (e.g. --time-scale)
    config_poll: float = 0.5  # seconds between two looks at the directory
    resync_seconds: float = 30.0
    bookmark_interval: float = 20.0
    state_file: Path | None = None  # None: do not record the URL
    # the autoscaler (docs/autoscaling.md "Local mode"): the extproc /metrics URLs its gateway
    # sources read, seconds between two syncs, the planner's windows (None: its defaults)
    gateway_metrics_urls: Sequence[str] = ()
    autoscale_interval: float = DEFAULT_INTERVAL
    autoscale_stable_window: float | None = None
    autoscale_panic_window: float | None = None
    node: dict[str, Any] | None = field(default_factory=lambda: dict(LOCAL_NODE))  # None: none
    claims: Path | None = None  # PersistentVolumeClaims provided as dirs; None: config_dir/volumes


class LocalCluster:
    """The local control plane: the emulated API server on a loopback port, the applier of
    the configuration directory and the local kubelet (one thread and event loop), and the real
    operator (another). ``lines`` receives what happens, one line each (applied objects,
    rejected files, pods started / ready / exited), for the terminal."""

    def __init__(self, options: LocalOptions) -> None:
        self.options = options
        self.lines: queue.Queue[str] = queue.Queue()
        self.url = ""
        self.emulator: Emulator | None = None
        self.applier: Applier | None = None
        self.kubelet: LocalKubelet | None = None
        self.operator: OperatorThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self.errors: list[BaseException] = []

    # ---- in the cluster's thread ---------------------------------------------------------------
    def _objects(self, plural: str, group: str = "") -> list[dict[str, Any]]:
        assert self.emulator is not None
        out = []
        for (resource, _ns, _name), obj in list(self.emulator.objects.items()):
            if resource.plural == plural and resource.group == group and not obj.deleted:
                out.append(obj.raw)
        return out

    def _stored(self) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        kinds = [*KINDS.items(), *((k, ("", p)) for k, p in CORE_KINDS.items())]
        for kind, (group, plural) in kinds:
            for raw in self._objects(plural, group):
                meta = raw.get("metadata") or {}
                out[(kind, str(meta.get("namespace")), str(meta.get("name")))] = raw
        return out

    async def _main(self) -> None:
        o = self.options
        self._stopping = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        async with Emulator() as k, kmock.Server(k) as srv:
            k.history_limit = 1
            k.bookmark_interval = o.bookmark_interval
            k.stamp_creation = True
            declare(k)
            self.emulator = k
            self.url = str(srv.url).rstrip("/")
            self.kubelet = LocalKubelet(
                self.url,
                lambda: self._objects("pods"),
                o.run_dir,
                config_maps=lambda: self._objects("configmaps"),
                secrets=lambda: self._objects("secrets"),
                state_dir=o.run_dir / "state",
                claims=o.claims if o.claims is not None else o.config_dir / "volumes",
                first_host=o.first_host,
                sim_args=o.sim_args,
                say=self.lines.put,
            )
            self.applier = Applier(
                o.config_dir, self.url, self._stored, k.next_version, say=self.lines.put
            )
            k[kmock.method.GET, kmock.subresource("log")] << self._pod_log
            kubelet = asyncio.create_task(self.kubelet.run(), name="local-kubelet")
            async with aiohttp.ClientSession() as session:
                if o.node is not None:
                    async with session.post(f"{self.url}/api/v1/nodes", json=o.node) as resp:
                        if resp.status >= 400:
                            raise RuntimeError(f"the local Node: {resp.status} {await resp.text()}")
                self._started.set()
                while not self._stopping.is_set():
                    if self.applier.changed():
                        try:
                            await self.applier.apply(session)
                        except (RuntimeError, aiohttp.ClientError) as exc:
                            self.lines.put(f"error: applying {o.config_dir}: {exc}")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), o.config_poll)
            kubelet.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await kubelet

    def _pod_log(self, request: Any) -> Any:
        """``GET .../pods/<name>/log`` of a local pod: its process's output (the file the kubelet
        appends it to), the last ``tailLines`` lines, then (``follow=true``) what it writes
        next, until the pod's process ends or the pod is deleted."""
        ns, name = request.namespace, request.name
        local = self._local_pod(ns, name)
        if local is None:
            raise kmock.KubernetesObjectNotFoundError(
                message=f"pod {ns}/{name} has no process on the local kubelet (yet)"
            )
        params = request.params or {}
        tail = params.get("tailLines")
        try:
            tail_lines = int(tail) if tail is not None else None
        except ValueError:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"tailLines: not a number: {tail!r}"
            ) from None
        follow = params.get("follow") == "true"
        path: Path = local.log_path

        async def chunks() -> AsyncIterator[bytes]:
            with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
                data = f.read()
                if tail_lines is not None:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-tail_lines:] if tail_lines else [])
                if data:
                    yield data
                while follow:
                    more = f.read()
                    if more:
                        yield more
                        continue
                    current = self._local_pod(ns, name)
                    procs = current.all_procs() if current is not None else []
                    if (
                        current is None
                        or current.failed
                        or (procs and all(p.poll() is not None for p in procs))
                    ):
                        rest = f.read()
                        if rest:
                            yield rest
                        return
                    await asyncio.sleep(LOG_POLL)

        return chunks()

    def _local_pod(self, namespace: str, name: str) -> LocalPod | None:
        """The kubelet's process record of pod ``namespace/name`` (None: it runs none)."""
        if self.kubelet is None:
            return None
        for (ns, pod_name, _uid), local in list(self.kubelet.pods.items()):
            if ns == namespace and pod_name == name:
                return local
        return None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._started.set()

    # ---- from the caller's thread --------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> LocalCluster:
        """The API server, the applier and the kubelet, then the operator (until it is ready)."""
        self._thread = threading.Thread(target=self._run, name="local-cluster", daemon=True)
        self._thread.start()
        self._started.wait(timeout)
        if self.errors or not self.url:
            raise RuntimeError(f"the local API server did not start: {self.errors!r}")
        self.operator = OperatorThread(
            ControllerConfig(
                server=self.url,
                resync_seconds=self.options.resync_seconds,
                queue_exit_timeout=0.5,
                autoscale_interval=self.options.autoscale_interval,
                gateway_metrics_urls=list(self.options.gateway_metrics_urls),
                autoscale_stable_window=self.options.autoscale_stable_window,
                autoscale_panic_window=self.options.autoscale_panic_window,
            )
        )
        self.operator.start()
        if not self.operator.wait_ready(timeout):
            errors = self.operator.errors
            self.stop()
            raise RuntimeError(f"the operator did not start in {timeout:.0f}s: {errors!r}")
        if self.options.state_file is not None:
            self.options.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.options.state_file.write_text(
                json.dumps({"server": self.url, "pid": os.getpid()}) + "\n"
            )
        return self

    def stop(self) -> None:
        """The operator first (its finalizers), then the pods and the API server."""
        if self.operator is not None:
            self.operator.stop()
        loop, stopping = self._loop, self._stopping
        if stopping is not None and self._thread is not None and self._thread.is_alive():
            if loop is not None:
                loop.call_soon_threadsafe(stopping.set)
            self._thread.join(30)
        state = self.options.state_file
        if state is not None and state.exists():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(state.read_text()).get("pid") == os.getpid():
                    state.unlink()

    def alive(self) -> str | None:
        """None while every part runs, else the name of the one that stopped."""
        if self._thread is None or not self._thread.is_alive():
            return "the local API server"
        if self.operator is None or not self.operator.alive():
            return "the operator"
        return None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
