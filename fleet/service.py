"""What every long-running MatrixInfer program shares: its common options (log level and
format, version), logging set-up, and an orderly stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import signal

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "add_service_args",
    "configure_logging",
    "signalled_stop",
    "version",
]


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
        help="log level (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS,
        help="text lines, or one JSON object per line for log collectors (default: %(default)s)",
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
