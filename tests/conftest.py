"""Shared pytest fixtures: every integration test starts its own processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from matrixinfer.process import free_port
from sim.fleet import Fleet

# Hypothesis' per-example deadline (200 ms) measures the machine, not the code: on a loaded CI
# machine a slow example fails as DeadlineExceeded/Flaky. Tests check behaviour, never timings.
settings.register_profile("matrixinfer", deadline=None)
settings.load_profile("matrixinfer")

# Envoy's wait for each ext_proc reply in the test gateways. The product's base (1 s,
# GatewaySettings) is for production machines; a starved test machine (2 shared cores, load
# average 16 measured) exceeded it and Envoy answered 503 ext_proc_error_per-message_timeout to a
# test that checks usage accounting, not latency. The queue e2e keeps the 1 s base on purpose.
E2E_MESSAGE_TIMEOUT_MS = 10_000


def sim_fleet(
    tmp_path_factory: pytest.TempPathFactory,
    host: str,
    replicas: int,
    *sim_args: str,
    logs: str,
    **kw: str,
) -> Fleet:
    """``replicas`` simulators from ``host`` on (a port free there), ``sim_args`` for each, logs in
    a fresh folder named after ``logs``; ``with`` starts and stops them."""
    return Fleet(
        replicas,
        port=free_port(host),
        first_host=host,
        args=sim_args,
        log_dir=tmp_path_factory.mktemp(logs),
        **kw,
    )


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture
def logdir(tmp_path: Path) -> Iterator[Path]:
    """A folder for child-process logs; kept in pytest's tmp dir for post-mortems."""
    d = tmp_path / "logs"
    d.mkdir()
    yield d
