"""Fleet simulation in virtual time: the real scheduler and datastore against simulated engines.

``python -m bench.fleetsim --help``; see :mod:`bench.fleetsim.core` for what runs.
"""

from bench.fleetsim.core import FleetSpec, LoadSample, SimRecord, SimResult, simulate
from bench.fleetsim.trace import (
    TraceError,
    TraceSession,
    dump_jsonl,
    from_conversations,
    load_jsonl,
    make_workload,
)

__all__ = [
    "FleetSpec",
    "LoadSample",
    "SimRecord",
    "SimResult",
    "TraceError",
    "TraceSession",
    "dump_jsonl",
    "from_conversations",
    "load_jsonl",
    "make_workload",
    "simulate",
]
