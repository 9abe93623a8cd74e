"""Shared pytest fixtures: every integration test starts its own processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from matrixinfer.process import free_port

# Hypothesis' per-example deadline (200 ms) measures the machine, not the code: on a loaded CI
# machine a slow example fails as DeadlineExceeded/Flaky. Tests check behaviour, never timings.
settings.register_profile("matrixinfer", deadline=None)
settings.load_profile("matrixinfer")

# Envoy's wait for each ext_proc reply in the test gateways. The product's base (1 s,
# GatewaySettings) is for production machines; a starved test machine (2 shared cores, load
# average 16 measured) exceeded it and Envoy answered 503 ext_proc_error_per-message_timeout to a
# test that checks usage accounting, not latency. The queue e2e keeps the 1 s base on purpose.
E2E_MESSAGE_TIMEOUT_MS = 10_000


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
