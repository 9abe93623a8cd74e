"""Kopf handlers of the autoscaler: a timer per AutoscalingPolicy reads the metrics, asks the
planner and sets the targets' replicas.

- index ``autoscaling_pods``: the ModelInfers' entry pods (address, ports, readiness) by
  ``(namespace, modelinfer)``, for the pod metric source;
- index ``autoscaling_owners``: every policy by the ModelInfers it targets. One writer per target:
  the oldest policy (then the first by name) owns a ModelInfer; the others say so in their
  ``TargetOwned`` condition and leave it alone;
- timer ``autoscaling-sync`` (every ``interval`` seconds): sources → :class:`Planner` → the
  ``/scale`` subresource of each ModelInfer (role replicas of ``spec.template.roles`` for a
  disaggregated target, which ``/scale`` cannot express) → status, Events and metrics.

A change of a target's replicas that the autoscaler did not make (``kubectl scale``) is not
fought silently: an Event and the ``ScaledExternally`` condition name the old and new counts and
the policy that owns the target; the planner takes the new count as current and goes on from it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

import crds
from controllers.autoscaling.planner import (
    DEFAULT_INTERVAL,
    Decision,
    Disaggregated,
    Heterogeneous,
    Homogeneous,
    InvalidPolicy,
    Planner,
    Settings,
    shape_of,
)
from controllers.autoscaling.sources import (
    GatewaySource,
    PodSource,
    PodTarget,
    PrometheusSource,
    Reading,
    is_gateway_metric,
    merge,
)
from controllers.kube import ApiError, KubeClient
from controllers.metrics import ControllerMetrics
from controllers.modelinfer.types import LABEL_ENTRY, LABEL_MODEL_INFER, LABEL_ROLE
from crds.registry import AutoscalingPolicy, AutoscalingPolicySpec, MetricSource

__all__ = [
    "DEFAULT_INTERVAL",
    "Autoscaler",
    "PodInfo",
    "pod_info",
    "pod_targets",
    "raw_targets",
    "register",
]

GROUP, VERSION, PLURAL = "registry.matrixinfer.ai", "v1alpha1", "autoscalingpolicies"
MI_PATH = "/apis/workload.matrixinfer.ai/v1alpha1/namespaces/{ns}/modelinfers/{name}"
POLICY_PATH = "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/{ns}/autoscalingpolicies/{name}"

log = logging.getLogger("matrixinfer.autoscaler")
Key = tuple[str, str]


def _now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------
# pods (plain data from the index)


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    ip: str | None
    ready: bool
    entry: bool
    role: str | None
    ports: Mapping[str, int]  # container port name -> number
    first_port: int | None


def pod_info(body: Mapping[str, Any]) -> PodInfo:
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = body.get("status") or {}
    ready = status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    ports: dict[str, int] = {}
    first: int | None = None
    for c in (body.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if isinstance(p.get("containerPort"), int):
                first = p["containerPort"] if first is None else first
                if p.get("name"):
                    ports[str(p["name"])] = p["containerPort"]
    return PodInfo(
        name=str(meta.get("name", "")),
        ip=status.get("podIP") or None,
        ready=ready and not meta.get("deletionTimestamp"),
        entry=labels.get(LABEL_ENTRY, "true") == "true",
        role=labels.get(LABEL_ROLE),
        ports=ports,
        first_port=first,
    )


def pod_targets(
    pods: Sequence[PodInfo], source: MetricSource | None
) -> tuple[list[PodTarget], list[str]]:
    """The ready entry pods' metrics URLs for a pod source (None: the pod's first container
    port, /metrics), and the pods that could not be addressed."""
    out: list[PodTarget] = []
    problems: list[str] = []
    spec = source.pod if source is not None else None
    path = spec.path if spec is not None else "/metrics"
    for p in pods:
        if not (p.ready and p.entry and p.ip):
            continue
        port: int | None
        if spec is not None and spec.port is not None:
            port = spec.port
        elif spec is not None and spec.name is not None:
            port = p.ports.get(spec.name)
            if port is None:
                problems.append(f"pod {p.name}: no container port named {spec.name!r}")
                continue
        else:
            port = p.first_port
            if port is None:
                problems.append(f"pod {p.name}: no container port to scrape")
                continue
        host = f"[{p.ip}]" if ":" in p.ip else p.ip
        out.append(PodTarget(p.name, f"http://{host}:{port}{path}"))
    return out, problems


# ----------------------------------------------------------------------------------------------
# conditions


def _condition(
    old: Sequence[Mapping[str, Any]], type_: str, status: bool, reason: str, message: str
) -> dict[str, Any]:
    s = "True" if status else "False"
    prev = next((c for c in old if c.get("type") == type_), None)
    when = (
        prev.get("lastTransitionTime")
        if prev is not None and prev.get("status") == s and prev.get("lastTransitionTime")
        else _now_rfc3339()
    )
    return {
        "type": type_,
        "status": s,
        "reason": reason,
        "message": message[:2000],
        "lastTransitionTime": when,
    }


# ----------------------------------------------------------------------------------------------
# the controller


@dataclass
class _PolicyState:
    spec: dict[str, Any]
    planner: Planner
    written: dict[str, int] = field(default_factory=dict)  # target key -> replicas we set
    last_scale: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (time, reason)
    external: str | None = None  # the last external change seen, for the condition
    pods: PodSource | None = None
    gateway: GatewaySource | None = None
    prometheus: list[PrometheusSource] = field(default_factory=list)


class Autoscaler:
    """Holds every policy's planner and sources; the timer calls :meth:`sync`."""

    def __init__(
        self,
        metrics: ControllerMetrics,
        gateway_urls: Sequence[str] = (),
        *,
        stable_window: float | None = None,
        panic_window: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.gateway_urls = list(gateway_urls)
        self.stable_window = stable_window
        self.panic_window = panic_window
        self.clock = clock
        self.client: KubeClient | None = None
        self.session: aiohttp.ClientSession | None = None
        self._states: dict[Key, _PolicyState] = {}

    def connect(self, info: kopf.ConnectionInfo) -> None:
        self.client = KubeClient(info)

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self.session

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.session is not None:
            await self.session.close()

    def forget(self, key: Key) -> None:
        self._states.pop(key, None)
        self.metrics.forget_policy(*key)

    # -- one sync of one policy ----------------------------------------------------------------

    async def sync(
        self,
        key: Key,
        body: Mapping[str, Any],
        pods: Mapping[str, Sequence[PodInfo]],
        owners: Mapping[str, str],
    ) -> dict[str, Any]:
        """One round for the policy `key`; returns its new status. `pods`: the target
        ModelInfers' pods by ModelInfer name; `owners`: ModelInfer name → owning policy name."""
        ns, name = key
        old_status = body.get("status") or {}
        old_conds: list[Mapping[str, Any]] = list(old_status.get("conditions") or [])
        generation = (body.get("metadata") or {}).get("generation")
        status: dict[str, Any] = {"observedGeneration": generation}

        def conditions(*conds: dict[str, Any]) -> dict[str, Any]:
            status["conditions"] = list(conds)
            return status

        # the spec, validated
        try:
            doc = {k: v for k, v in body.items() if k != "status"}
            policy = crds.parse_object(doc, f"AutoscalingPolicy {ns}/{name}")
            assert isinstance(policy, AutoscalingPolicy)
            state = self._state(key, policy.spec, dict(body.get("spec") or {}))
        except (crds.InvalidObject, InvalidPolicy, ValueError) as exc:
            self._states.pop(key, None)
            return conditions(_condition(old_conds, "Active", False, "InvalidSpec", str(exc)))
        shape = state.planner.shape
        targets = _target_names(shape)

        # one writer per target
        foreign = {t: owners[t] for t in targets if owners.get(t, name) != name}
        if foreign:
            msg = "; ".join(f"ModelInfer {t} is scaled by {p}" for t, p in foreign.items())
            return conditions(
                _condition(old_conds, "Active", False, "TargetOwnedElsewhere", msg),
                _condition(old_conds, "TargetOwned", False, "TargetOwnedElsewhere", msg),
            )
        owned = _condition(
            old_conds,
            "TargetOwned",
            True,
            "Owner",
            f"replicas of {', '.join('ModelInfer ' + t for t in targets)} are set by"
            f" AutoscalingPolicy {ns}/{name}",
        )

        # the targets now
        assert self.client is not None, "the autoscaler is not connected"
        objs: dict[str, dict[str, Any]] = {}
        for t in targets:
            obj = await self.client.get(MI_PATH.format(ns=ns, name=t))
            if not isinstance(obj, dict):
                return conditions(
                    _condition(
                        old_conds,
                        "Active",
                        False,
                        "TargetNotFound",
                        f"ModelInfer {ns}/{t} not found",
                    ),
                    owned,
                )
            objs[t] = obj
        try:
            current = _current(shape, objs)
        except ValueError as exc:
            return conditions(
                _condition(old_conds, "Active", False, "InvalidTarget", str(exc)), owned
            )
        events: list[tuple[str, str, str, dict[str, Any]]] = []  # (type, reason, message, target)
        for k, n in current.items():
            was = state.written.get(k)
            if was is not None and was != n:
                state.external = (
                    f"{k} replicas changed from {was} to {n} outside the autoscaler;"
                    f" AutoscalingPolicy {ns}/{name} owns the target and goes on from {n}"
                )
                events.append(
                    ("Warning", "ScaledExternally", state.external, objs[k.split("/")[0]])
                )
                state.written.pop(k, None)

        # metrics
        readings = await self._read(state, policy.spec, shape, ns, pods, current)
        values, problems = merge([m.name for m in policy.spec.metrics], readings)

        decision = state.planner.step(values, current)
        await self._apply(state, key, shape, objs, decision, events)
        for etype, reason, message, target in events:
            await self._event(body, target, etype, reason, message)
        self._record(key, decision, state.planner.shape.total_bounds()[1])

        status["targets"] = [
            {
                "name": k,
                "currentReplicas": decision.current[k],
                "desiredReplicas": decision.replicas[k],
                "mode": decision.mode,
                **(
                    {
                        "lastScaleTime": state.last_scale[k][0],
                        "lastScaleReason": state.last_scale[k][1],
                    }
                    if k in state.last_scale
                    else {}
                ),
            }
            for k in decision.replicas
        ]
        missing = ", ".join(decision.missing)
        return conditions(
            _condition(old_conds, "Active", True, decision.reason, _summary(decision)),
            owned,
            _condition(
                old_conds,
                "MetricsAvailable",
                not decision.missing and not problems,
                "MetricsMissing"
                if decision.missing
                else ("SourceProblems" if problems else "Read"),
                (f"missing (no scale-down): {missing}. " if missing else "")
                + "; ".join(problems[:10]),
            ),
            _condition(
                old_conds,
                "ScaledExternally",
                state.external is not None,
                "ExternalChange" if state.external else "NoExternalChange",
                state.external or "",
            ),
        )

    def _state(self, key: Key, spec: AutoscalingPolicySpec, raw: dict[str, Any]) -> _PolicyState:
        state = self._states.get(key)
        if state is not None and state.spec == raw:
            return state
        extra: dict[str, float] = {}
        if self.stable_window is not None:
            extra["stable_window"] = self.stable_window
        if self.panic_window is not None:
            extra["panic_window"] = self.panic_window
        settings = Settings.from_rules(spec, **extra)
        planner = Planner(settings, shape_of(spec), self.clock)
        new = _PolicyState(raw, planner)
        if state is not None:  # a spec edit keeps what we know about our writes
            new.written, new.last_scale = state.written, state.last_scale
        names = [m.name for m in spec.metrics]
        sources = _sources_of(spec)
        session = self._session()
        # absent metricSources (always so for a Model's inline policy): the gateway's names
        # from the gateway, every other name from the target's pods
        if not sources or any(s.pod is not None for s in sources):
            new.pods = PodSource(session, names)
        if any(s.gateway is not None for s in sources) or (
            not sources and any(is_gateway_metric(n) for n in names)
        ):
            new.gateway = GatewaySource(session, self.gateway_urls, names)
        new.prometheus = [
            PrometheusSource(session, s.prometheus.server_url, s.prometheus.query, names)
            for s in sources
            if s.prometheus is not None
        ]
        self._states[key] = new
        return new

    async def _read(
        self,
        state: _PolicyState,
        spec: AutoscalingPolicySpec,
        shape: Homogeneous | Heterogeneous | Disaggregated,
        ns: str,
        pods: Mapping[str, Sequence[PodInfo]],
        current: Mapping[str, int],
    ) -> list[Reading]:
        sources = _sources_of(spec)
        tasks: list[Any] = []
        if state.pods is not None:
            pod_source = next((s for s in sources if s.pod is not None), None)
            found: list[PodTarget] = []
            problems: list[str] = []
            for t in _target_names(shape):
                got, bad = pod_targets(pods.get(t, ()), pod_source)
                found += got
                problems += bad
            tasks.append(state.pods.read(found, sum(current.values()), self.clock()))
        if state.gateway is not None:
            gw = next((s.gateway for s in sources if s.gateway is not None), None)
            gateway = state.gateway

            async def gateway_all() -> Reading:
                out = Reading()
                for t in _target_names(shape):
                    # absent modelServerName: the ModelServer named like the target ModelInfer
                    server = (gw.model_server_name if gw is not None else None) or t
                    r = await gateway.read(ns, server)
                    out.missing |= r.missing
                    out.problems += r.problems
                    for k, v in r.values.items():
                        out.values[k] = out.values.get(k, 0.0) + v
                return out

            tasks.append(gateway_all())
        tasks += [p.read() for p in state.prometheus]
        readings: list[Reading] = list(await asyncio.gather(*tasks))
        if state.pods is not None and problems:
            readings.append(Reading(problems=problems))
        return readings

    async def _apply(
        self,
        state: _PolicyState,
        key: Key,
        shape: Homogeneous | Heterogeneous | Disaggregated,
        objs: Mapping[str, dict[str, Any]],
        d: Decision,
        events: list[tuple[str, str, str, dict[str, Any]]],
    ) -> None:
        assert self.client is not None
        ns, _ = key
        changed = [k for k in d.replicas if d.replicas[k] != d.current[k]]
        if not changed:
            return
        when = _now_rfc3339()
        try:
            if isinstance(shape, Disaggregated):
                obj = objs[shape.name]
                roles = [dict(r) for r in obj["spec"]["template"]["roles"]]
                for r in roles:
                    rk = f"{shape.name}/{r['name']}"
                    if rk in d.replicas:
                        r["replicas"] = d.replicas[rk]
                await self.client.patch(
                    MI_PATH.format(ns=ns, name=shape.name),
                    {
                        "metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                        "spec": {"template": {"roles": roles}},
                    },
                )
            else:
                for k in changed:
                    await self.client.patch(
                        MI_PATH.format(ns=ns, name=k) + "/scale",
                        {"spec": {"replicas": d.replicas[k]}},
                    )
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            self.metrics.reconcile_errors.labels("autoscaling", "scale").inc()
            events.append(
                (
                    "Warning",
                    "ScaleFailed",
                    f"setting replicas failed: {exc}",
                    objs[changed[0].split("/")[0]],
                )
            )
            return
        for k in changed:
            state.written[k] = d.replicas[k]
            state.last_scale[k] = (when, d.reason)
            self.metrics.actions.labels("autoscaling", "scale").inc()
            events.append(
                (
                    "Normal",
                    d.reason,
                    f"{k}: replicas {d.current[k]} -> {d.replicas[k]} ({_summary(d)})",
                    objs[k.split("/")[0]],
                )
            )

    async def _event(
        self,
        policy: Mapping[str, Any],
        target: Mapping[str, Any],
        etype: str,
        reason: str,
        msg: str,
    ) -> None:
        for obj in (policy, target):
            try:
                kopf.event(cast(kopf.Body, dict(obj)), type=etype, reason=reason, message=msg)
            except Exception:  # an event is best effort; the status says it too
                log.debug("posting an event failed", exc_info=True)

    def _record(self, key: Key, d: Decision, max_replicas: int) -> None:
        ns, name = key
        m = self.metrics
        m.autoscaler_max.labels(ns, name).set(max_replicas)
        for k in d.replicas:
            m.autoscaler_desired.labels(ns, name, k).set(d.replicas[k])
            m.autoscaler_current.labels(ns, name, k).set(d.current[k])
        m.autoscaler_panic.labels(ns, name).set(1 if d.mode == "Panic" else 0)
        m.autoscaler_decisions.labels(ns, name, d.reason).inc()


def _last_scale(state: _PolicyState, key: str) -> dict[str, str]:
    if key not in state.last_scale:
        return {}
    when, reason = state.last_scale[key]
    return {"lastScaleTime": when, "lastScaleReason": reason}


def _summary(d: Decision) -> str:
    demand = ", ".join(f"{k}={v:g}" for k, v in d.demand.items())
    return (
        f"{d.reason}: {d.total_current} -> {d.total_desired} replicas, mode {d.mode}"
        + (f", demand {demand}" if demand else "")
        + (f", missing {', '.join(d.missing)}" if d.missing else "")
    )


def _sources_of(spec: AutoscalingPolicySpec) -> list[MetricSource]:
    for t in (spec.homogeneous_target, spec.heterogeneous_target, spec.disaggregated_target):
        if t is not None:
            return list(t.metric_sources or [])
    return []


def _target_names(shape: Homogeneous | Heterogeneous | Disaggregated) -> list[str]:
    if isinstance(shape, Heterogeneous):
        return [b.name for b in shape.backends]
    return [shape.name]


def _current(
    shape: Homogeneous | Heterogeneous | Disaggregated, objs: Mapping[str, dict[str, Any]]
) -> dict[str, int]:
    if isinstance(shape, Disaggregated):
        roles = {
            str(r.get("name")): int(r.get("replicas", 1))
            for r in objs[shape.name].get("spec", {}).get("template", {}).get("roles") or []
        }
        for role in (shape.prefill_role, shape.decode_role):
            if role not in roles:
                raise ValueError(f"ModelInfer {shape.name} has no role {role!r}")
        return {
            shape.prefill_key: roles[shape.prefill_role],
            shape.decode_key: roles[shape.decode_role],
        }
    return {t: int(objs[t].get("spec", {}).get("replicas", 1)) for t in objs}


def raw_targets(spec: Mapping[str, Any]) -> list[str]:
    """The ModelInfers a policy names, read from the unvalidated spec (for the indexes)."""
    names: list[str] = []
    for k in ("homogeneousTarget", "disaggregatedTarget"):
        ref = (spec.get(k) or {}).get("targetRef") or {}
        if ref.get("name"):
            names.append(str(ref["name"]))
    for p in (spec.get("heterogeneousTarget") or {}).get("params") or []:
        if (p.get("target") or {}).get("name"):
            names.append(str(p["target"]["name"]))
    return names


# ----------------------------------------------------------------------------------------------
# registration


def register(registry: kopf.OperatorRegistry, autoscaler: Autoscaler, interval: float) -> None:
    """Register the autoscaler's indexes and its timer into `registry`."""

    @kopf.index(
        "pods", labels={LABEL_MODEL_INFER: kopf.PRESENT}, id="autoscaling_pods", registry=registry
    )
    def autoscaling_pods(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
        mi = (body.get("metadata", {}).get("labels") or {}).get(LABEL_MODEL_INFER)
        return {(namespace or "", mi): pod_info(body)}

    @kopf.index(GROUP, VERSION, PLURAL, id="autoscaling_owners", registry=registry)
    def autoscaling_owners(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> Any:
        created = str(body.get("metadata", {}).get("creationTimestamp") or "")
        return {(namespace or "", t): (created, name) for t in raw_targets(body.get("spec") or {})}

    @kopf.timer(GROUP, VERSION, PLURAL, id="autoscaling-sync", interval=interval, registry=registry)
    async def autoscaling_sync(
        body: kopf.Body, namespace: str | None, name: str, patch: kopf.Patch, **kwargs: Any
    ) -> None:
        ns = namespace or ""
        pods_index: kopf.Index[Any, PodInfo] = kwargs["autoscaling_pods"]
        owners_index: kopf.Index[Any, tuple[str, str]] = kwargs["autoscaling_owners"]
        targets = raw_targets(body.get("spec") or {})
        pods = {t: list(pods_index.get((ns, t), [])) for t in targets}
        owners = {t: min(owners_index.get((ns, t), [("", name)]))[1] for t in targets}
        status = await autoscaler.sync((ns, name), dict(body), pods, owners)
        old = body.get("status") or {}
        if any(old.get(k) != v for k, v in status.items()):
            patch.status.update(status)

    @kopf.on.delete(
        GROUP, VERSION, PLURAL, id="autoscaling-forget", optional=True, registry=registry
    )
    def autoscaling_forget(namespace: str | None, name: str, **_: Any) -> None:
        autoscaler.forget((namespace or "", name))
