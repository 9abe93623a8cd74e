"""Token and request budgets (``ModelRoute.rateLimit``): admit on an estimate, settle on usage.

The pure core is :class:`Buckets` (plain dicts, injected clock). Each budgeted key holds up to three
continuously refilled buckets of ``limit`` per ``unit`` (capacity ``limit``):

- **requests**: admission needs one whole request (level >= 1) and takes it;
- **input tokens**: admission needs a positive level and reserves the estimate (chars/4); the
  settlement corrects the reservation to the exact ``prompt_tokens``;
- **output tokens**: admission needs a positive level; the exact ``completion_tokens`` are debited
  at settlement.

A bucket may go into debt (a large request, or a large answer); later requests get 429 until the
refill has repaid it, so no request size escapes the budget. Over any window the admitted input is
at most the budget plus its refill plus one request's estimate.

:class:`RedisBuckets` runs the same algorithm in one atomic Lua script with Redis ``TIME`` as the
clock and keys that expire one unit after they would be full again, shared by every gateway
replica: one call per request, an admission carrying the settlements received since the previous
call. Far from the limit a replica admits from its latest view of the key and charges Redis
behind the request (no wait); near it (less than ``headroom`` of a bucket would be left), it asks
Redis first. When Redis is unreachable it answers per the fail mode: ``open`` falls back to local
buckets (logged, counted), ``closed`` answers 503; it retries Redis after ``retry_after`` seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from extproc.errors import GatewayError

__all__ = [
    "UNIT_SECONDS",
    "Admission",
    "Buckets",
    "Limits",
    "bucket_key",
    "limits_of",
    "rate_limited",
]

log = logging.getLogger("matrixinfer.extproc.ratelimit")

UNIT_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


@dataclass(slots=True, frozen=True)
class Limits:
    requests: int | None
    input: int | None
    output: int | None
    period: float  # seconds in one unit
    scope: str = "route"
    redis: str | None = None  # host:port for global buckets
    # (namespace, Secret name, key) of the Redis password (redis.passwordSecretRef)
    password_ref: tuple[str, str, str] | None = None


def limits_of(spec: Any, namespace: str = "default") -> Limits:
    """``Limits`` from a ``crds`` RateLimit object of a ModelRoute in ``namespace``."""
    g = getattr(spec, "global_", None)
    ref = g.redis.password_secret_ref if g is not None else None
    return Limits(
        requests=spec.requests_per_unit,
        input=spec.input_tokens_per_unit,
        output=spec.output_tokens_per_unit,
        period=UNIT_SECONDS[spec.unit],
        scope=spec.scope,
        redis=g.redis.address if g is not None else None,
        password_ref=(namespace, ref.name, ref.key) if ref is not None else None,
    )


def bucket_key(route_key: str, scope: str, tenant: str, user: str) -> str:
    if scope == "tenant":
        return f"{route_key}|t:{tenant}"
    if scope == "user":
        return f"{route_key}|u:{tenant}/{user}"
    return route_key


@dataclass(slots=True)
class Admission:
    ok: bool
    retry_after: float = 0.0  # seconds until the failing bucket allows a request
    headers: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    where: str = "local"  # local | redis: the bucket that holds the reservation
    ahead: bool = False  # admitted from this replica's view of Redis, charged behind it


_ADMITTED = Admission(True)


def _fmt(seconds: float) -> str:
    return f"{max(0.0, seconds):.3g}s"


def limit_headers(limits: Limits, levels: tuple[float, float, float]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, cap, level in (
        ("requests", limits.requests, levels[0]),
        ("input-tokens", limits.input, levels[1]),
        ("output-tokens", limits.output, levels[2]),
    ):
        if cap is None:
            continue
        out[f"x-ratelimit-limit-{name}"] = str(cap)
        out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(level)))
        out[f"x-ratelimit-reset-{name}"] = _fmt((cap - level) * limits.period / cap)
    return out


def decide(limits: Limits, levels: tuple[float, float, float]) -> tuple[bool, float, str]:
    """Whether a request may start at these bucket levels; else seconds until it may, and why."""
    wait = 0.0
    reason = ""
    r, i, o = levels
    if limits.requests is not None and r < 1:
        w = (1 - r) * limits.period / limits.requests
        if w > wait:
            wait, reason = w, f"requests per {_unit(limits)} ({limits.requests})"
    if limits.input is not None and i <= 0:
        w = (-i + 1) * limits.period / limits.input
        if w > wait:
            wait, reason = w, f"input tokens per {_unit(limits)} ({limits.input})"
    if limits.output is not None and o <= 0:
        w = (-o + 1) * limits.period / limits.output
        if w > wait:
            wait, reason = w, f"output tokens per {_unit(limits)} ({limits.output})"
    return wait == 0.0, wait, reason


def _unit(limits: Limits) -> str:
    for name, seconds in UNIT_SECONDS.items():
        if seconds == limits.period:
            return name
    return f"{limits.period:g}s"


def refill(levels: list[float], limits: Limits, dt: float) -> None:
    """Refill ``levels`` (requests, input, output) in place for ``dt`` seconds."""
    if dt > 0:
        for n, cap in enumerate((limits.requests, limits.input, limits.output)):
            if cap is not None:
                levels[n] = min(float(cap), levels[n] + dt * cap / limits.period)


class Buckets:
    """Per-process buckets. ``state[key] = [requests, input, output, updated]``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.state: dict[str, list[float]] = {}

    def _levels(self, key: str, limits: Limits, now: float) -> list[float]:
        st = self.state.get(key)
        caps = (limits.requests, limits.input, limits.output)
        if st is None:
            st = [float(c or 0) for c in caps] + [now]
            self.state[key] = st
            return st
        if now > st[3]:
            refill(st, limits, now - st[3])
            st[3] = now
        return st

    def admit(self, key: str, limits: Limits, estimate: int) -> Admission:
        st = self._levels(key, limits, self.clock())
        ok, wait, reason = decide(limits, (st[0], st[1], st[2]))
        if ok:
            if limits.requests is not None:
                st[0] -= 1
            if limits.input is not None:
                st[1] -= estimate
            return _ADMITTED  # headers are only sent with a 429: not built on the hot path
        return Admission(ok, wait, limit_headers(limits, (st[0], st[1], st[2])), reason)

    def settle(self, key: str, limits: Limits, estimate: int, prompt: int, completion: int) -> None:
        """Correct the input reservation to ``prompt`` and debit ``completion`` output tokens."""
        st = self._levels(key, limits, self.clock())
        if limits.input is not None:
            st[1] += estimate - prompt
            st[1] = min(float(limits.input), st[1])
        if limits.output is not None:
            st[2] -= completion

    def levels(self, key: str, limits: Limits) -> tuple[float, float, float]:
        st = self._levels(key, limits, self.clock())
        return st[0], st[1], st[2]

    def sweep(self, horizon: float) -> int:
        """Drop keys untouched for ``horizon`` seconds (they would be full again anyway)."""
        now = self.clock()
        old = [k for k, st in self.state.items() if now - st[3] > horizon]
        for k in old:
            del self.state[k]
        return len(old)


def rate_limited(admission: Admission, route: str) -> GatewayError:
    return GatewayError(
        429,
        f"rate limit of ModelRoute '{route}' reached: {admission.reason}; "
        f"retry after {math.ceil(admission.retry_after)}s",
        error_type="requests",
        code="rate_limit_exceeded",
    )


def limiter_unavailable(address: str) -> GatewayError:
    return GatewayError(
        503,
        f"the shared rate limiter (Redis at {address}) is unreachable and the gateway is "
        "configured fail-closed",
        error_type="service_unavailable",
        code="rate_limiter_unavailable",
    )
