"""The autoscaling planner: how many replicas each target of an AutoscalingPolicy should have.

Pure and clocked: a :class:`Planner` holds one policy's history (metric samples, past
recommendations, past replica counts) and answers :meth:`Planner.step` with a :class:`Decision`.
It knows nothing of Kubernetes, HTTP or Kopf; ``now`` comes from the injected clock.

One step, in order (each decision in one place):

1. **Windows.** Every metric keeps its samples; the *stable* average covers ``stable_window``
   (default 60 s), the *panic* average ``panic_window`` (default 6 s). A metric without a value
   this step (the source could not read it, or its sample was stale) is *missing*: it is
   reported and the step never scales down.
2. **Recommendation.** Per metric ``ceil(sum / targetValue)`` (values are already summed over
   pods or gateway replicas); within ``tolerancePercent`` of the current capacity a metric
   recommends the current count. The largest recommendation wins.
3. **Panic.** Entered when a metric's panic average exceeds ``panicThresholdPercent`` of the
   capacity (current replicas x targetValue); held ``panicModeHold`` after the last such step.
   In panic the panic-window recommendation counts too, there is no scale-down and the
   scale-up stabilisation window is skipped.
4. **Stabilisation** (as Kubernetes' HPA): scaling up goes to the smallest recommendation of the
   up window, scaling down to the largest of the down window.
5. **Scale to zero** only when every metric was present and exactly 0 for ``idle_window``
   (default: the scale-down stabilisation window, at least the stable window). **Wake from
   zero**: at zero any demand (e.g. the gateway's queue) asks for at least one replica at once.
6. **Rate limits** (``behavior``): over any ``period``, replicas rise at most ``instances`` /
   ``percent`` above the lowest count of that period (Or: the larger limit, And: the smaller),
   and fall likewise below the highest. A percent limit always allows one replica.
7. **Bounds** win over everything: the total stays in the target's min/max, and at least the
   largest active scheduled minimum (``scheduledMinimums``, evaluated in ``timeZone`` on the
   injected wall clock), capped by the max.
8. **Split** of the total over the targets: heterogeneous backends fill by cost, disaggregated
   roles keep the prefill:decode ratio (see :func:`allocate_by_cost`, :func:`split_roles`).
"""

from __future__ import annotations

import datetime
import math
import time
import zoneinfo
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from crds.common import parse_duration
from crds.cron import CronSchedule, parse_cron
from crds.registry import (
    AutoscalingPolicySpec,
    AutoscalingRules,
    ScalePolicy,
)

__all__ = [
    "Backend",
    "Decision",
    "Disaggregated",
    "Heterogeneous",
    "Homogeneous",
    "InvalidPolicy",
    "MetricGoal",
    "Mode",
    "PanicRule",
    "Planner",
    "RateRule",
    "Reason",
    "ScheduledWindow",
    "Settings",
    "Shape",
    "allocate_by_cost",
    "feasible_decode",
    "rate_bounds",
    "scheduled_minimum",
    "shape_of",
    "split_roles",
]

Mode = Literal["Stable", "Panic"]
Reason = Literal[
    "Steady",  # no change
    "ScaleUp",
    "ScaleDown",
    "PanicScaleUp",
    "WakeUp",  # from zero on demand
    "ScaleToZero",
    "Bounds",  # only the min/max moved the count
    "Scheduled",  # a scheduled minimum raised the count
    "Rebalance",  # same total, moved between backends or roles
]

DEFAULT_INTERVAL = 15.0  # seconds between two syncs of a policy (the handlers' timer)
DEFAULT_STABLE_WINDOW = 60.0
DEFAULT_PANIC_WINDOW = 6.0


class InvalidPolicy(ValueError):
    """The policy cannot be planned (e.g. a ratio the role bounds cannot meet); names why."""


# ----------------------------------------------------------------------------------------------
# settings (plain data from the API objects)


@dataclass(frozen=True, slots=True)
class MetricGoal:
    name: str
    target: float  # per replica


@dataclass(frozen=True, slots=True)
class RateRule:
    """At most `instances` or `percent` change per `period` seconds (`select` Or | And)."""

    instances: int | None = None
    percent: int | None = None
    period: float = 15.0
    select: Literal["Or", "And"] = "Or"
    stabilization: float = 0.0

    @classmethod
    def from_api(cls, p: ScalePolicy | None, default: RateRule) -> RateRule:
        if p is None:
            return default
        return cls(
            instances=p.instances,
            percent=p.percent,
            period=parse_duration(p.period),
            select=p.select_policy,
            stabilization=(
                parse_duration(p.stabilization_window) if p.stabilization_window else 0.0
            ),
        )


@dataclass(frozen=True, slots=True)
class PanicRule:
    percent: int = 1000
    period: float = 1.0
    threshold_percent: int = 200
    hold: float = 60.0


# Kubernetes HPA's defaults: up by max(4, 100 %) per 15 s; down by 100 % per 15 s after 300 s.
DEFAULT_UP = RateRule(instances=4, percent=100, period=15.0, select="Or")
DEFAULT_DOWN = RateRule(percent=100, period=15.0, stabilization=300.0)


@dataclass(frozen=True, slots=True)
class ScheduledWindow:
    """At least `min_replicas` for `duration` seconds from every minute `schedule` matches."""

    schedule: CronSchedule
    duration: float
    min_replicas: int


@dataclass(frozen=True, slots=True)
class Settings:
    metrics: tuple[MetricGoal, ...]
    tolerance_percent: int = 10
    up: RateRule = DEFAULT_UP
    down: RateRule = DEFAULT_DOWN
    panic: PanicRule | None = None  # None: no panic mode
    stable_window: float = DEFAULT_STABLE_WINDOW
    panic_window: float = DEFAULT_PANIC_WINDOW
    idle_window: float | None = None  # None: max(down.stabilization, stable_window)
    scheduled: tuple[ScheduledWindow, ...] = ()
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        if not self.metrics:
            raise InvalidPolicy("metrics: at least one metric is needed")
        for m in self.metrics:
            if not m.target > 0:
                raise InvalidPolicy(f"metrics[{m.name}].targetValue must be > 0, got {m.target}")

    @property
    def idle(self) -> float:
        if self.idle_window is not None:
            return self.idle_window
        return max(self.down.stabilization, self.stable_window)

    @classmethod
    def from_rules(
        cls,
        rules: AutoscalingRules,
        *,
        stable_window: float = DEFAULT_STABLE_WINDOW,
        panic_window: float = DEFAULT_PANIC_WINDOW,
    ) -> Settings:
        b = rules.behavior
        up_api = b.scale_up if b is not None else None
        panic_api = up_api.panic_policy if up_api is not None else None
        panic = None
        if panic_api is not None:
            panic = PanicRule(
                percent=panic_api.percent,
                period=parse_duration(panic_api.period),
                threshold_percent=panic_api.panic_threshold_percent,
                hold=parse_duration(panic_api.panic_mode_hold),
            )
        scheduled: tuple[ScheduledWindow, ...] = ()
        time_zone = "UTC"
        if isinstance(rules, AutoscalingPolicySpec):
            scheduled = tuple(
                ScheduledWindow(parse_cron(w.schedule), parse_duration(w.duration), w.min_replicas)
                for w in rules.scheduled_minimums or []
            )
            time_zone = rules.time_zone
        return cls(
            scheduled=scheduled,
            time_zone=time_zone,
            metrics=tuple(MetricGoal(m.name, m.target_value) for m in rules.metrics),
            tolerance_percent=rules.tolerance_percent,
            up=RateRule.from_api(up_api.stable_policy if up_api else None, DEFAULT_UP),
            down=RateRule.from_api(b.scale_down if b is not None else None, DEFAULT_DOWN),
            panic=panic,
            stable_window=stable_window,
            panic_window=panic_window,
        )


# ----------------------------------------------------------------------------------------------
# target shapes


@dataclass(frozen=True, slots=True)
class Homogeneous:
    name: str
    min_replicas: int
    max_replicas: int

    def target_keys(self) -> tuple[str, ...]:
        return (self.name,)

    def total_bounds(self) -> tuple[int, int]:
        return self.min_replicas, self.max_replicas


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    cost: float
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True, slots=True)
class Heterogeneous:
    backends: tuple[Backend, ...]
    expansion_percent: int = 200

    def target_keys(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def total_bounds(self) -> tuple[int, int]:
        return (
            sum(b.min_replicas for b in self.backends),
            sum(b.max_replicas for b in self.backends),
        )


@dataclass(frozen=True, slots=True)
class Disaggregated:
    name: str
    prefill_role: str
    decode_role: str
    prefill: tuple[int, int]  # min, max
    decode: tuple[int, int]
    ratio: tuple[int, int] | None  # prefill : decode; None: keep the current proportion

    def __post_init__(self) -> None:
        if self.ratio is not None and not feasible_decode(self):
            raise InvalidPolicy(
                f"ratioConstraint {self.ratio[0]}:{self.ratio[1]} cannot be met within"
                f" prefill {self.prefill[0]}..{self.prefill[1]} and decode"
                f" {self.decode[0]}..{self.decode[1]}"
            )

    @property
    def prefill_key(self) -> str:
        return f"{self.name}/{self.prefill_role}"

    @property
    def decode_key(self) -> str:
        return f"{self.name}/{self.decode_role}"

    def target_keys(self) -> tuple[str, ...]:
        return (self.prefill_key, self.decode_key)

    def total_bounds(self) -> tuple[int, int]:
        if self.ratio is None:
            return self.prefill[0] + self.decode[0], self.prefill[1] + self.decode[1]
        totals = [dn + pn for dn, pn in feasible_decode(self)]
        return min(totals), max(totals)


Shape = Homogeneous | Heterogeneous | Disaggregated


def shape_of(spec: AutoscalingPolicySpec) -> Shape:
    """The planner's view of the policy's one target."""
    if spec.homogeneous_target is not None:
        t = spec.homogeneous_target
        return Homogeneous(t.target_ref.name, t.min_replicas, t.max_replicas)
    if spec.heterogeneous_target is not None:
        h = spec.heterogeneous_target
        return Heterogeneous(
            tuple(Backend(p.target.name, p.cost, p.min_replicas, p.max_replicas) for p in h.params),
            h.cost_expansion_rate_percent,
        )
    if spec.disaggregated_target is not None:
        d = spec.disaggregated_target
        rc = d.ratio_constraint
        return Disaggregated(
            d.target_ref.name,
            d.prefill_role,
            d.decode_role,
            (d.prefill.min_replicas, d.prefill.max_replicas),
            (d.decode.min_replicas, d.decode.max_replicas),
            (rc.prefill, rc.decode) if rc is not None else None,
        )
    raise InvalidPolicy(
        "spec: exactly one of homogeneousTarget, heterogeneousTarget or"
        " disaggregatedTarget is needed"
    )


# ----------------------------------------------------------------------------------------------
# pure helpers


def scheduled_minimum(windows: Sequence[ScheduledWindow], zone: datetime.tzinfo, now: float) -> int:
    """The largest `min_replicas` of the windows active at `now` (epoch seconds): a window is
    active when its schedule matched a minute in (now - duration, now]. Minutes are stepped in
    UTC and read in `zone`, so daylight-saving changes neither skip nor repeat a window."""
    best = 0
    minute = math.floor(now / 60) * 60
    for w in windows:
        if w.min_replicas <= best:
            continue
        for i in range(int(w.duration // 60) + 1):
            start = minute - 60 * i
            if now - start >= w.duration:
                break
            if w.schedule.matches(datetime.datetime.fromtimestamp(start, zone)):
                best = w.min_replicas
                break
    return best


def rate_bounds(rule: RateRule, low: int, high: int, up: bool) -> int:
    """Scaling up: the most replicas allowed over `low` (the fewest in the period); scaling
    down: the fewest allowed under `high` (the most in the period)."""
    limits: list[int] = []
    if up:
        if rule.instances is not None:
            limits.append(low + rule.instances)
        if rule.percent is not None:
            limits.append(max(low + 1, math.ceil(low * (100 + rule.percent) / 100)))
        if not limits:
            return low
        return max(limits) if rule.select == "Or" else min(limits)
    if rule.instances is not None:
        limits.append(max(0, high - rule.instances))
    if rule.percent is not None:
        limits.append(max(0, min(high - 1, math.floor(high * (100 - rule.percent) / 100))))
    if not limits:
        return high
    return min(limits) if rule.select == "Or" else max(limits)


def feasible_decode(shape: Disaggregated) -> list[tuple[int, int]]:
    """Every (decode, prefill) pair within both bounds that keeps the ratio (prefill is
    decode x ratio, rounded either way)."""
    assert shape.ratio is not None
    p_lo, p_hi = shape.prefill
    out = []
    for dn in range(shape.decode[0], shape.decode[1] + 1):
        exact = dn * shape.ratio[0] / shape.ratio[1]
        for pn in sorted({math.ceil(exact), math.floor(exact)}, reverse=True):
            if p_lo <= pn <= p_hi:
                out.append((dn, pn))
                break
    return out


def split_roles(shape: Disaggregated, total: int, current: Mapping[str, int]) -> dict[str, int]:
    """Split `total` role instances into prefill and decode within their bounds and the ratio
    (absent ratio: the current proportion, 1:1 when a role is at zero)."""
    if shape.ratio is None:
        cp, cd = current.get(shape.prefill_key, 0), current.get(shape.decode_key, 0)
        rp, rd = (cp, cd) if cp > 0 and cd > 0 else (1, 1)
        pn = round(total * rp / (rp + rd))
        pn = min(max(pn, shape.prefill[0]), shape.prefill[1])
        dn = min(max(total - pn, shape.decode[0]), shape.decode[1])
        pn = min(max(total - dn, shape.prefill[0]), shape.prefill[1])
        return {shape.prefill_key: pn, shape.decode_key: dn}
    pairs = feasible_decode(shape)
    # the pair whose sum is closest to `total`; when the current counts keep the ratio, only
    # sums between the current total and `total`, so rounding never moves the other way
    now_total = current.get(shape.prefill_key, 0) + current.get(shape.decode_key, 0)
    lo, hi = sorted((now_total, total))
    between = [p for p in pairs if lo <= p[0] + p[1] <= hi]
    dn, pn = min(between or pairs, key=lambda p: (abs(p[0] + p[1] - total), -(p[0] + p[1])))
    return {shape.prefill_key: pn, shape.decode_key: dn}


def _eligible(backends: Sequence[Backend], alloc: Mapping[str, int], rate: int) -> list[Backend]:
    """Backends with headroom whose cost is within `rate` percent of the cheapest with headroom."""
    open_ = [b for b in backends if alloc[b.name] < b.max_replicas]
    if not open_:
        return []
    cheapest = min(b.cost for b in open_)
    return [b for b in open_ if b.cost * 100 <= cheapest * rate]


def _violation(
    backends: Sequence[Backend], alloc: Mapping[str, int], rate: int
) -> tuple[Backend, Backend] | None:
    """A pricier backend above its min while a cheaper one, beyond the expansion rate, has
    headroom: (pricier, cheaper)."""
    for hi in sorted(backends, key=lambda b: -b.cost):
        if alloc[hi.name] <= hi.min_replicas:
            continue
        for lo in sorted(backends, key=lambda b: b.cost):
            if lo.cost * rate < hi.cost * 100 and alloc[lo.name] < lo.max_replicas:
                return hi, lo
    return None


def allocate_by_cost(
    shape: Heterogeneous, total: int, current: Mapping[str, int]
) -> dict[str, int]:
    """Spread `total` replicas over the backends, starting from the current allocation.

    Adding: among backends with headroom whose cost is within ``costExpansionRatePercent`` of the
    cheapest with headroom, the one whose spend after adding (cost x (replicas + 1)) is least.
    Removing: from the most expensive backend above its min. Each backend stays in its bounds;
    a current allocation that uses a pricier backend while a much cheaper one has headroom is
    rebalanced (one replica moved at a time, placed as an added one).
    """
    bs = shape.backends
    lo_total, hi_total = shape.total_bounds()
    total = min(max(total, lo_total), hi_total)
    alloc = {b.name: min(max(current.get(b.name, 0), b.min_replicas), b.max_replicas) for b in bs}

    def add_one() -> None:
        cands = _eligible(bs, alloc, shape.expansion_percent)
        pick = min(cands, key=lambda b: (b.cost * (alloc[b.name] + 1), b.cost, b.name))
        alloc[pick.name] += 1

    while sum(alloc.values()) < total:
        add_one()
    while sum(alloc.values()) > total:
        above = [b for b in bs if alloc[b.name] > b.min_replicas]
        pick = max(above, key=lambda b: (b.cost, alloc[b.name], b.name))
        alloc[pick.name] -= 1
    for _ in range(hi_total + 1):
        v = _violation(bs, alloc, shape.expansion_percent)
        if v is None:
            break
        alloc[v[0].name] -= 1
        add_one()  # lands on a backend cheap enough: never back on v[0]
    return alloc


# ----------------------------------------------------------------------------------------------
# the stateful planner


@dataclass(frozen=True, slots=True)
class Decision:
    """One step's answer. `replicas` and `current` are keyed by target (ModelInfer name, or
    name/role for disaggregated targets)."""

    replicas: dict[str, int]
    current: dict[str, int]
    total_current: int
    total_desired: int
    mode: Mode
    reason: Reason
    missing: tuple[str, ...] = ()
    demand: dict[str, float] = field(default_factory=dict)  # stable-window sums per metric

    @property
    def changed(self) -> bool:
        return any(self.replicas[k] != self.current.get(k, 0) for k in self.replicas)


@dataclass(slots=True)
class _Series:
    samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, now: float, value: float, keep: float) -> None:
        self.samples.append((now, value))
        while self.samples and self.samples[0][0] < now - keep:
            self.samples.popleft()

    def average(self, now: float, window: float) -> float:
        vals = [v for t, v in self.samples if t >= now - window]
        return sum(vals) / len(vals) if vals else 0.0


class Planner:
    """One AutoscalingPolicy's history and decisions. Not thread-safe; one owner calls step()."""

    def __init__(
        self,
        settings: Settings,
        shape: Shape,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.shape = shape
        self.clock = clock  # for windows and rate limits
        self.wall_clock = wall_clock  # epoch seconds, for scheduled minimums
        self._zone = zoneinfo.ZoneInfo(settings.time_zone)
        self._series = {m.name: _Series() for m in settings.metrics}
        self._recs: deque[tuple[float, int]] = deque()  # (time, recommendation)
        self._timeline: deque[tuple[float, int]] = deque()  # (time, total replicas from then)
        self._panic_until: float | None = None
        self._started = clock()
        self._last_busy = self._started  # the last time any metric was non-zero (or missing)

    @property
    def mode(self) -> Mode:
        return "Panic" if self._in_panic(self.clock()) else "Stable"

    def _in_panic(self, now: float) -> bool:
        return self._panic_until is not None and now < self._panic_until

    def _keep(self) -> float:
        s = self.settings
        longest = max(
            s.stable_window,
            s.up.stabilization,
            s.down.stabilization,
            s.up.period,
            s.down.period,
            s.panic.period if s.panic else 0.0,
        )
        return longest + 1.0

    # -- one step ------------------------------------------------------------------------------

    def step(self, values: Mapping[str, float | None], current: Mapping[str, int]) -> Decision:
        """Record `values` (metric name → value summed over the target; None or absent: missing
        or stale) and decide the replicas of every target given the `current` counts."""
        s, now = self.settings, self.clock()
        keep = self._keep()
        cur = {k: max(0, int(current.get(k, 0))) for k in self.shape.target_keys()}
        total = sum(cur.values())
        self._note_total(now, total)

        missing: list[str] = []
        stable: dict[str, float] = {}
        panic_avg: dict[str, float] = {}
        for m in s.metrics:
            series = self._series[m.name]
            v = values.get(m.name)
            if v is None or not math.isfinite(v) or v < 0:
                missing.append(m.name)
                continue
            series.add(now, float(v), keep)
            stable[m.name] = series.average(now, s.stable_window)
            panic_avg[m.name] = series.average(now, s.panic_window)
        if missing or any(v > 0 for v in stable.values()):
            self._last_busy = now

        # 2. recommendation from the stable windows
        tol = s.tolerance_percent / 100
        recs = [total] if not stable else []
        for m in s.metrics:
            if m.name not in stable:
                continue
            need = math.ceil(stable[m.name] / m.target - 1e-9)
            if total > 0 and abs(stable[m.name] / (total * m.target) - 1) <= tol:
                need = total
            recs.append(need)
        rec = max(recs)

        # 3. panic
        in_panic = self._in_panic(now)
        if s.panic is not None and total > 0:
            over = any(
                panic_avg[m.name] * 100 > s.panic.threshold_percent * total * m.target
                for m in s.metrics
                if m.name in panic_avg
            )
            if over:
                self._panic_until = now + s.panic.hold
                in_panic = True
        if in_panic:
            for m in s.metrics:
                if m.name in panic_avg:
                    rec = max(rec, math.ceil(panic_avg[m.name] / m.target - 1e-9))
        waking = total == 0 and rec > 0

        # 4. stabilisation windows
        self._recs.append((now, rec))
        while self._recs and self._recs[0][0] < now - keep:
            self._recs.popleft()
        if rec > total and not in_panic and not waking and s.up.stabilization > 0:
            rec = max(total, min(r for t, r in self._recs if t >= now - s.up.stabilization))
        elif rec < total and s.down.stabilization > 0:
            rec = min(total, max(r for t, r in self._recs if t >= now - s.down.stabilization))

        # 5. no scale-down in panic or on missing metrics; zero only after the idle window
        if rec < total and (in_panic or missing):
            rec = total
        if rec == 0 and total > 0 and now - self._last_busy < s.idle:
            rec = 1

        # 6. rate limits over each period
        if rec > total:
            up_rule = s.up
            limit = rate_bounds(up_rule, self._low(now, up_rule.period), 0, up=True)
            if in_panic and s.panic is not None:
                prule = RateRule(percent=s.panic.percent, period=s.panic.period)
                limit = max(limit, rate_bounds(prule, self._low(now, prule.period), 0, up=True))
            rec = max(total, min(rec, limit))
        elif rec < total:
            floor_ = rate_bounds(s.down, 0, self._high(now, s.down.period), up=False)
            rec = min(total, max(rec, floor_))

        # 7. bounds, raised by an active scheduled minimum (capped by the max)
        lo, hi = self.shape.total_bounds()
        sched = scheduled_minimum(s.scheduled, self._zone, self.wall_clock()) if s.scheduled else 0
        scheduled = sched > lo and rec < min(sched, hi)
        lo = max(lo, min(sched, hi))
        bounded = min(max(rec, lo), hi)

        # 8. split
        replicas = self._split(bounded, cur)
        desired_total = sum(replicas.values())
        self._note_total(now, desired_total)
        reason = self._reason(total, desired_total, rec, replicas, cur, in_panic, waking)
        if reason == "Bounds" and scheduled and desired_total > total:
            reason = "Scheduled"
        return Decision(
            replicas=replicas,
            current=cur,
            total_current=total,
            total_desired=desired_total,
            mode="Panic" if in_panic else "Stable",
            reason=reason,
            missing=tuple(missing),
            demand=stable,
        )

    def _split(self, total: int, cur: Mapping[str, int]) -> dict[str, int]:
        shape = self.shape
        if isinstance(shape, Homogeneous):
            return {shape.name: total}
        if isinstance(shape, Heterogeneous):
            return allocate_by_cost(shape, total, cur)
        return split_roles(shape, total, cur)

    @staticmethod
    def _reason(
        total: int,
        desired: int,
        rec: int,
        replicas: Mapping[str, int],
        cur: Mapping[str, int],
        in_panic: bool,
        waking: bool,
    ) -> Reason:
        """`rec` is the count before bounds and split."""
        if desired == total:
            return "Rebalance" if any(replicas[k] != cur[k] for k in replicas) else "Steady"
        if desired > total:
            if rec <= total:
                return "Bounds"
            if waking:
                return "WakeUp"
            return "PanicScaleUp" if in_panic else "ScaleUp"
        if rec >= total:
            return "Bounds"
        return "ScaleToZero" if desired == 0 else "ScaleDown"

    # -- replica timeline for the rate limits --------------------------------------------------

    def _note_total(self, now: float, total: int) -> None:
        if not self._timeline or self._timeline[-1][1] != total:
            self._timeline.append((now, total))
        keep = self._keep()
        # keep one entry older than the window: it says what was in effect at the window's start
        while len(self._timeline) > 1 and self._timeline[1][0] <= now - keep:
            self._timeline.popleft()

    def _in_period(self, now: float, period: float) -> list[int]:
        start = now - period
        out = [n for t, n in self._timeline if t > start]
        before = [n for t, n in self._timeline if t <= start]
        if before:
            out.append(before[-1])
        return out

    def _low(self, now: float, period: float) -> int:
        return min(self._in_period(now, period))

    def _high(self, now: float, period: float) -> int:
        return max(self._in_period(now, period))
