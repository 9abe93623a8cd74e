"""Five-field cron expressions (minute hour day-of-month month day-of-week), parsed and matched.

Syntax per field: ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S``, ``N/S`` and comma lists; months
``JAN``-``DEC`` and weekdays ``SUN``-``SAT`` by name; weekday 0 and 7 are Sunday. As in cron,
when both day-of-month and day-of-week are restricted, a day matching either matches.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

__all__ = ["CRON_PATTERN", "CronSchedule", "parse_cron"]

CRON_PATTERN = r"^\s*\S+\s+\S+\s+\S+\s+\S+\s+\S+\s*$"

_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_NAMES = {
    3: {m: i + 1 for i, m in enumerate(_MONTHS)},
    4: {d: i for i, d in enumerate(_WEEKDAYS)},
}
_PART = re.compile(r"^(\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/([0-9]+))?$")


@dataclass(frozen=True, slots=True)
class CronSchedule:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is "*"
    any_weekday: bool

    def matches(self, t: datetime.datetime) -> bool:
        """Whether the minute of `t` (in its own time zone) is a match."""
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow


def _value(text: str, index: int, name: str, lo: int, hi: int) -> int:
    names = _NAMES.get(index, {})
    v = names.get(text.upper())
    if v is None:
        if not text.isdigit():
            raise ValueError(f"{name} field: {text!r} is not a number or a name")
        v = int(text)
    if not lo <= v <= hi:
        raise ValueError(f"{name} field: {v} is outside {lo}-{hi}")
    return v


def parse_cron(expr: str) -> CronSchedule:
    """Parse a five-field cron expression; ValueError names the field and the bad part."""
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(
            f"cron expression {expr!r}: expected 5 fields (minute hour day-of-month month"
            f" day-of-week), got {len(parts)}"
        )
    sets: list[frozenset[int]] = []
    for index, (text, (name, lo, hi)) in enumerate(zip(parts, _FIELDS, strict=True)):
        values: set[int] = set()
        for item in text.split(","):
            m = _PART.match(item)
            if m is None:
                raise ValueError(f"cron expression {expr!r}: {name} field: bad part {item!r}")
            base, step_text = m.group(1), m.group(2)
            step = int(step_text) if step_text else 1
            if step < 1:
                raise ValueError(f"cron expression {expr!r}: {name} field: step must be >= 1")
            try:
                if base == "*":
                    a, b = lo, hi
                elif "-" in base:
                    x, y = base.split("-", 1)
                    a, b = _value(x, index, name, lo, hi), _value(y, index, name, lo, hi)
                    if a > b:
                        raise ValueError(f"{name} field: range {base!r} runs backwards")
                else:
                    a = _value(base, index, name, lo, hi)
                    b = hi if step_text else a
            except ValueError as exc:
                raise ValueError(f"cron expression {expr!r}: {exc}") from None
            values.update(range(a, b + 1, step))
        if index == 4 and 7 in values:
            values = (values - {7}) | {0}
        sets.append(frozenset(values))
    return CronSchedule(
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=sets[4],
        any_day=parts[2] == "*",
        any_weekday=parts[4] == "*",
    )
