"""The fair queue requests wait in while every candidate pod is saturated. Pure (injected clock).

Order of service:

1. **priority** first (higher number first; from the route's ``priorityHeader`` or the tenant
   tier);
2. then **fair share**: among the users waiting at that priority, the one with the least recent
   weighted token use (``input_weight`` x prompt tokens + ``output_weight`` x completion tokens
   over a sliding ``window``) goes first; a dispatch at once charges the estimate, so a
   flooding user cannot take two turns in a row from a light one;
3. **FIFO** within a user (ties between users: the older head first).

``max_queued`` bounds the queue (push answers False -> the caller answers 429). Removal (time-out,
client disconnect) is O(queue of that user).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FairQueue", "QueueEntry", "UsageWindow"]


@dataclass(slots=True, eq=False)
class QueueEntry:
    user: str
    priority: int
    estimate: int  # prompt tokens estimate, charged to the user on dispatch
    payload: Any = None
    seq: int = 0
    enqueued: float = 0.0
    queued: bool = False


class UsageWindow:
    """Weighted token use per user over a sliding window.

    Use is kept in ``slots`` time slots per window (a slot sums every settlement that falls in
    it), so a user's record is at most ``slots + 1`` numbers whatever the request rate, and the
    window slides by one slot (``window / slots``) at a time. Expired slots are dropped when the
    user is written or read, and users with nothing left in the window by a sweep once a window
    (every request settles here, queue or not: without this the record would grow for ever)."""

    def __init__(
        self,
        window: float = 60.0,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        slots: int = 60,
    ) -> None:
        self.window = window
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.clock = clock
        self.slot = window / slots
        self._events: dict[str, deque[list[float]]] = {}  # user -> [slot start, amount]
        self._next_sweep = clock() + window

    def __len__(self) -> int:
        """Users with use in the window (or not yet swept)."""
        return len(self._events)

    def add(self, user: str, input_tokens: float, output_tokens: float) -> None:
        amount = self.input_weight * input_tokens + self.output_weight * output_tokens
        if amount == 0:
            return
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        events = self._events.get(user)
        if events is None:
            events = self._events[user] = deque()
        start = now - now % self.slot
        if events and events[-1][0] == start:
            events[-1][1] += amount
        else:
            events.append([start, amount])
        self._trim(events, now)

    def use(self, user: str) -> float:
        events = self._events.get(user)
        if not events:
            return 0.0
        self._trim(events, self.clock())
        if not events:
            del self._events[user]
            return 0.0
        return sum(amount for _, amount in events)  # at most slots + 1 numbers

    def _expired(self, start: float, now: float) -> bool:
        """The slot starting at ``start`` holds nothing younger than the window."""
        return start + self.slot <= now - self.window

    def _trim(self, events: deque[list[float]], now: float) -> None:
        while events and self._expired(events[0][0], now):
            events.popleft()

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.window
        for user in [u for u, ev in self._events.items() if self._expired(ev[-1][0], now)]:
            del self._events[user]


@dataclass(slots=True)
class _Level:
    users: dict[str, deque[QueueEntry]] = field(default_factory=dict)
    size: int = 0


class FairQueue:
    def __init__(
        self,
        max_queued: int = 1000,
        usage: UsageWindow | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queued = max_queued
        self.clock = clock
        self.usage = usage or UsageWindow(clock=clock)
        self._levels: dict[int, _Level] = {}
        self._seq = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, entry: QueueEntry) -> bool:
        if self.size >= self.max_queued:
            return False
        self._seq += 1
        entry.seq = self._seq
        entry.enqueued = self.clock()
        entry.queued = True
        level = self._levels.setdefault(entry.priority, _Level())
        level.users.setdefault(entry.user, deque()).append(entry)
        level.size += 1
        self.size += 1
        return True

    def peek(self) -> QueueEntry | None:
        """The entry to serve next (not removed)."""
        if not self.size:
            return None
        level = self._levels[max(self._levels)]
        best: QueueEntry | None = None
        best_key: tuple[float, int] | None = None
        use = self.usage.use
        for user, entries in level.users.items():
            key = (use(user), entries[0].seq)
            if best_key is None or key < best_key:
                best, best_key = entries[0], key
        return best

    def pop(self) -> QueueEntry | None:
        entry = self.peek()
        if entry is not None:
            self.remove(entry)
            self.usage.add(entry.user, entry.estimate, 0)
        return entry

    def remove(self, entry: QueueEntry) -> bool:
        if not entry.queued:
            return False
        level = self._levels[entry.priority]
        entries = level.users[entry.user]
        if entries[0] is entry:
            entries.popleft()
        else:
            entries.remove(entry)
        if not entries:
            del level.users[entry.user]
        level.size -= 1
        if not level.size:
            del self._levels[entry.priority]
        self.size -= 1
        entry.queued = False
        return True

    def entries(self) -> Iterator[QueueEntry]:
        for level in self._levels.values():
            for entries in level.users.values():
                yield from entries

    def expired(self, max_wait: float) -> list[QueueEntry]:
        """Entries that waited longer than ``max_wait`` (not removed)."""
        horizon = self.clock() - max_wait
        return [e for e in self.entries() if e.enqueued < horizon]
