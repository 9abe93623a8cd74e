"""Passive health: which pods have been failing requests, from every upstream attempt's outcome.

Envoy reports each attempt it makes towards a pod (the router's upstream access log, retries
included) to the extproc; :class:`PassiveHealth` keeps, per pod address, the failures in a row
and the ejection state:

- **healthy**: ``consecutiveFailures`` failed attempts in a row (5xx answer, connect failure,
  reset, upstream timeout) eject the pod; a successful answer resets the count;
- **ejected** until ``base_ejection_time * 2^(n-1)`` (capped by ``max_ejection_time``) after its
  n-th ejection in a row: the pod is not a candidate;
- **half-open** once the ejection is over: the pod is a candidate for one request at a time
  (:meth:`PassiveHealth.probe`); the probe's success makes it healthy again (n back to 0), its
  failure ejects it again for twice as long. A probe whose outcome never arrives frees the slot
  after ``base_ejection_time``.

Pure: plain data and an injected clock; the datastore turns :meth:`PassiveHealth.excluded` into
each ModelServer's candidate set, applying ``maxEjectionPercent`` (:func:`capped`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from crds.common import parse_duration
from crds.networking import PassiveHealth as PassiveHealthSpec

__all__ = [
    "HealthMetrics",
    "HealthPolicy",
    "PassiveHealth",
    "PodHealth",
    "attempt_failed",
    "capped",
]

# Envoy response flags of an attempt that failed because of the pod (upstream_log entries)
_UPSTREAM_FAILURE_FLAGS = (
    "upstream_connection_failure",
    "upstream_remote_reset",
    "upstream_request_timeout",
    "upstream_connection_termination",
)


@dataclass(slots=True, frozen=True)
class HealthPolicy:
    """A ModelServer's ``trafficPolicy.passiveHealth``, durations in seconds."""

    consecutive_failures: int = 5
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0
    max_ejection_percent: int = 50

    @classmethod
    def from_spec(cls, spec: PassiveHealthSpec) -> HealthPolicy:
        base = parse_duration(spec.base_ejection_time)
        return cls(
            consecutive_failures=spec.consecutive_failures,
            base_ejection_s=base,
            max_ejection_s=max(base, parse_duration(spec.max_ejection_time)),
            max_ejection_percent=spec.max_ejection_percent,
        )

    def ejection_seconds(self, ejections: int) -> float:
        """How long the ``ejections``-th ejection in a row lasts (1: the base time)."""
        doubled: float = self.base_ejection_s * 2.0 ** min(ejections - 1, 30)
        return min(doubled, self.max_ejection_s)


def attempt_failed(status: int, flags: Iterable[str]) -> bool | None:
    """An upstream attempt's outcome: True failed (5xx, or no answer because the pod refused,
    reset or timed out), False succeeded, None says nothing about the pod (e.g. the client went
    away first)."""
    if status >= 500:
        return True
    if 100 <= status < 500:
        return False
    return True if any(f in _UPSTREAM_FAILURE_FLAGS for f in flags) else None


@dataclass(slots=True)
class PodHealth:
    failures: int = 0  # failed attempts in a row
    ejections: int = 0  # ejections in a row (0: healthy)
    ejected_until: float = 0.0
    probe_since: float | None = None  # half-open: when the request in flight was sent
    total_ejections: int = 0

    def ejected(self, now: float) -> bool:
        return self.ejections > 0 and now < self.ejected_until

    def half_open(self, now: float) -> bool:
        return self.ejections > 0 and now >= self.ejected_until


class PassiveHealth:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.pods: dict[str, PodHealth] = {}
        self.policies: dict[str, HealthPolicy] = {}  # by pod address: the last report's policy

    def record(self, address: str, policy: HealthPolicy, failed: bool) -> str | None:
        """One attempt's outcome at ``address``; returns "ejected" or "returned" when the pod's
        state changed, else None."""
        now = self.clock()
        self.policies[address] = policy
        state = self.pods.get(address)
        if state is None:
            if not failed:
                return None  # the common case: a healthy pod answered; nothing to keep
            state = self.pods[address] = PodHealth()
        if not failed:
            state.failures = 0
            if state.ejections and state.half_open(now):
                del self.pods[address]
                return "returned"
            if not state.ejections:
                del self.pods[address]
            return None
        state.failures += 1
        if state.ejected(now):
            return None  # answers of requests sent before the ejection
        if state.half_open(now) or state.failures >= policy.consecutive_failures:
            state.ejections += 1
            state.total_ejections += 1
            state.ejected_until = now + policy.ejection_seconds(state.ejections)
            state.failures = 0
            state.probe_since = None
            return "ejected"
        return None

    def probe(self, address: str) -> bool:
        """A request is being sent to ``address``: True when it is a half-open probe (the pod is
        no candidate until its outcome arrives)."""
        state = self.pods.get(address)
        now = self.clock()
        if state is None or not state.half_open(now):
            return False
        state.probe_since = now
        return True

    def excluded(self, address: str) -> float | None:
        """When the pod was excluded from the candidates (its ejection's start order key), or
        None while it is a candidate."""
        state = self.pods.get(address)
        if state is None or state.ejections == 0:
            return None
        now = self.clock()
        if state.ejected(now):
            return state.ejected_until
        policy = self.policies.get(address, HealthPolicy())
        if state.probe_since is not None and now - state.probe_since < policy.base_ejection_s:
            return state.ejected_until
        return None

    def next_change(self) -> float | None:
        """The earliest time a pod's exclusion ends by itself (an ejection or a probe's wait)."""
        times: list[float] = []
        for address, state in self.pods.items():
            if state.ejections == 0:
                continue
            times.append(state.ejected_until)
            if state.probe_since is not None:
                policy = self.policies.get(address, HealthPolicy())
                times.append(state.probe_since + policy.base_ejection_s)
        now = self.clock()
        later = [t for t in times if t > now]
        return min(later) if later else None

    def forget(self, address: str) -> None:
        self.pods.pop(address, None)
        self.policies.pop(address, None)

    def to_json(self) -> dict[str, Any]:
        now = self.clock()
        out: dict[str, Any] = {}
        for address, state in sorted(self.pods.items()):
            out[address] = {
                "state": "ejected"
                if state.ejected(now)
                else "half-open"
                if state.ejections
                else "failing",
                "failuresInARow": state.failures,
                "ejectionsInARow": state.ejections,
                "ejectedForSeconds": round(max(0.0, state.ejected_until - now), 3),
                "probeInFlight": state.probe_since is not None and state.ejections > 0,
            }
        return out


def capped(
    pods: Sequence[Any], excluded_at: Callable[[str], float | None], max_percent: int
) -> tuple[list[Any], list[Any]]:
    """(candidates, ejected) of one ModelServer's ``pods``: the excluded ones leave the
    candidates, but at most ``max_percent`` % of the pods (rounded down); beyond that the pods
    excluded last stay candidates."""
    marked = [(at, i, p) for i, p in enumerate(pods) if (at := excluded_at(p.address)) is not None]
    if not marked:
        return list(pods), []
    allowed = math.floor(len(pods) * max_percent / 100)
    marked.sort(key=lambda m: (m[0], m[1]))
    out = {id(p) for _, _, p in marked[:allowed]}
    return [p for p in pods if id(p) not in out], [p for p in pods if id(p) in out]


class HealthMetrics:
    """``matrixinfer_gateway_pod_ejections_total{server,pod}`` and
    ``matrixinfer_gateway_pods_ejected{server}``, fed by the datastore's health events."""

    def __init__(self, registry: Any, datastore: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.datastore = datastore
        self.ejections = Counter(
            "matrixinfer_gateway_pod_ejections",
            "Pods ejected by passive health (trafficPolicy.passiveHealth): their requests failed.",
            ["server", "pod"],
            registry=registry,
        )
        self.ejected = Gauge(
            "matrixinfer_gateway_pods_ejected",
            "Pods of a ModelServer that passive health keeps out of its candidates now.",
            ["server"],
            registry=registry,
        )
        datastore.on_health.append(self.changed)

    def changed(self, server: str, pod: str, event: str) -> None:
        if event == "ejected":
            self.ejections.labels(server, pod).inc()
        counts: dict[str, int] = {}
        for view in self.datastore.snapshot.servers.values():
            if view.health is not None:
                counts[view.name] = counts.get(view.name, 0) + len(view.ejected)
        for name, n in counts.items():
            self.ejected.labels(name).set(n)
