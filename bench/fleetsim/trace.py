"""What the virtual fleet is fed: conversations from ``bench.workloads`` or a recorded JSONL trace.

A trace line is one client session (JSON object per line)::

    {"arrival": 0.42, "model": "bench-model", "prefix": [["system", "You are ..."]],
     "turns": ["first question", "follow-up"], "max_tokens": 64, "session": "g3",
     "think_time": 0.5}

or, for a single completion request given as token ids::

    {"arrival": 0.42, "model": "bench-model", "prompt_ids": [1042, 7731, ...], "max_tokens": 64}

``arrival`` is seconds after the start, ``turns`` are user messages sent one after the other (each
with the whole history, the answers included, as ``bench.loadgen`` sends them), ``session`` labels
the session (a group, an adapter, a chat) and is optional; ``prefix``, ``think_time`` default to
none. A bad line raises :class:`TraceError` naming the line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bench.loadgen import Conversation
from bench.workloads import WORKLOADS

__all__ = [
    "TraceError",
    "TraceSession",
    "dump_jsonl",
    "from_conversations",
    "load_jsonl",
    "make_workload",
]


class TraceError(ValueError):
    """A trace line or a workload spec that cannot be used; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class TraceSession:
    """One client session: chat turns (``turns``) or one completion of token ids."""

    arrival: float
    model: str
    max_tokens: int
    prefix: tuple[tuple[str, str], ...] = ()
    turns: tuple[str, ...] = ()
    prompt_ids: tuple[int, ...] | None = None
    session: str = ""
    think_time: float = 0.0

    @property
    def requests(self) -> int:
        return 1 if self.prompt_ids is not None else len(self.turns)


class _Line(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    arrival: float = Field(ge=0)
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    prefix: list[tuple[str, str]] = Field(default_factory=list)
    turns: list[str] = Field(default_factory=list)
    prompt_ids: list[int] | None = None
    session: str = ""
    think_time: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_kind(self) -> _Line:
        if (self.prompt_ids is None) == (not self.turns):
            raise ValueError("give either 'turns' (chat) or 'prompt_ids' (completion), not both")
        if self.prompt_ids is not None and (self.prefix or not self.prompt_ids):
            raise ValueError("'prompt_ids' must be non-empty and cannot have a 'prefix'")
        return self


def from_conversations(conversations: Iterable[Conversation]) -> list[TraceSession]:
    """``bench.loadgen.Conversation`` objects (what ``bench.workloads`` makes) as sessions."""
    out = [
        TraceSession(
            arrival=c.arrival,
            model=c.model,
            max_tokens=c.max_tokens,
            prefix=tuple(c.prefix),
            turns=tuple(c.turns),
            session=c.tag,
            think_time=c.think_time,
        )
        for c in conversations
    ]
    out.sort(key=lambda s: s.arrival)
    return out


def load_jsonl(path: Path | str) -> list[TraceSession]:
    """Read a JSONL trace (see the module docstring); sessions sorted by arrival."""
    out: list[TraceSession] = []
    with open(path) as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = _Line.model_validate(json.loads(text))
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{n}: not a JSON object: {exc}") from None
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in err.get("loc", ())) or "line"
                raise TraceError(f"{path}:{n}: field '{where}': {err.get('msg')}") from None
            out.append(
                TraceSession(
                    arrival=line.arrival,
                    model=line.model,
                    max_tokens=line.max_tokens,
                    prefix=tuple(line.prefix),
                    turns=tuple(line.turns),
                    prompt_ids=tuple(line.prompt_ids) if line.prompt_ids is not None else None,
                    session=line.session,
                    think_time=line.think_time,
                )
            )
    out.sort(key=lambda s: s.arrival)
    return out


def dump_jsonl(sessions: Sequence[TraceSession], path: Path | str) -> None:
    with open(path, "w") as f:
        for s in sessions:
            line: dict[str, object] = {
                "arrival": s.arrival,
                "model": s.model,
                "max_tokens": s.max_tokens,
            }
            if s.prompt_ids is not None:
                line["prompt_ids"] = list(s.prompt_ids)
            else:
                line["turns"] = list(s.turns)
                if s.prefix:
                    line["prefix"] = [list(p) for p in s.prefix]
            if s.session:
                line["session"] = s.session
            if s.think_time:
                line["think_time"] = s.think_time
            f.write(json.dumps(line) + "\n")


GENERATORS = WORKLOADS
"""Every workload generator by name (``bench.workloads.WORKLOADS``)."""


def make_workload(spec: str, *, seed: int, duration: float) -> list[TraceSession]:
    """``name:key=value,key=value`` (e.g. ``shared_prefix:qps=20,groups=16``) -> sessions."""
    name, _, rest = spec.partition(":")
    gen = GENERATORS.get(name)
    if gen is None:
        raise TraceError(f"unknown workload {name!r} (known: {', '.join(sorted(GENERATORS))})")
    kwargs: dict[str, float | int] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise TraceError(f"workload {spec!r}: {item!r} is not key=value")
        try:
            kwargs[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise TraceError(f"workload {spec!r}: {key} must be a number, got {value!r}") from None
    kwargs.setdefault("qps", 10.0)
    kwargs.setdefault("duration", duration)
    try:
        return from_conversations(gen(seed=seed, **kwargs))
    except TypeError as exc:
        raise TraceError(f"workload {spec!r}: {exc}") from None
