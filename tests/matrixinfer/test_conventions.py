"""Command-line conventions every MatrixInfer program shares: --version, --log-level choices,
--log-format json."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from fleet.service import configure_logging, version

PROGRAMS = {
    "matrixinfer-extproc": "extproc.main",
    "matrixinfer-xds": "controllers.xds.main",
    "matrixinfer-controllers": "controllers.main",
    "matrixinfer": "matrixinfer.cli",
}


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_version(program: str) -> None:
    done = _run(PROGRAMS[program], "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [program, version()]


@pytest.mark.parametrize(
    "program", ["matrixinfer-extproc", "matrixinfer-xds", "matrixinfer-controllers"]
)
def test_log_level_is_a_checked_choice(program: str) -> None:
    done = _run(PROGRAMS[program], "--log-level", "loud")
    assert done.returncode == 2
    assert "--log-level" in done.stderr and "'loud'" in done.stderr and "debug" in done.stderr


def test_json_log_lines_carry_fields(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("info", "json")
        logging.getLogger("matrixinfer.extproc").info("routed", extra={"request_id": "r-1"})
        logging.getLogger("matrixinfer.extproc").debug("hidden")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert len(lines) == 1
    (line,) = lines
    assert line["message"] == "routed" and line["request_id"] == "r-1"
    assert line["level"] == "INFO" and line["logger"] == "matrixinfer.extproc" and line["time"]
