"""What every long-running MatrixInfer program shares: its common options (log level and
format, version), duration flags, logging set-up, and an orderly stop on SIGTERM/SIGINT.

Durations on the command line are written as in the CRDs: ``500ms``, ``2s``, ``1m30s`` (a bare
number is seconds). A flag renamed for this keeps its old spelling as a hidden alias that prints
one deprecation line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from crds.common import parse_duration

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "DeprecatedAlias",
    "HelpFormatter",
    "add_service_args",
    "configure_logging",
    "duration",
    "format_duration",
    "fraction",
    "milliseconds",
    "signalled_stop",
    "version",
]

_UNITS = (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def duration(text: str) -> float:
    """argparse ``type`` of a duration flag: seconds in ``500ms`` / ``2s`` / ``1m30s`` (the CRDs'
    form); a bare number is seconds. Negative or malformed values are rejected, naming them."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            return parse_duration(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use a number and a unit, e.g. 500ms, 2s, 1m30s"
            ) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be 0 or more")
    return seconds


def milliseconds(text: str) -> float:
    """argparse ``type`` of an old ``-ms`` flag: seconds in a number of milliseconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value / 1000.0


def format_duration(seconds: float) -> str:
    """``seconds`` in the flags' form, with the largest unit that writes it whole: 0.2 -> 200ms."""
    if seconds == 0:
        return "0s"
    for unit, size in _UNITS:
        count = seconds / size
        if count >= 1 and abs(count - round(count)) < 1e-6 * count:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


class DeprecatedAlias(argparse.Action):
    """The old spelling of a renamed flag: hidden from ``--help``, sets the new flag's value and
    prints one line naming the replacement (``add_argument(old, action=DeprecatedAlias,
    replacement=new, type=..., dest=...)``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, replacement: str,
                 **kwargs: Any) -> None:  # fmt: skip
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        shown = format_duration(values) if isinstance(values, float) else values
        print(
            f"{parser.prog}: {option_string} is deprecated; use {self.replacement} {shown}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default (flags, ``None`` defaults and helps that state
    theirs in words excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        if "(default" in (action.help or ""):  # the help says it in words
            return action.help
        return super()._get_help_string(action)

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return (
            "DURATION"
            if action.type is duration
            else super()._get_default_metavar_for_optional(action)
        )


def signalled_stop() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets: a service's orderly stop (call in the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def version() -> str:
    """The installed MatrixInfer version (a source checkout without metadata: ``0+unknown``)."""
    try:
        return importlib.metadata.version("matrixinfer")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The options every MatrixInfer program takes, spelled the same everywhere."""
    parser.add_argument(
        "--log-level", default="info", choices=LOG_LEVELS, type=str.lower,
        help="log level",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS,
        help="text lines, or one JSON object per line for log collectors",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging for a program: ``fmt`` ``json`` writes one JSON object per record (time,
    level, logger, message and any ``extra=`` fields such as ``request_id``)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1] (a share of something), e.g. ``0.25``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
