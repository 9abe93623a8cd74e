"""Scheduled minimums: the cron parser, the API's validation, and the planner's windows."""

from __future__ import annotations

import datetime
import zoneinfo
from dataclasses import dataclass

import pytest

import crds
from controllers.autoscaling.planner import (
    Homogeneous,
    MetricGoal,
    Planner,
    RateRule,
    ScheduledWindow,
    Settings,
    scheduled_minimum,
)
from crds.cron import parse_cron

PARIS = zoneinfo.ZoneInfo("Europe/Paris")


def at(text: str, zone: datetime.tzinfo = PARIS) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def local(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def test_cron_fields_ranges_steps_names_and_day_or() -> None:
    c = parse_cron("30 7 * * MON-FRI")
    assert c.matches(local("2026-12-07T07:30"))  # a Monday
    assert not c.matches(local("2026-12-06T07:30"))  # a Sunday
    assert not c.matches(local("2026-12-07T07:31"))
    c = parse_cron("*/15 8-10/2 1,15 JAN,jun *")
    assert c.matches(local("2026-06-15T10:45")) and not c.matches(local("2026-06-15T09:45"))
    assert not c.matches(local("2026-07-15T10:45"))
    # day of month and day of week both restricted: either matches (as cron does)
    c = parse_cron("0 0 13 * 5")
    assert c.matches(local("2026-11-13T00:00")) and c.matches(local("2026-12-04T00:00"))
    assert parse_cron("0 0 * * 7").matches(local("2026-12-06T00:00"))  # 7 is Sunday


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("* * * *", "expected 5 fields"),
        ("61 * * * *", "minute field: 61 is outside 0-59"),
        ("0 5-2 * * *", "hour field: range '5-2' runs backwards"),
        ("0 0 * FOO *", "month field: 'FOO' is not a number or a name"),
        ("0 0 * * */0", "day of week field: step must be >= 1"),
        ("0 0 * * 1,,2", "day of week field: bad part ''"),
    ],
)
def test_cron_errors_name_the_field(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        parse_cron(expr)


def policy(**spec: object) -> dict[str, object]:
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "AutoscalingPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "metrics": [{"name": "q", "targetValue": 1}],
            "homogeneousTarget": {"targetRef": {"name": "mi"}, "maxReplicas": 8},
            **spec,
        },
    }


def window(schedule: str, duration: str, n: int) -> dict[str, object]:
    return {"schedule": schedule, "duration": duration, "minReplicas": n}


def test_api_accepts_scheduled_minimums_and_rejects_bad_ones() -> None:
    ok = crds.parse_object(
        policy(
            timeZone="Europe/Paris",
            scheduledMinimums=[
                {"schedule": "30 7 * * MON-FRI", "duration": "10h", "minReplicas": 4}
            ],
        )
    )
    assert ok.spec.scheduled_minimums[0].min_replicas == 4
    assert Settings.from_rules(ok.spec).time_zone == "Europe/Paris"
    with pytest.raises(crds.InvalidObject, match="minute field: 99 is outside 0-59"):
        crds.parse_object(
            policy(
                scheduledMinimums=[{"schedule": "99 7 * * *", "duration": "1h", "minReplicas": 1}]
            )
        )
    with pytest.raises(crds.InvalidObject, match="duration must be at most 24h"):
        crds.parse_object(
            policy(
                scheduledMinimums=[{"schedule": "0 7 * * *", "duration": "25h", "minReplicas": 1}]
            )
        )
    with pytest.raises(crds.InvalidObject, match="unknown time zone 'Mars/Olympus'"):
        crds.parse_object(policy(timeZone="Mars/Olympus"))


def test_scheduled_minimum_windows_in_the_time_zone() -> None:
    weekday_mornings = ScheduledWindow(parse_cron("30 7 * * MON-FRI"), 10 * 3600, 4)
    nightly = ScheduledWindow(parse_cron("0 23 * * *"), 2 * 3600, 2)
    windows = [weekday_mornings, nightly]
    assert scheduled_minimum(windows, PARIS, at("2026-12-07T07:29")) == 0
    assert scheduled_minimum(windows, PARIS, at("2026-12-07T07:30")) == 4
    assert scheduled_minimum(windows, PARIS, at("2026-12-07T17:29:59")) == 4
    assert scheduled_minimum(windows, PARIS, at("2026-12-07T17:30")) == 0
    assert scheduled_minimum(windows, PARIS, at("2026-12-06T12:00")) == 0  # Sunday
    assert scheduled_minimum(windows, PARIS, at("2026-12-08T00:30")) == 2  # across midnight
    # the same instant in UTC is an hour earlier in winter: 07:30 Paris is 06:30 UTC
    assert scheduled_minimum(windows, datetime.UTC, at("2026-12-07T07:30")) == 0


def test_daylight_saving_day_keeps_the_window_in_local_time() -> None:
    w = [ScheduledWindow(parse_cron("30 7 * * *"), 3600, 3)]
    # 29 March 2026: Paris moves from UTC+1 to UTC+2 at 02:00
    assert scheduled_minimum(w, PARIS, at("2026-03-29T07:45")) == 3
    assert scheduled_minimum(w, PARIS, at("2026-03-29T06:45")) == 0


@dataclass
class Clock:
    t: float

    def __call__(self) -> float:
        return self.t


def test_planner_raises_to_the_scheduled_minimum_and_lets_go_after() -> None:
    wall = Clock(at("2026-12-07T07:00"))
    mono = Clock(1000.0)
    s = Settings(
        metrics=(MetricGoal("q", 10.0),),
        up=RateRule(instances=10, period=1.0),
        down=RateRule(instances=10, period=1.0),
        stable_window=1.0,
        scheduled=(ScheduledWindow(parse_cron("30 7 * * MON-FRI"), 3600, 4),),
        time_zone="Europe/Paris",
    )
    p = Planner(s, Homogeneous("mi", 1, 3), mono, wall)
    assert p.step({"q": 5.0}, {"mi": 1}).replicas == {"mi": 1}
    wall.t, mono.t = at("2026-12-07T07:30"), mono.t + 1800
    d = p.step({"q": 5.0}, {"mi": 1})
    assert d.replicas == {"mi": 3} and d.reason == "Scheduled"  # 4 capped by maxReplicas 3
    wall.t, mono.t = at("2026-12-07T08:31"), mono.t + 3660
    d = p.step({"q": 5.0}, {"mi": 3})
    assert d.replicas == {"mi": 1} and d.reason == "ScaleDown"
