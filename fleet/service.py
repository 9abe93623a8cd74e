"""What every long-running MatrixInfer service shares: an orderly stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal

__all__ = ["signalled_stop"]


def signalled_stop() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets: a service's orderly stop (call in the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
