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
