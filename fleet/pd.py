"""Prefill/decode serving: the header the gateway sets for the decode pod's PD proxy.

Pure: shared by the extproc (which writes the header) and ``runtime.pd_proxy`` (which reads it).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PREFILL_HEADER", "format_prefill", "parse_prefill"]

PREFILL_HEADER = "x-matrixinfer-prefill-endpoint"
"""The prefill pods chosen for a request, ``ip:port`` best first, comma-separated (the first is
the pick, the rest are its fallbacks). Set by the extproc on every request (empty = removed), so a
client's own copy never reaches a PD proxy."""


def format_prefill(addresses: Sequence[str]) -> str:
    return ",".join(addresses)


def parse_prefill(value: str | None) -> list[str]:
    """The addresses of a :data:`PREFILL_HEADER` value; raises ValueError naming a bad entry."""
    if not value:
        return []
    out: list[str] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{PREFILL_HEADER}: '{part}' is not an ip:port address")
        out.append(part)
    return out
