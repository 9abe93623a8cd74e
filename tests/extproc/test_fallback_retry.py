"""Envoy retries a pick of a dead pod on the fallbacks, following the ModelServer's traffic policy.

The shared stack scrapes every 0.1 s and a refused scrape marks a killed pod not ready at once, so
it may be noticed before any request is sent to it. These tests need a dead pod that the scheduler
still picks: their own stack scrapes every ``SLOW_SCRAPE_INTERVAL`` seconds, and each pod's first
scrape starts at its phase of that interval (minutes after the start), so during this module
nothing tells the extproc that the pod is gone. It stays "ready" and every pick of it reaches
Envoy: for the 'pool' server (trafficPolicy.retry on connect-failure) the request is retried on a
fallback and succeeds; for 'noretry' (no retry policy) it fails with 503.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from matrixinfer.process import wait_until
from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.extproc.conftest import start_stack
from tests.extproc.test_gateway_e2e import chat, envoy_retry_successes, picks, pod_state

pytestmark = pytest.mark.timeout(90)

SLOW_SCRAPE_INTERVAL = 600.0


@pytest.fixture(scope="module")
def blind_stack(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path, fleet: Fleet
) -> Iterator[GatewayStack]:
    """A stack whose scraper does not notice a killed pod during this module."""
    s = start_stack(
        config_dir,
        tmp_path_factory.mktemp("gateway-run-blind"),
        fleet,
        scrape_interval=SLOW_SCRAPE_INTERVAL,
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def blind_client(blind_stack: GatewayStack) -> Iterator[OpenAI]:
    c = OpenAI(base_url=blind_stack.url, api_key="unused", max_retries=0, timeout=20)
    yield c
    c.close()


def restart_and_wait(fleet: Fleet, victim: int, stack: GatewayStack) -> None:
    """Bring the pod back; the shared stack (scraping fast) must see it ready again before the
    next test uses it."""
    fleet.restart(victim)
    name = fleet.pods[victim].name
    wait_until(lambda: pod_state(stack, name)["ready"], 30, f"{name} ready again")


def test_dead_pod_picked_is_retried_on_a_fallback(
    blind_stack: GatewayStack, blind_client: OpenAI, fleet: Fleet, stack: GatewayStack
) -> None:
    victim = 3
    name = fleet.pods[victim].name
    retries_before = envoy_retry_successes(blind_stack)
    picked_before = picks(blind_stack).get(name, 0)
    fleet.kill(victim)
    try:
        served: list[str] = []
        # the scheduler still picks the dead pod now and then; keep going until it has a few times
        while len(served) < 80 and picks(blind_stack).get(name, 0) < picked_before + 3:
            served.append(chat(blind_client)[0])  # raises if any request fails
        picked = picks(blind_stack).get(name, 0) - picked_before
        assert picked >= 1, "the dead pod was never chosen"
        assert name not in served
        # every pick of the dead pod was a connect failure that Envoy retried on a fallback
        assert envoy_retry_successes(blind_stack) - retries_before >= picked
        assert pod_state(blind_stack, name)["ready"], "this stack was meant not to notice"
    finally:
        restart_and_wait(fleet, victim, stack)


def test_retries_follow_the_model_server_traffic_policy(
    blind_stack: GatewayStack, blind_client: OpenAI, fleet: Fleet, stack: GatewayStack
) -> None:
    """'pool' retries connect failures (trafficPolicy.retry); 'noretry' has no retry policy."""
    victim = 1
    name = fleet.pods[victim].name
    fleet.kill(victim)
    try:
        failed = 0
        ok = 0
        for _ in range(60):
            before = picks(blind_stack).get(name, 0)
            try:
                pod, _ = chat(blind_client, model="noretry-model")
            except openai.InternalServerError as exc:
                assert exc.status_code == 503
                failed += 1
                # a 503 only when the dead pod was picked
                assert picks(blind_stack).get(name, 0) == before + 1
            else:
                ok += 1
                assert pod != name
                assert picks(blind_stack).get(name, 0) == before  # not picked: served fine
            assert chat(blind_client)[0] != name  # 'pool' never fails: retried on a fallback
            if failed >= 2 and ok >= 2:
                break
        assert failed, "no request of the no-retry server was sent to the dead pod"
        assert ok, "every no-retry request failed, not only those picking the dead pod"
        assert pod_state(blind_stack, name)["ready"], "this stack was meant not to notice"
    finally:
        restart_and_wait(fleet, victim, stack)
