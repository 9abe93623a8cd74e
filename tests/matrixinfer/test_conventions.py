"""Command-line conventions every MatrixInfer program shares: --version, --log-level choices,
--log-format json, durations in one form, a help text and its default on every option, deprecated
spellings that still work."""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys

import pytest

from controllers.xds.main import parse_args as xds_args
from fleet.service import DeprecatedAlias, configure_logging, duration, version
from matrixinfer.cli import build_parser as cli_parser
from sim.cli import _duration as sim_duration
from tests.matrixinfer.test_docs_flags import parsers

PROGRAMS = {
    "matrixinfer-extproc": "extproc.main",
    "matrixinfer-xds": "controllers.xds.main",
    "matrixinfer-controllers": "controllers.main",
    "matrixinfer": "matrixinfer.cli",
    "matrixinfer-sim": "sim",
    "matrixinfer-pd-proxy": "runtime.pd_proxy",
    "matrixinfer-downloader": "runtime.downloader",
    "matrixinfer-runtime": "runtime.sidecar",
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
    "program",
    sorted(set(PROGRAMS) - {"matrixinfer"}),
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


SKIPPED = (
    argparse._HelpAction,
    argparse._VersionAction,
    argparse._SubParsersAction,
    DeprecatedAlias,
)
TIME_WORDS = re.compile(r"timeout|interval|poll|debounce|grace|resync|after|slow-start|drain|wait")


def _options() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    return [
        (program, parser, action)
        for program, ps in parsers().items()
        for parser in ps
        for action in parser._actions
        if action.option_strings and not isinstance(action, SKIPPED)  # not positionals
    ]


def test_every_option_has_a_help_text_showing_its_default() -> None:
    missing, no_default = [], []
    for program, parser, action in _options():
        name = f"{program} {action.option_strings[0]}"
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(name)
            continue
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            continue
        shown = " ".join(parser.format_help().split())
        if f"(default: {action.default})" not in shown and "(default" not in action.help:
            no_default.append(name)
    assert not missing, f"options without a help text: {missing}"
    assert not no_default, f"--help does not show the default of: {no_default}"


def test_durations_are_written_one_way_everywhere() -> None:
    """Every time-valued flag takes 500ms / 2s / 1m30s (and a bare number of seconds), and its
    default is shown that way."""
    seen = []
    for program, _, action in _options():
        flag = action.option_strings[0]
        if not TIME_WORDS.search(flag) or action.type is int:
            continue
        seen.append(flag)
        assert action.type in (duration, sim_duration), f"{program} {flag} is not a duration"
        assert action.type("1m30s") == 90.0 and action.type("250ms") == 0.25
        assert action.type("2") == 2.0
        if action.default is not None:
            assert re.fullmatch(r"[0-9]+(ns|us|ms|s|m|h)", action.default), (program, flag)
    assert {"--message-timeout", "--scrape-interval", "--config-poll", "--debounce"} <= set(seen)
    assert {"--resync", "--usage-grace", "--slow-start", "--drain-timeout"} <= set(seen)
    with pytest.raises(argparse.ArgumentTypeError, match="'5 minutes'"):
        duration("5 minutes")
    with pytest.raises(argparse.ArgumentTypeError, match="0 or more"):
        duration("-1")


def test_a_renamed_flag_still_works_with_one_warning(capsys: pytest.CaptureFixture[str]) -> None:
    args = xds_args(["--message-timeout-ms", "2500", "--max-message-timeout-cap-ms", "60000"])
    assert args.message_timeout == 2.5 and args.max_message_timeout_cap == 60.0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "matrixinfer-xds: --message-timeout-ms is deprecated; use --message-timeout 2500ms",
        "matrixinfer-xds: --max-message-timeout-cap-ms is deprecated; "
        "use --max-message-timeout-cap 1m",
    ]
    assert xds_args(["--message-timeout", "2500ms"]).message_timeout == 2.5
    gateway = cli_parser().parse_args(["gateway", "--config", "c", "--message-timeout-ms", "300"])
    assert gateway.message_timeout == 0.3
    assert "--message-timeout-ms" not in cli_parser().format_help()
    from controllers.main import build_parser as controllers_parser

    assert controllers_parser().parse_args(["--resync-seconds", "12"]).resync == 12.0
    assert controllers_parser().parse_args(["--resync", "1m"]).resync == 60.0
