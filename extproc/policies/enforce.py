"""Gateway policies wired together: authentication, authorisation, token budgets, the fair queue
and usage settlement. Used by :class:`extproc.gateway.Gateway` only when configured
(``--auth-config`` / ``--policies``): without it the request path is exactly the data path.

The cores are elsewhere and pure: :mod:`extproc.auth`, :mod:`extproc.ratelimit`,
:mod:`extproc.queue`, :mod:`extproc.usage`. This module holds their per-process state and the
asyncio parts (Redis calls, the fair queue over :class:`extproc.room.RoomWaits`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crds.common import parse_duration
from extproc.errors import GatewayError
from extproc.metrics import LabelCache
from extproc.policies.auth import ANONYMOUS, AuthConfig, Authenticator, Identity, authorize
from extproc.policies.jwks import JwksCache
from extproc.policies.queue import QueueEntry, UsageWindow
from extproc.policies.ratelimit import (
    Admission,
    Buckets,
    Limits,
    bucket_key,
    limits_of,
    output_reservation,
)
from extproc.policies.redis_buckets import RedisBuckets
from extproc.policies.token_estimate import TokenEstimateConfig, TokenEstimator
from extproc.policies.usage import Charge, Usage, UsageLedger, encode_charge
from extproc.room import QUEUE_TIMEOUT_MARGIN, RoomWaits, Waiter, queue_notice
from extproc.scheduling.types import NoPodAvailable
from fleet.config import object_key
from fleet.usage_envoy import CHARGE_KEY, RID_KEY

__all__ = [
    "QUEUE_TIMEOUT_MARGIN",
    "Policies",
    "PolicyError",
    "PolicyMetrics",
    "PolicySettings",
    "RoutePolicy",
    "queue_notice",
]

log = logging.getLogger("matrixinfer.extproc.policies")

_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class PolicyError(GatewayError):
    """A GatewayError with response headers (429 Retry-After / x-ratelimit-*)."""

    __slots__ = ("headers",)

    def __init__(self, base: GatewayError, headers: Mapping[str, str]) -> None:
        super().__init__(
            base.status,
            base.message,
            error_type=base.error_type,
            code=base.code,
            param=base.param,
        )
        self.headers = dict(headers)


class PolicyMetrics(LabelCache):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        r = registry
        self.auth = Counter(
            "matrixinfer_gateway_auth_results",
            "Authentication and authorisation outcomes, by method (api-key | jwt | anonymous | "
            "none) and result (ok | unauthenticated | forbidden).",
            ["method", "result"],
            registry=r,
        )
        self.ratelimit = Counter(
            "matrixinfer_gateway_ratelimit_decisions",
            "Rate-limit admissions by ModelRoute and result (admitted | limited | unavailable).",
            ["route", "result"],
            registry=r,
        )
        self.redis_up = Gauge(
            "matrixinfer_gateway_ratelimit_redis_up",
            "1 while the Redis holding shared buckets answers, 0 during an outage.",
            ["address"],
            registry=r,
        )
        self.redis_admitted = Counter(
            "matrixinfer_gateway_ratelimit_redis_admissions",
            "Requests admitted against shared (Redis) buckets, by who decided: ahead (this "
            "replica's recent view, far from the limit; charged to Redis behind the request) | "
            "redis (asked Redis first) | fallback (Redis unreachable, fail-open local bucket).",
            ["address", "decided"],
            registry=r,
        )
        self.redis_outages = Counter(
            "matrixinfer_gateway_ratelimit_redis_outages",
            "Times the Redis holding shared buckets became unreachable.",
            ["address"],
            registry=r,
        )
        self.usage_tokens = Counter(
            "matrixinfer_gateway_usage_tokens",
            "Tokens settled after the response by this replica (whichever replica admitted the "
            "request), by model and kind (prompt | completion).",
            ["model", "kind"],
            registry=r,
        )
        self.usage_reports = Counter(
            "matrixinfer_gateway_usage_reports",
            "Usage settlements by source (reported = exact from the engine; aborted = lower bound "
            "from SSE events; estimated = a gRPC answer without the engine's counts, charged its "
            "input estimate and output reservation; error = engine refused, nothing charged; "
            "unreported = no report "
            "reached this replica within --usage-grace: another replica may have settled it, so "
            "no tokens are counted here and the reservation of the estimate stays).",
            ["source"],
            registry=r,
        )
        self.usage_foreign = Counter(
            "matrixinfer_gateway_usage_foreign_reports",
            "Usage reports for requests this replica does not hold open (admitted by another "
            "replica, or reported after --usage-grace), by result: settled (from the charge the "
            "request carried in envoy.lb/matrixinfer_charge); no_charge, duplicate, invalid "
            "(nothing settled).",
            ["result"],
            registry=r,
        )
        self.usage_log_messages = Counter(
            "matrixinfer_gateway_usage_log_messages",
            "gRPC access-log messages from Envoy (each a batch of usage reports; Envoy flushes a "
            "worker's batch every 100 ms or at 16 KiB).",
            registry=r,
        )
        self.usage_log_entries = Counter(
            "matrixinfer_gateway_usage_log_entries",
            "Access-log entries (usage reports) in those messages.",
            registry=r,
        )
        self.queue_length = Gauge(
            "matrixinfer_gateway_queue_length",
            "Requests waiting in the fair queue, by model and priority.",
            ["model", "priority"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "matrixinfer_gateway_queue_wait_seconds",
            "Time requests waited in the fair queue, by model and priority.",
            ["model", "priority"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.queue_outcomes = Counter(
            "matrixinfer_gateway_queue_outcomes",
            "Queued requests by outcome (dispatched | timeout | full | cancelled | failed: no pod "
            "could ever take it).",
            ["model", "result"],
            registry=r,
        )


@dataclass(slots=True)
class PolicySettings:
    auth: AuthConfig | None = None
    fail_open: bool = True  # Redis unreachable: local buckets (True) or 503 (False)
    redis_password: str | None = None
    usage_grace: float = 10.0  # seconds to wait for a usage report after a request ended
    fairness_window: float = 60.0
    input_weight: float = 1.0
    output_weight: float = 2.0
    tenant_priorities: dict[str, int] = field(default_factory=dict)
    dispatch_interval: float = 0.05
    token_estimate: TokenEstimateConfig | None = None  # --policy-config tokenEstimate
    # --charge-key-file: signs the charge carried with each request (extproc.usage); the same on
    # every replica behind one Envoy. None: a random key (one replica settles only its own)
    charge_key: bytes | None = None
    # --redis-headroom: admit without waiting for Redis while more than this fraction of every
    # limited bucket would be left (extproc.ratelimit.RedisBuckets); 1 = always ask Redis first
    redis_headroom: float = 0.25


@dataclass(slots=True, frozen=True)
class RoutePolicy:
    key: str
    name: str
    access: Any
    limits: Limits | None
    max_queued: int
    max_wait: float
    priority_header: str | None


class Policies:
    def __init__(
        self,
        settings: PolicySettings,
        registry: CollectorRegistry,
        *,
        authenticator: Authenticator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = PolicyMetrics(registry)
        self.clock = clock
        if authenticator is None and settings.auth is not None:
            jwt = settings.auth.jwt
            jwks = JwksCache(jwt.jwks_url, refresh=jwt.refresh_seconds) if jwt else None
            authenticator = Authenticator(settings.auth, jwks=jwks)
        self.auth = authenticator
        self.local = Buckets(clock)
        self.redis: dict[str, RedisBuckets] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex() + "-"
        self.ledger = UsageLedger(
            self._settle,
            grace=settings.usage_grace,
            clock=clock,
            prefix=self._prefix,
            on_ignored=lambda reason: self.metrics.child(self.metrics.usage_foreign, reason).inc(),
            on_batch=self._log_batch,
            charge_key=settings.charge_key,
        )
        self.window = UsageWindow(
            settings.fairness_window, settings.input_weight, settings.output_weight, clock
        )
        # the fair queue of each server while requests wait for room on its pods: served one
        # entry when a request of it finishes (or one joins behind others), up to 4 every
        # dispatch_interval
        self.waits = RoomWaits(
            settings.dispatch_interval, clock, self.window, freed_limit=1, tick_limit=4
        )
        self.queues = self.waits.queues  # server key -> its fair queue
        # input-token estimates by the engine's /tokenize (routes with an input-token limit)
        te = settings.token_estimate
        self.estimator = (
            TokenEstimator(te, registry) if te is not None and te.method == "tokenize" else None
        )
        self._route_cache: tuple[int, dict[str, RoutePolicy]] = (-1, {})
        self._tasks: set[asyncio.Task[Any]] = set()
        # watched Secrets' values (namespace, name) -> key -> text (extproc.kube_source)
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self._missing_refs: set[tuple[str, str, str]] = set()

    # ---- identity -----------------------------------------------------------------------------
    def authenticate(self, headers: Mapping[str, str]) -> Identity | None:
        if self.auth is None:
            return None
        try:
            return self.auth.authenticate(headers)
        except GatewayError:
            self.metrics.child(self.metrics.auth, "bearer", "unauthenticated").inc()
            raise

    # ---- per-route policy ---------------------------------------------------------------------
    def route_policy(self, snapshot: Any, model: str) -> RoutePolicy:
        version, table = self._route_cache
        if version != snapshot.version:
            table = {}
            for route in snapshot.config.routes:
                spec = route.spec
                key = object_key(route)
                q = spec.queue
                table[key] = RoutePolicy(
                    key=key,
                    name=route.metadata.name,
                    access=spec.access,
                    limits=limits_of(spec.rate_limit, route.metadata.namespace or "default")
                    if spec.rate_limit is not None
                    else None,
                    max_queued=q.max_queued if q is not None else 1000,
                    max_wait=parse_duration(q.max_wait) if q is not None else 60.0,
                    priority_header=q.priority_header.lower()
                    if q is not None and q.priority_header
                    else None,
                )
            self._route_cache = (snapshot.version, table)
        compiled, _ = snapshot.routes.lookup(model)
        return table[compiled.key]

    # ---- admission ----------------------------------------------------------------------------
    async def admit(
        self,
        identity: Identity | None,
        policy: RoutePolicy,
        estimate: int,
        kind: str,
        model: str = "",
        count: Callable[[], Awaitable[int]] | None = None,
        max_tokens: int | None = None,
    ) -> Charge:
        """Identify, authorise and admit against the budget; the Charge to settle later.
        ``count``: the engine's count of the prompt (``TokenEstimator``), asked only for an
        authorised caller on a route with an input-token limit; else ``estimate`` is reserved.
        ``max_tokens``: the request's ``max_tokens``/``max_completion_tokens`` (None: not set),
        the output it reserves on a route with an output-token limit (``output_reservation``)."""
        who = self._identify(identity, policy)
        charge = Charge(
            rid=self._prefix + str(next(self._ids)),
            estimate=estimate,
            kind=kind,
            user=f"{who.tenant}/{who.user}",
            model=model,
        )
        limits = policy.limits
        if limits is None:
            return charge
        if count is not None and limits.input is not None:
            estimate = charge.estimate = await count()
        key = bucket_key(policy.key, limits.scope, who.tenant, who.user)
        output = output_reservation(limits, max_tokens)
        m = self.metrics.ratelimit
        try:
            if limits.redis is not None:
                admission = await self._redis(limits).admit(key, limits, estimate, output)
            else:
                admission = self.local.admit(key, limits, estimate, output)
        except GatewayError:
            self.metrics.child(m, policy.name, "unavailable").inc()
            raise
        if not admission.ok:
            self.metrics.child(m, policy.name, "limited").inc()
            raise self._limited(admission, policy.name)
        self.metrics.child(m, policy.name, "admitted").inc()
        if limits.redis is not None:
            decided = "ahead" if admission.ahead else admission.where
            self.metrics.child(
                self.metrics.redis_admitted,
                limits.redis,
                "fallback" if decided == "local" else decided,
            ).inc()
        charge.bucket = key
        charge.limits = limits
        charge.where = admission.where
        charge.output_reserved = output
        return charge

    def _identify(self, identity: Identity | None, policy: RoutePolicy) -> Identity:
        if self.auth is not None:
            try:
                who = self.auth.identify(identity, policy.name)
            except GatewayError:
                self.metrics.child(self.metrics.auth, "none", "unauthenticated").inc()
                raise
        else:
            who = identity or ANONYMOUS
        try:
            authorize(who, policy.access, policy.name)
        except GatewayError:
            self.metrics.child(self.metrics.auth, who.method, "forbidden").inc()
            raise
        self.metrics.child(self.metrics.auth, who.method, "ok").inc()
        return who

    @staticmethod
    def _limited(admission: Admission, route: str) -> PolicyError:
        from extproc.policies.ratelimit import rate_limited

        headers = dict(admission.headers)
        headers["retry-after"] = str(max(1, math.ceil(admission.retry_after)))
        return PolicyError(rate_limited(admission, route), headers)

    def _redis(self, limits: Limits) -> RedisBuckets:
        address = limits.redis
        assert address is not None
        ref = limits.password_ref
        name = address if ref is None else f"{address} {ref[0]}/{ref[1]}[{ref[2]}]"
        found = self.redis.get(name)
        if found is None:

            def outage(down: bool, address: str = address) -> None:
                self.metrics.redis_up.labels(address).set(0 if down else 1)
                if down:
                    self.metrics.redis_outages.labels(address).inc()

            found = self.redis[name] = RedisBuckets(
                address,
                fail_open=self.settings.fail_open,
                fallback=self.local,
                password=self._redis_password(ref),
                password_ref=ref,
                on_outage=outage,
                clock=self.clock,
                headroom=self.settings.redis_headroom,
            )
            self.metrics.redis_up.labels(address).set(1)
        return found

    def _redis_password(self, ref: tuple[str, str, str] | None) -> str | None:
        """The password for a Redis: its passwordSecretRef's value, else --redis-password-file."""
        if ref is None:
            return self.settings.redis_password
        namespace, name, key = ref
        data = self.secrets.get((namespace, name))
        if data is None or key not in data:
            if (namespace, name, key) not in self._missing_refs:
                self._missing_refs.add(ref)
                log.error(
                    "Redis password: key '%s' of Secret %s/%s is not there (yet); connecting "
                    "without a password until it is",
                    key,
                    namespace,
                    name,
                )
            return None
        self._missing_refs.discard(ref)
        return data[key]

    def update_secret(self, namespace: str, name: str, secret: Mapping[str, Any] | None) -> None:
        """A watched Secret changed (``None``: gone): API keys are replaced, Redis clients whose
        passwordSecretRef names it reconnect with the new password."""
        from extproc.policies.auth import SecretKeyStore, secret_data

        keys = self.auth.keys if self.auth is not None else None
        if isinstance(keys, SecretKeyStore) and keys.ref == (namespace, name):
            keys.update(secret)
        data: dict[str, str] | None = None
        if secret is not None:
            try:
                data = secret_data(secret, f"Secret {namespace}/{name}")
            except ValueError as exc:
                log.error("%s; keeping its previous values", exc)
                return
        if data is None:
            self.secrets.pop((namespace, name), None)
        else:
            self.secrets[(namespace, name)] = data
        for key in list(self.redis):
            client = self.redis[key]
            ref = client.password_ref
            if ref is None or ref[:2] != (namespace, name):
                continue
            password = self._redis_password(ref)
            if password != client.password:
                task = asyncio.get_running_loop().create_task(client.set_password(password))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _log_batch(self, entries: int) -> None:
        self.metrics.usage_log_messages.inc()
        self.metrics.usage_log_entries.inc(entries)

    def release(self, charge: Charge | None) -> None:
        """An admitted request that was not routed after all: give its reservation back."""
        if charge is None or charge.bucket is None:
            return
        self._settle(charge, Usage(0, 0, True, "error"), count=False)

    # ---- usage settlement ---------------------------------------------------------------------
    def metadata(self, charge: Charge) -> dict[str, Any]:
        """The ``envoy.lb`` dynamic metadata of a routed request: its id, by which the usage
        report comes back, and its signed charge, so that any replica the report reaches (and
        that shares the charge key) can settle it."""
        return {RID_KEY: charge.rid, CHARGE_KEY: encode_charge(charge, self.ledger.charge_key)}

    def expect(self, charge: Charge) -> None:
        self.ledger.expect(charge)

    def finished(self, rid: str) -> None:
        self.ledger.finished(rid)

    def _settle(self, charge: Charge, usage: Usage, count: bool = True) -> None:
        m = self.metrics
        if usage.source == "unreported":
            # no report reached this replica: another one may have settled it (the report
            # carried the charge), so nothing is counted twice — no tokens, no fair-share use,
            # and no bucket change (the reservations stay: what the request is charged)
            m.child(m.usage_reports, "unreported").inc()
            return
        if charge.rebuilt:
            m.child(m.usage_foreign, "settled").inc()
        if count:
            m.child(m.usage_reports, usage.source).inc()
            m.child(m.usage_tokens, charge.model, "prompt").inc(usage.prompt)
            m.child(m.usage_tokens, charge.model, "completion").inc(usage.completion)
            self.window.add(charge.user, usage.prompt, usage.completion)
        if charge.bucket is None or charge.limits is None:
            return
        limits = charge.limits
        if limits.redis is not None:  # queued: carried on the next admission to that Redis
            self._redis(limits).settle(
                charge.bucket,
                limits,
                charge.estimate,
                usage.prompt,
                usage.completion,
                charge.where,
                charge.output_reserved,
            )
        else:
            self.local.settle(
                charge.bucket,
                limits,
                charge.estimate,
                usage.prompt,
                usage.completion,
                charge.output_reserved,
            )

    # ---- the fair queue -----------------------------------------------------------------------
    def priority_of(self, policy: RoutePolicy, headers: Mapping[str, str], tenant: str) -> int:
        if policy.priority_header is not None:
            raw = headers.get(policy.priority_header)
            if raw is not None:
                try:
                    return int(raw)
                except ValueError:
                    raise GatewayError(
                        400,
                        f"header '{policy.priority_header}' must be an integer, not {raw!r}",
                        error_type="invalid_request_error",
                        code="invalid_priority",
                    ) from None
        return self.settings.tenant_priorities.get(tenant, 0)

    async def wait_for_pod(
        self,
        server_key: str,
        model: str,
        policy: RoutePolicy,
        charge: Charge,
        priority: int,
        attempt: Callable[[], Any],
        undo: Callable[[Any], None],
    ) -> Any:
        """Wait in the server's fair queue until ``attempt()`` finds a pod (it raises
        AllPodsSaturated while every pod is saturated); 429 when full, 503 after ``max_wait``."""
        queued = len(self.queues.get(server_key, ()))
        m = self.metrics
        if queued >= policy.max_queued:
            m.queue_outcomes.labels(model, "full").inc()
            raise PolicyError(
                GatewayError(
                    429,
                    f"every pod serving '{model}' is busy and {queued} requests already wait "
                    f"(ModelRoute '{policy.name}' queue.maxQueued {policy.max_queued})",
                    error_type="requests",
                    code="queue_full",
                ),
                {"retry-after": "1"},
            )
        entry = QueueEntry(charge.user, priority, charge.estimate, payload=Waiter(attempt))
        labels = (model, str(priority))
        m.queue_length.labels(*labels).inc()
        began = self.clock()
        outcome = "cancelled"
        try:
            result = await self.waits.wait(server_key, entry, policy.max_wait, undo)
            outcome = "dispatched"
            return result
        except TimeoutError:
            outcome = "timeout"
            retry = max(1, math.ceil(policy.max_wait / 4))
            raise PolicyError(
                GatewayError(
                    503,
                    f"no pod serving '{model}' could take the request within {policy.max_wait:g}s "
                    f"(ModelRoute '{policy.name}' queue.maxWait)",
                    error_type="service_unavailable",
                    code="queue_timeout",
                ),
                {"retry-after": str(retry)},
            ) from None
        except NoPodAvailable:  # no pod can ever take it (say, its adapter): its 503
            outcome = "failed"
            raise
        finally:
            m.queue_length.labels(*labels).dec()
            m.queue_wait.labels(*labels).observe(self.clock() - began)
            m.queue_outcomes.labels(model, outcome).inc()

    async def run(self) -> None:
        """Background upkeep: settle usage reports that never came; drop idle local buckets."""
        while True:
            await asyncio.sleep(1.0)
            self.ledger.sweep()
            self.local.sweep(86400.0 * 2)
            for r in self.redis.values():
                r.sweep(60.0)

    async def flush(self) -> None:
        """Write the settlements queued for Redis now (they go with the next admission, or by
        themselves after ``RedisBuckets.flush_delay``) and wait for those already on their way."""
        for r in list(self.redis.values()):
            await r.drain()

    async def close(self) -> None:
        await self.waits.close()
        for r in self.redis.values():
            await r.close()
        if self.estimator is not None:
            await self.estimator.close()
