"""The gateway's datastore: routes, servers, pods, pod metrics and in-flight counts.

Single-threaded by design (it lives on the extproc event loop): a configuration change builds a new
immutable :class:`Snapshot` and swaps one reference, so a request that took ``datastore.snapshot``
keeps a consistent view for its whole decision, and nothing ever waits on a lock. Pod objects are
kept across configuration changes (same name and address), so their scraped metrics and in-flight
counts survive a reload; metrics are replaced by the scraper with one assignment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from crds.networking import ModelServerSpec
from crds.networking import SchedulerProfile as ServerProfile
from extproc.health import HealthPolicy, PassiveHealth, capped
from extproc.routing import RouteTable
from fleet.config import GatewayConfig, object_key
from fleet.pods import Pod, PodMetrics, index_by_label
from fleet.pods import members as fleet_members
from fleet.profile import SchedulerProfile
from fleet.retry import envoy_retry

log = logging.getLogger("matrixinfer.extproc")

__all__ = [
    "Datastore",
    "ServerView",
    "Snapshot",
]


@dataclass(slots=True, frozen=True)
class ServerView:
    """One ModelServer and the pods it selects (ready or not), in endpoint order: ``pods`` are
    its candidates, ``ejected`` the ones passive health keeps out for now (extproc.health)."""

    key: str
    name: str
    engine: str
    model: str | None
    port: int | None
    profile: ServerProfile | None  # the ModelServer's own scheduler profile
    pods: tuple[Pod, ...]
    spec: ModelServerSpec
    retry_headers: tuple[tuple[str, str], ...] = ()  # Envoy retry headers from trafficPolicy
    health: HealthPolicy | None = None  # trafficPolicy.passiveHealth; None: off
    ejected: tuple[Pod, ...] = ()
    selected: tuple[Pod, ...] = ()  # every pod it selects, in endpoint order (): ``pods``

    @property
    def members(self) -> tuple[Pod, ...]:
        """Every pod the ModelServer selects, candidates and ejected ones, in endpoint order."""
        return self.selected or self.pods

    @property
    def ready(self) -> bool:
        """Whether one of its pods is ready (none: it is at zero, or its pods are starting)."""
        for pod in self.selected or self.pods:  # noqa: SIM110 (any() over a generator: ~3x)
            if pod.ready:
                return True
        return False


NOT_READY = float("inf")  # ``Pod.ready_since`` of a pod that is not ready


def _adapters_known(pod: Pod, metrics: PodMetrics) -> PodMetrics:
    """``metrics`` with the adapter list unknown (None) unless its read started after the pod
    last turned ready: the list a starting engine gave may lack adapters loaded before it was
    ready, and the LoRA filter would refuse the pod for them (unknown: it may serve them)."""
    read_at = metrics.loras_read_at
    if metrics.loaded_loras is None or (read_at is not None and read_at >= pod.ready_since):
        return metrics
    return replace(metrics, loaded_loras=None)


def _ready_servers(snapshot: Snapshot) -> set[str]:
    """The keys of the ModelServers with a ready pod."""
    return {key for key, view in snapshot.servers.items() if view.ready}


def retry_headers(spec: ModelServerSpec) -> tuple[tuple[str, str], ...]:
    """``trafficPolicy.retry`` as Envoy request headers (set on every routed request, so a
    client's own copies never survive). Absent retry policy: no retries.

    Retries go to the next address of the fallback list (override_host), so the attempts are
    also capped by the number of fallbacks when the request is routed.
    """
    policy = spec.traffic_policy
    if policy is None or policy.retry is None:
        return (("x-envoy-max-retries", "0"), ("x-envoy-retry-on", "connect-failure"))
    retry = envoy_retry(policy.retry)
    out = [
        ("x-envoy-max-retries", str(retry.attempts)),
        ("x-envoy-retry-on", retry.retry_on),
    ]
    if retry.status_codes:
        out.append(("x-envoy-retriable-status-codes", ",".join(map(str, retry.status_codes))))
    return tuple(out)


@dataclass(slots=True, frozen=True)
class Snapshot:
    version: int
    routes: RouteTable
    servers: Mapping[str, ServerView]
    pods: Mapping[str, Pod]
    default_profile: SchedulerProfile | None
    config: GatewayConfig
    warnings: tuple[str, ...] = ()


class Datastore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._version = 0
        self.on_pod_removed: list[Callable[[str], None]] = []
        # called with a ModelServer's key when it goes from no ready pod to a ready one (its
        # first pod after a scale from zero): requests waiting for it may be scheduled now
        self.on_server_ready: list[Callable[[str], None]] = []
        # pods whose scrape found nothing listening: not ready until a scrape succeeds again
        self._scrape_down: set[str] = set()
        self._configured_ready: dict[str, bool] = {}
        # passive health (trafficPolicy.passiveHealth): pods that fail requests leave the
        # candidates; (ModelServer, pod, "ejected" | "returned") to the listeners
        self.health = PassiveHealth(clock)
        self._health_due: float | None = None
        self.on_health: list[Callable[[str, str, str], None]] = []
        self.snapshot = self._build(GatewayConfig(), {}, None)

    # ---- configuration ------------------------------------------------------------------------
    def apply(self, config: GatewayConfig) -> Snapshot:
        """Install a validated configuration; pods that disappear are reported to listeners."""
        old = self.snapshot
        ready_before = _ready_servers(old)  # before _build: it updates the kept pods' readiness
        new = self._build(config, old.pods, old.routes)
        self.snapshot = new
        self._configured_ready = {e.name: e.ready for e in config.endpoints}
        for name in old.pods.keys() - new.pods.keys():
            self._scrape_down.discard(name)
            self.health.forget(old.pods[name].address)
            for listener in self.on_pod_removed:
                listener(name)
        self._report_ready(_ready_servers(new) - ready_before)
        return new

    def _report_ready(self, keys: set[str]) -> None:
        for key in keys:
            for listener in self.on_server_ready:
                listener(key)

    def _build(
        self, config: GatewayConfig, previous: Mapping[str, Pod], old_routes: RouteTable | None
    ) -> Snapshot:
        """``old_routes``: the previous snapshot's table; its routes keep the model names they
        serve against newcomers (``fleet.claims``)."""
        self._version += 1
        warnings: list[str] = []
        pods: dict[str, Pod] = {}
        servers: dict[str, ServerView] = {}
        server_models: dict[str, str | None] = {}
        by_label = index_by_label(config.endpoints)
        for server in config.servers:
            key = object_key(server)
            spec = server.spec
            port = spec.workload_port.port if spec.workload_port else None
            members: list[Pod] = []
            for member in fleet_members(server, by_label, warnings):
                endpoint, address = member.endpoint, member.address
                pod = pods.get(endpoint.name)
                if pod is None:
                    kept = previous.get(endpoint.name)
                    if kept is not None and kept.address == address:
                        kept.labels = dict(endpoint.labels)
                        self._set_ready(
                            kept, endpoint.ready and endpoint.name not in self._scrape_down
                        )
                        kept.grpc = member.grpc
                        pod = kept
                    else:
                        pod = Pod(endpoint.name, address, dict(endpoint.labels), endpoint.ready)
                        pod.ready_since = self.clock() if endpoint.ready else NOT_READY
                        pod.grpc = member.grpc
                    pods[endpoint.name] = pod
                elif pod.grpc is None and pod.address == address:
                    pod.grpc = member.grpc  # a second ModelServer that serves gRPC there
                elif pod.address != address:
                    warnings.append(
                        f"endpoint '{endpoint.name}' resolves to {pod.address} and {address} for "
                        f"different ModelServers; {pod.address} is used"
                    )
                members.append(pod)
            model = spec.model or None
            policy = spec.traffic_policy
            health = policy.passive_health if policy is not None else None
            servers[key] = ServerView(
                key=key,
                name=server.metadata.name or "",
                engine=spec.inference_engine,
                model=model,
                port=port,
                profile=spec.scheduler,
                pods=tuple(members),
                spec=spec,
                retry_headers=retry_headers(spec),
                health=HealthPolicy.from_spec(health) if health is not None else None,
            )
            server_models[key] = model
        servers = {key: self._split(view) for key, view in servers.items()}

        def ready_server(key: str) -> bool:
            view = servers.get(key)
            return view is not None and view.ready

        routes = RouteTable(
            config.routes, server_models, previous=old_routes, ready_server=ready_server
        )
        self._health_due = self.health.next_change()
        warnings.extend(routes.conflicts)
        warnings.extend(routes.missing_server_warnings())
        return Snapshot(
            version=self._version,
            routes=routes,
            servers=servers,
            pods=pods,
            default_profile=config.scheduler_profile,
            config=config,
            warnings=tuple(warnings),
        )

    def _set_ready(self, pod: Pod, ready: bool) -> None:
        """Set the pod's readiness; a pod turning ready forgets its adapter list (read while it
        was starting, it may predate the adapters' loading) until a read started after now."""
        if ready and not pod.ready:
            pod.ready_since = self.clock()
            pod.metrics = _adapters_known(pod, pod.metrics)
        elif not ready:
            pod.ready_since = NOT_READY
        pod.ready = ready

    # ---- passive health -----------------------------------------------------------------------
    def _split(self, view: ServerView) -> ServerView:
        """``view`` with its candidates and ejected pods as passive health has them now."""
        members = view.members
        if view.health is None:
            return view if not view.ejected else replace(view, pods=members, ejected=())
        pods, ejected = capped(members, self.health.excluded, view.health.max_ejection_percent)
        return replace(view, pods=tuple(pods), ejected=tuple(ejected), selected=members)

    def _refresh_health(self) -> None:
        snap = self.snapshot
        servers = {key: self._split(view) for key, view in snap.servers.items()}
        self.snapshot = replace(snap, servers=servers)
        self._health_due = self.health.next_change()

    def attempt(self, address: str, server: str, failed: bool) -> None:
        """Envoy's report of one attempt at a pod (``address``) for a request of ModelServer
        ``server`` (its name, as the request's header carries it)."""
        view = next((v for v in self.snapshot.servers.values() if v.name == server), None)
        if view is None or view.health is None:
            self.tick()
            return
        pod = next((p for p in view.members if p.address == address), None)
        if pod is None:
            return
        change = self.health.record(address, view.health, failed)
        if change is None:
            self.tick()
            return
        self._refresh_health()
        if change == "ejected" and all(p is not pod for p in self._view(view.key).ejected):
            # maxEjectionPercent reached: the pod stays a candidate, its count starts again
            self.health.forget(address)
            self._refresh_health()
            log.warning(
                "pod %s (%s) of ModelServer %s fails its requests but stays a candidate: "
                "maxEjectionPercent (%d%%) of its pods are ejected already",
                pod.name, address, server, view.health.max_ejection_percent,
                extra={"pod": pod.name},
            )  # fmt: skip
            return
        if change == "ejected":
            state = self.health.pods[address]
            log.warning(
                "pod %s (%s) of ModelServer %s ejected for %.1fs: its requests fail "
                "(ejection %d in a row)",
                pod.name, address, server, state.ejected_until - self.clock(), state.ejections,
                extra={"pod": pod.name},
            )  # fmt: skip
        else:
            log.info("pod %s (%s) of ModelServer %s is healthy again", pod.name, address, server,
                     extra={"pod": pod.name})  # fmt: skip
        for listener in self.on_health:
            listener(server, pod.name, change)

    def _view(self, key: str) -> ServerView:
        return self.snapshot.servers[key]

    def tick(self) -> None:
        """Let ejections that are over end (called on every scrape and attempt report)."""
        due = self._health_due
        if due is not None and self.clock() >= due:
            self._refresh_health()

    # ---- request path -------------------------------------------------------------------------
    def begin(self, pod: Pod) -> None:
        pod.in_flight += 1
        pod.since_scrape += 1
        if self.health.pods and self.health.probe(pod.address):
            self._refresh_health()  # half-open: one request at a time

    def finish(self, pod_name: str) -> None:
        pod = self.snapshot.pods.get(pod_name)
        if pod is not None and pod.in_flight > 0:
            pod.in_flight -= 1
            pod.since_scrape -= 1

    def in_flight_total(self) -> int:
        return sum(p.in_flight for p in self.snapshot.pods.values())

    # ---- metrics ------------------------------------------------------------------------------
    def publish_metrics(self, pod_name: str, metrics: PodMetrics) -> None:
        """Install a pod's new metrics. Stale metrics are unknown to the scheduler but leave the
        pod in rotation (a slow /metrics is not a dead engine); an unreachable pod (nothing
        listens) is not ready until a scrape succeeds again."""
        self.tick()
        pod = self.snapshot.pods.get(pod_name)
        if pod is None:
            return
        pod.metrics = _adapters_known(pod, metrics)
        if not metrics.stale:
            pod.since_scrape = 0  # the engine's own counts include what was sent so far
        if metrics.unreachable:
            self._scrape_down.add(pod_name)
            self._set_ready(pod, False)
        elif not metrics.stale and pod_name in self._scrape_down:
            self._scrape_down.discard(pod_name)
            before = _ready_servers(self.snapshot)
            self._set_ready(pod, self._configured_ready.get(pod_name, True))
            self._report_ready(_ready_servers(self.snapshot) - before)

    def scrape_targets(self) -> list[tuple[str, str, str]]:
        """(pod name, metrics URL, engine) for every pod of every ModelServer."""
        out: dict[str, tuple[str, str, str]] = {}
        for view in self.snapshot.servers.values():
            for pod in view.members:
                if pod.name not in out:
                    out[pod.name] = (pod.name, f"http://{pod.address}/metrics", view.engine)
        return list(out.values())

    # ---- introspection ------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        snap = self.snapshot
        return {
            "ModelRoute": len(snap.routes.routes),
            "ModelServer": len(snap.servers),
            "Pod": len(snap.pods),
        }

    def to_json(self) -> dict[str, Any]:
        snap = self.snapshot
        now = self.clock()

        def pod_json(pod: Pod) -> dict[str, Any]:
            m = pod.metrics
            return {
                "name": pod.name,
                "address": pod.address,
                "labels": dict(pod.labels),
                "ready": pod.ready,
                "inFlight": pod.in_flight,
                "metrics": {
                    "waiting": m.waiting,
                    "running": m.running,
                    "kvCacheUsage": m.kv_cache_usage,
                    "ttftSeconds": m.ttft_seconds,
                    "tpotSeconds": m.tpot_seconds,
                    "runningLoras": sorted(m.running_loras),
                    "waitingLoras": sorted(m.waiting_loras),
                    "maxLoras": m.max_loras,
                    "loadedLoras": None if m.loaded_loras is None else sorted(m.loaded_loras),
                    "stale": m.stale,
                    "ageSeconds": round(now - m.scraped_at, 3) if m.scraped_at else None,
                },
            }

        return {
            "version": snap.version,
            "source": snap.config.source,
            "warnings": list(snap.warnings),
            "modelRoutes": [
                {
                    "key": r.key,
                    "modelName": r.model_name,
                    "loraAdapters": list(r.lora_adapters),
                    # names this route claims that another route serves (fleet.claims)
                    "notServed": [
                        {"name": c.name, "servedBy": c.served_by}
                        for c in snap.routes.lost.get(r.key, ())
                    ],
                    "missingModelServers": snap.routes.missing_servers.get(r.key, []),
                    "rules": [
                        {"name": rule.name, "servers": list(rule.servers), "total": rule.total}
                        for rule in r.rules
                    ],
                }
                for r in snap.routes.routes
            ],
            "modelServers": [
                {
                    "key": v.key,
                    "engine": v.engine,
                    "model": v.model,
                    "port": v.port,
                    "pods": [p.name for p in v.members],
                    "ejected": [p.name for p in v.ejected],
                }
                for v in snap.servers.values()
            ],
            "pods": [pod_json(p) for p in snap.pods.values()],
            # passive health: pods with recent failures, by address
            "passiveHealth": self.health.to_json(),
        }
