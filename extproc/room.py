"""Requests waiting in the gateway until a pod of their ModelServer has room: one mechanism for
the fair queue with policies and the line for room without. Each ModelServer's waiting requests
are a :class:`extproc.policies.queue.FairQueue`: with policies each entry carries its user and
priority (priority, then fair share); in the line for room every entry has the same (no user,
priority 0), which makes the queue first come first served.

Each entry carries a :class:`Waiter`: the schedule stage to try (``attempt``) and the future its
waiting task awaits. :meth:`RoomWaits.serve` tries the queue's next entry while a pod takes it:
it stops while every pod is saturated or none is ready (``AllPodsSaturated`` / ``NoPodReady``: a
newcomer would wait then too); any other failure is that entry's answer, as a newcomer's, and
the next entry is tried. Serving runs when a request of the server finishes (:meth:`freed`),
when a newcomer joins behind others, and every ``interval`` seconds while anything waits (a
scrape may show room without a request finishing).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from extproc.policies.queue import FairQueue, QueueEntry, UsageWindow
from extproc.scheduling.types import AllPodsSaturated, NoPodReady

__all__ = ["QUEUE_TIMEOUT_MARGIN", "RoomWaits", "Waiter", "queue_notice"]

# Seconds added to a request's wait when its ext_proc message timeout is extended for it: the
# extproc's own 503 (+ Retry-After) at the end of the wait must beat Envoy's timeout. The xDS
# generator's max_message_timeout keeps a larger margin (QUEUE_TIMEOUT_MARGIN_MS, 5 s).
QUEUE_TIMEOUT_MARGIN = 2.0

# Set by the ext_proc edge for the request its task serves: awaited with the seconds the request
# may now wait, once it waits (the edge tells Envoy to wait that long for the message).
queue_notice: contextvars.ContextVar[Callable[[float], Awaitable[None]] | None] = (
    contextvars.ContextVar("matrixinfer_queue_notice", default=None)
)


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True, eq=False)
class Waiter:
    """A waiting request (a queue entry's payload): ``attempt()``, the schedule stage on the
    server's current pods, resolves ``future`` when it finds a pod, or fails it with its
    answer."""

    attempt: Callable[[], Any]
    request_id: str = ""
    future: asyncio.Future[Any] = field(default_factory=_future)


class RoomWaits:
    """Requests waiting for room, by server key. ``queues`` holds a server's queue only while
    something waits for it; entries are charged to ``usage`` as they are served (fair share).
    ``freed_limit``: entries served at most when a request finishes or a newcomer joins behind
    others; ``tick_limit``: per server every ``interval`` seconds."""

    __slots__ = ("_ticker", "clock", "freed_limit", "interval", "queues", "tick_limit", "usage")

    def __init__(
        self,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        usage: UsageWindow | None = None,
        freed_limit: int = 1 << 30,
        tick_limit: int = 1 << 30,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.usage = usage if usage is not None else UsageWindow(clock=clock)
        self.freed_limit = freed_limit
        self.tick_limit = tick_limit
        self.queues: dict[str, FairQueue] = {}
        self._ticker: asyncio.Task[None] | None = None

    def waiting(self, key: str) -> bool:
        """Whether requests wait for this server (a newcomer then joins behind them)."""
        return key in self.queues

    def join(self, key: str, entry: QueueEntry) -> None:
        """Add ``entry`` (its payload a :class:`Waiter`) to the server's queue; behind others,
        serve the queue at once (a pod may have room: it goes to the queue's next entry, the
        newcomer only if it is that entry)."""
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = FairQueue(1 << 62, self.usage, self.clock)
        ahead = len(queue)
        queue.push(entry)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())
        if ahead:
            self.serve(key, self.freed_limit)

    def leave(self, key: str, entry: QueueEntry) -> None:
        """Take ``entry`` out of the server's queue (served already, timed out or gone)."""
        queue = self.queues.get(key)
        if queue is not None:
            queue.remove(entry)
            if not queue:
                del self.queues[key]
        if not self.queues and self._ticker is not None:
            self._ticker.cancel()  # nothing waits: no more tries
            self._ticker = None

    def serve(self, key: str, limit: int = 1 << 30) -> int:
        """Serve the server's queue while a pod takes its next entry (``limit`` at most): the
        next entry keeps its place while every pod is saturated or none is ready; any other
        failure (e.g. no pod has its LoRA adapter, or a scheduler bug) is that entry's answer and
        the queue goes on. The number served."""
        queue = self.queues.get(key)
        served = 0
        while queue and served < limit:
            entry = queue.peek()
            assert entry is not None
            waiter: Waiter = entry.payload
            if waiter.future.done():  # gone (timed out, cancelled)
                queue.remove(entry)
                continue
            try:
                result = waiter.attempt()
            except (AllPodsSaturated, NoPodReady):  # the queue waits on
                break
            except Exception as exc:  # its answer, not the queue's
                queue.pop()
                waiter.future.set_exception(exc)
                continue
            queue.pop()
            waiter.future.set_result(result)
            served += 1
        if queue is not None and not queue:
            del self.queues[key]
        return served

    def freed(self, key: str) -> None:
        """A request of the server finished: serve its queue soon (once the caller is done)."""
        if key in self.queues:
            with contextlib.suppress(RuntimeError):  # no loop: nothing waits either
                asyncio.get_running_loop().call_soon(self.serve, key, self.freed_limit)

    async def wait(
        self,
        key: str,
        entry: QueueEntry,
        seconds: float,
        undo: Callable[[Any], None],
        notify: bool = True,
    ) -> Any:
        """Wait in the server's queue until ``entry``'s attempt finds a pod (its result) or fails
        (its exception), at most ``seconds`` (then TimeoutError). ``notify``: tell Envoy to wait
        that long for this message (:data:`queue_notice`). A result that came just as the wait
        ended (timed out, cancelled) is ``undo``ne."""
        future = entry.payload.future
        self.join(key, entry)
        served = False
        try:
            notice = queue_notice.get() if notify else None
            if notice is not None:
                await notice(seconds + QUEUE_TIMEOUT_MARGIN)
            # (not wait_for: it would swallow the client's cancellation once scheduled)
            await asyncio.wait((future,), timeout=seconds)
            if not future.done():
                raise TimeoutError
            served = True
            return future.result()  # or the error that is its answer
        finally:
            self.leave(key, entry)
            if not served:
                if not future.done():
                    future.cancel()
                elif not future.cancelled() and future.exception() is None:
                    undo(future.result())  # scheduled just as the waiter gave up

    async def _tick(self) -> None:
        """While anything waits: serve every queue each ``interval`` seconds."""
        while self.queues:
            await asyncio.sleep(self.interval)
            for key in list(self.queues):
                self.serve(key, self.tick_limit)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
