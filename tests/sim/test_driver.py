"""The asyncio driver on an injected clock: metrics follow the model even when sleeps overshoot."""

from __future__ import annotations

import asyncio

import pytest

from sim.config import EngineConfig
from sim.driver import EngineDriver
from sim.engine import Engine, Request

pytestmark = pytest.mark.timeout(20)


class FakeTime:
    """A clock that only moves when the driver sleeps; ``overshoot`` mimics a coarse timer."""

    def __init__(self, overshoot: float = 0.0) -> None:
        self.t = 100.0
        self.overshoot = overshoot

    def clock(self) -> float:
        return self.t

    async def sleep(self, dt: float) -> None:
        self.t += max(dt, 0.0) + self.overshoot
        await asyncio.sleep(0)


async def drain(driver: EngineDriver, req: Request) -> None:
    while not req.done:
        await driver.wait(req)
        req.sent = req.num_output


@pytest.mark.parametrize("overshoot", [0.0, 0.004])
async def test_driver_follows_the_timing_model(overshoot: float) -> None:
    ft = FakeTime(overshoot)
    engine = Engine(EngineConfig())
    driver = EngineDriver(engine, 1.0, clock=ft.clock, sleep=ft.sleep)
    driver.start()
    try:
        a = Request("a", [2000 + i for i in range(1000)], [7] * 20, arrival=driver.now())
        driver.submit(a)
        while a.num_output < 5:
            await driver.wait(a)
            a.sent = a.num_output
        b = Request("b", [5] * 100, [7] * 5, arrival=driver.now())  # arrives mid-flight
        driver.submit(b)
        await asyncio.gather(drain(driver, a), drain(driver, b))
    finally:
        await driver.stop()
    assert a.first_token is not None
    assert a.first_token - a.arrival == pytest.approx(0.010 + 1000 * 6.8e-5)
    assert b.first_scheduled is not None and b.first_scheduled >= b.arrival
    s = engine.stats
    assert s.queue.sum >= 0
    # every gap is a whole number of model steps: overshoot never leaks into the metrics
    assert s.itl.mean() == pytest.approx(0.0101, abs=0.0015)
    assert s.success["length"] == 2 and not engine.has_work()


async def test_wall_pacing_at_time_scale() -> None:
    ft = FakeTime()
    engine = Engine(EngineConfig())
    driver = EngineDriver(engine, 0.5, clock=ft.clock, sleep=ft.sleep)
    driver.start()
    try:
        r = Request("r", [1] * 16, [7] * 10, arrival=driver.now())
        start = ft.t
        driver.submit(r)
        await drain(driver, r)
    finally:
        await driver.stop()
    assert r.finished_at is not None
    sim_elapsed = r.finished_at - r.arrival
    assert ft.t - start == pytest.approx(sim_elapsed * 0.5)  # wall = simulated x time scale
