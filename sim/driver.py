"""The asyncio loop that runs the pure engine against (scaled) wall time.

Simulated time is the engine's: while the engine is continuously busy, each step starts exactly
where the previous one ended (``frontier``), so every metric reads the timing model even when
the process cannot keep pace (e.g. at ``--time-scale 0.01``, below the event loop's timer
resolution). Wall pacing sleeps until each step's end; when the process is late it does not
sleep, it catches up. A request arriving while the engine is busy is stamped no later than the
current frontier, so queue times never go negative.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from sim.engine import Engine, Request
from sim.kvevents import KVEvent

__all__ = ["EngineDriver"]


class EngineDriver:
    """Owns the engine loop task; the HTTP edge submits requests and awaits their tokens."""

    def __init__(
        self,
        engine: Engine,
        time_scale: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        publish: Callable[[list[KVEvent]], object] | None = None,
    ) -> None:
        self.engine = engine
        self._publish = publish  # receives each step's KV events (sim.kvevents)
        self.scale = time_scale
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._frontier: float | None = None  # sim end of the last step while continuously busy
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- time

    def wall_now(self) -> float:
        """Simulated seconds derived from the wall clock."""
        return (self._clock() - self._t0) / self.scale

    def now(self) -> float:
        """The engine's current simulated time (never ahead of a busy engine's frontier)."""
        t = self.wall_now()
        f = self._frontier
        return f if f is not None and f < t else t

    # --------------------------------------------------------------- requests

    def submit(self, req: Request) -> None:
        """Queue a request (raises engine.QueueFull) and wake the loop."""
        self.engine.add(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        self.engine.abort(req, self.now())
        self._wake.set()

    async def wait(self, req: Request) -> None:
        """Until the request has tokens not yet marked ``sent`` or is done."""
        while not req.done and req.num_output <= req.sent:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            req.waiter = fut
            try:
                await fut
            finally:
                req.waiter = None

    def publish_events(self) -> None:
        """Hand the KV events recorded since the last call to the publisher (one batch)."""
        events = self.engine.kv.take_events()
        if events and self._publish is not None:
            self._publish(events)

    # --------------------------------------------------------------- loop

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _idle_wait(self, wall_timeout: float | None) -> bool:
        """Wait for a wake-up (True) or the timeout in wall seconds (False)."""
        try:
            if wall_timeout is None:
                await self._wake.wait()
            else:
                await asyncio.wait_for(self._wake.wait(), wall_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._wake.clear()

    async def run(self) -> None:
        engine = self.engine
        scale = self.scale
        while True:
            if not engine.has_work():
                self._frontier = None
                await self._idle_wait(None)
                continue
            start = self._frontier if self._frontier is not None else self.wall_now()
            batch = engine.schedule(start)
            if batch is None:
                # only PD transfers in flight: wait for the first to land (or new work)
                nxt = engine.next_transfer_time()
                if nxt is None:  # cannot happen with a valid config; do not spin
                    self._frontier = None
                    await self._idle_wait(0.05)
                    continue
                woke = await self._idle_wait(max(0.0, (nxt - self.wall_now()) * scale))
                self._frontier = None if woke else nxt
                continue
            self._frontier = batch.end
            delay = (batch.end - self.wall_now()) * scale
            await self._sleep(delay if delay > 0 else 0)
            updated = engine.finish_step(batch, batch.end)
            if self._publish is not None:
                self.publish_events()
            for req in updated:
                w = req.waiter
                if w is not None and not w.done():
                    w.set_result(None)
