"""Token and request budgets (``ModelRoute.rateLimit``): admit on an estimate, settle on usage.

The pure core is :class:`Buckets` (plain dicts, injected clock). Each budgeted key holds up to three
continuously refilled buckets of ``limit`` per ``unit`` (capacity ``limit``):

- **requests**: admission needs one whole request (level >= 1) and takes it;
- **input tokens**: admission needs a positive level and reserves the estimate (chars/4); the
  settlement corrects the reservation to the exact ``prompt_tokens``;
- **output tokens**: admission reserves the request's output (:func:`output_reservation`: its
  ``max_tokens``, else the route's ``outputTokensEstimate``, else the whole budget; at most the
  budget) and needs a level that covers it; the settlement replaces the reservation with the
  exact ``completion_tokens`` (a refund, or debt for an answer beyond its reservation).

A bucket may go into debt (a large request, or a large answer); later requests get 429 until the
refill has repaid it, so no request size escapes the budget. Over any window the admitted input is
at most the budget plus its refill plus one request's estimate; the admitted output (reservations
of open requests, exact usage of settled ones) is at most the budget plus its refill, plus only
what answers produced beyond their reservations — nothing when every ``max_tokens`` is within the
budget — whatever the concurrency.

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
    "Decision",
    "Limits",
    "bucket_key",
    "limits_of",
    "output_reservation",
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
    # output tokens a request without max_tokens reserves (rateLimit.outputTokensEstimate); None:
    # the whole output budget. Used at admission only (a charge carries its reservation).
    output_estimate: int | None = None


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
        output_estimate=spec.output_tokens_estimate,
    )


def output_reservation(limits: Limits, max_tokens: int | None) -> int:
    """Output tokens a request reserves at admission: its ``max_tokens`` (or
    ``max_completion_tokens``), else the route's ``output_estimate``, else the whole budget — at
    most the budget, so that a full bucket always admits; 0 without an output limit."""
    cap = limits.output
    if cap is None:
        return 0
    if max_tokens is None:
        max_tokens = limits.output_estimate if limits.output_estimate is not None else cap
    return min(max_tokens, cap)


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
    limit: str = ""  # the refusing bucket: requests | input-tokens | output-tokens
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


@dataclass(slots=True, frozen=True)
class Decision:
    """:func:`decide`'s answer: ``ok``, else ``wait`` seconds until the refusing bucket (``limit``:
    requests | input-tokens | output-tokens) admits, and ``reason`` in words."""

    ok: bool
    wait: float = 0.0
    reason: str = ""
    limit: str = ""


_OK = Decision(True)


def output_needed(reserve: int) -> int:
    """The output level an admission reserving ``reserve`` tokens needs (at least 1: a bucket in
    debt, or empty, admits nothing)."""
    return max(reserve, 1)


def decide(limits: Limits, levels: tuple[float, float, float], output: int = 0) -> Decision:
    """Whether a request reserving ``output`` tokens may start at these bucket levels: a whole
    request, a positive input level, an output level covering the reservation."""
    wait = 0.0
    reason = limit = ""
    r, i, o = levels
    if limits.requests is not None and r < 1:
        w = (1 - r) * limits.period / limits.requests
        if w > wait:
            wait, limit = w, "requests"
            reason = f"requests per {_unit(limits)} ({limits.requests})"
    if limits.input is not None and i <= 0:
        w = (-i + 1) * limits.period / limits.input
        if w > wait:
            wait, limit = w, "input-tokens"
            reason = f"input tokens per {_unit(limits)} ({limits.input})"
    if limits.output is not None and o < (need := output_needed(output)):
        w = (need - o) * limits.period / limits.output
        if w > wait:
            wait, limit = w, "output-tokens"
            reason = f"output tokens per {_unit(limits)} ({limits.output})"
            if output > 1:
                left = max(0, math.floor(o))
                reason += f" — this request reserves {output} for its output, {left} left"
    return _OK if wait == 0.0 else Decision(False, wait, reason, limit)


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

    def admit(self, key: str, limits: Limits, estimate: int, output: int = 0) -> Admission:
        """Admit a request reserving ``estimate`` input and ``output`` output tokens (see
        :func:`output_reservation`), or say which bucket refuses and for how long."""
        st = self._levels(key, limits, self.clock())
        d = decide(limits, (st[0], st[1], st[2]), output)
        if d.ok:
            if limits.requests is not None:
                st[0] -= 1
            if limits.input is not None:
                st[1] -= estimate
            if limits.output is not None:
                st[2] -= output
            return _ADMITTED  # headers are only sent with a 429: not built on the hot path
        return refused(limits, (st[0], st[1], st[2]), d)

    def settle(
        self,
        key: str,
        limits: Limits,
        estimate: int,
        prompt: int,
        completion: int,
        reserved: int = 0,
    ) -> None:
        """Correct the input reservation ``estimate`` to ``prompt`` and the output reservation
        ``reserved`` to ``completion`` (a refund, or debt); a level never refills beyond its cap."""
        st = self._levels(key, limits, self.clock())
        if limits.input is not None:
            st[1] = min(float(limits.input), st[1] + estimate - prompt)
        if limits.output is not None:
            st[2] = min(float(limits.output), st[2] + reserved - completion)

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


def refused(limits: Limits, levels: tuple[float, float, float], d: Decision) -> Admission:
    """The refusal of :func:`decide`'s ``d`` at ``levels``, with its x-ratelimit headers."""
    return Admission(False, d.wait, limit_headers(limits, levels), d.reason, d.limit)


def rate_limited(admission: Admission, route: str) -> GatewayError:
    """The 429 of a refused admission; its type names the kind of limit, as OpenAI's does:
    ``requests`` for the request budget, ``tokens`` for a token budget."""
    return GatewayError(
        429,
        f"rate limit of ModelRoute '{route}' reached: {admission.reason}; "
        f"retry after {math.ceil(admission.retry_after)}s",
        error_type="requests" if admission.limit == "requests" else "tokens",
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
