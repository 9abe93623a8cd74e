"""The gateway end to end with the extproc on ``--transport grpc`` (grpc.aio, the library
implementation; the default is the hand-written ``h2`` transport, extproc/transport/h2.py).

The key tests of ``test_gateway_e2e`` run again here against a stack whose extproc serves ext_proc
through grpc.aio instead of the default h2 transport: routing and pinning, the forged destination
header, streaming, 400/404/413/503 answers, a killed pod avoided, a dead pod's pick retried
on a fallback (test_fallback_retry), fail-closed/fail-open when the
extproc dies, FULL_DUPLEX_STREAMED, and gRPC health.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from matrixinfer.stack import GatewayStack
from sim.fleet import Fleet
from tests.extproc import conftest
from tests.extproc.conftest import start_stack
from tests.extproc.test_fallback_retry import (  # noqa: F401  (fixture and tests rerun here)
    SLOW_SCRAPE_INTERVAL,
    blind_client,
    test_dead_pod_picked_is_retried_on_a_fallback,
    test_retries_follow_the_model_server_traffic_policy,
)
from tests.extproc.test_gateway_e2e import (  # noqa: F401  (fixture and tests rerun here)
    client,
    test_400_bad_request,
    test_404_no_matching_rule_names_the_route,
    test_404_unknown_model_names_it,
    test_413_over_the_body_limit,
    test_413_without_content_length,
    test_503_when_no_pod_is_ready,
    test_client_forged_destination_header_is_ignored,
    test_extproc_killed,
    test_full_duplex_streamed_body_mode,
    test_grpc_health_service,
    test_killed_pod_is_avoided_and_no_request_fails,
    test_model_rewrite_reaches_the_pod,
    test_pinned_route_lands_on_the_chosen_pod,
    test_streaming_through_envoy,
    test_the_pod_the_extproc_picks_serves_the_request,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def _stacks_started_inside_tests_run_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    # test_extproc_killed / test_full_duplex_streamed_body_mode start their own stack through
    # tests.extproc.conftest.start_stack (imported at call time)
    monkeypatch.setattr(conftest, "start_stack", functools.partial(start_stack, transport="grpc"))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path, fleet: Fleet
) -> Iterator[GatewayStack]:
    s = start_stack(
        config_dir, tmp_path_factory.mktemp("gateway-run-grpc"), fleet, transport="grpc"
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def blind_stack(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path, fleet: Fleet
) -> Iterator[GatewayStack]:
    """test_fallback_retry's stack that does not notice a killed pod, on grpc.aio."""
    s = start_stack(
        config_dir,
        tmp_path_factory.mktemp("gateway-run-blind-grpc"),
        fleet,
        scrape_interval=SLOW_SCRAPE_INTERVAL,
        transport="grpc",
    )
    try:
        yield s
    finally:
        s.stop()


def test_the_extproc_really_runs_grpc_aio(stack: GatewayStack) -> None:
    argv = stack.extproc.argv
    assert argv[argv.index("--transport") + 1] == "grpc"
    assert "serving ext_proc on " in stack.extproc.log_tail(200)  # grpc.aio's start line
