"""The scheduler plugin catalogue: every plugin's name, kind, arguments and default weight — what
a scheduler profile may say. Shared by everything that checks a profile (the gateway's config
files, the xDS server, admission) without running a scheduler; the plugins themselves are in
``extproc.scheduling.plugins``, one class per entry here.

Pure: pydantic models and plain functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "ARGS_CONFIG",
    "CATALOGUE",
    "LeastLatencyArgs",
    "LeastRequestArgs",
    "LoraCapableArgs",
    "NoArgs",
    "PluginEntry",
    "PluginSpecLike",
    "PrecisePrefixArgs",
    "PrefillQueueArgs",
    "PrefixCacheArgs",
    "ProfileLike",
    "SaturationArgs",
    "SessionAffinityArgs",
    "check_profile",
    "validate_plugin",
]

ARGS_CONFIG = ConfigDict(
    extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
)


class NoArgs(BaseModel):
    model_config = ARGS_CONFIG


class SaturationArgs(BaseModel):
    model_config = ARGS_CONFIG

    max_waiting: float = Field(
        default=8, gt=0, description="A pod whose engine queue holds this many requests is full."
    )
    max_kv_cache_usage: float = Field(
        default=0.95, gt=0, le=1, description="A pod whose KV cache is this full (0..1) is full."
    )


class LoraCapableArgs(BaseModel):
    model_config = ARGS_CONFIG

    dynamic_loading: bool = Field(
        default=False,
        description="The engines load an adapter on its first request (e.g. vLLM with a LoRA "
        "resolver): a pod that has not loaded the adapter stays a candidate if it has a free "
        "adapter slot. Off: only pods that have loaded the adapter are candidates.",
    )


class LeastRequestArgs(BaseModel):
    model_config = ARGS_CONFIG

    slack: float = Field(
        default=4.0,
        gt=0,
        description="Load added to every pod before comparing: score = (min_load + slack) / "
        "(load + slack). Larger = gentler preference at low load.",
    )


class PrefillQueueArgs(BaseModel):
    model_config = ARGS_CONFIG

    slack: float = Field(
        default=1024.0,
        gt=0,
        description="Prompt tokens added to every pod's queue before comparing: score = "
        "(min_queued + slack) / (queued + slack). Larger = gentler preference at low load.",
    )


class PrefixCacheArgs(BaseModel):
    model_config = ARGS_CONFIG

    block_size: int = Field(
        default=128, ge=16, le=65536, description="Bytes of UTF-8 prompt text per hashed block."
    )
    max_blocks: int = Field(
        default=128, ge=1, le=4096, description="Only the prompt's first max_blocks blocks count."
    )
    capacity: int = Field(
        default=8192, ge=1, description="Block hashes remembered per pod (LRU); ~ its KV cache."
    )


class PrecisePrefixArgs(BaseModel):
    model_config = ARGS_CONFIG

    tokenizer: str = Field(
        default="auto",
        min_length=1,
        description="The model's tokenizer files: 'auto' (found by the request's model name: a "
        "local path, else the local Hugging Face cache, else the simulator's files once its "
        "engines' KV events confirm them), 'simulator' (those matrixinfer-sim ships), a local "
        "directory with tokenizer.json (+ tokenizer_config.json for the chat template), a "
        "tokenizer.json path, or a Hugging Face repo id already in the local cache (never "
        "downloaded). Not found: the scorer abstains and prefix-cache decides.",
    )
    max_blocks: int = Field(
        default=512, ge=1, le=65536, description="Only the prompt's first max_blocks blocks count."
    )
    request_cost: float = Field(
        default=256.0,
        ge=0,
        description="Prefill+decode work of one request already queued or running on a pod, in "
        "prompt tokens: the exchange rate between a pod's load and a cache miss.",
    )
    copy_cost: float = Field(
        default=1.0,
        ge=0,
        description="Prompt tokens charged per token to prefill on a pod that is not the prompt "
        "prefix's home (the pod homing the fewest prefixes when the prefix was first seen): the "
        "cache slots a second copy of the prefix takes from others. 0 = no homes.",
    )


class LeastLatencyArgs(BaseModel):
    model_config = ARGS_CONFIG

    ttft_weight: float = Field(default=0.5, ge=0, description="Share of TTFT in the score.")
    tpot_weight: float = Field(default=0.5, ge=0, description="Share of TPOT in the score.")

    @model_validator(mode="after")
    def _some_weight(self) -> LeastLatencyArgs:
        if self.ttft_weight + self.tpot_weight <= 0:
            raise ValueError("ttft_weight + tpot_weight must be > 0")
        return self


class SessionAffinityArgs(BaseModel):
    model_config = ARGS_CONFIG

    header: str = Field(
        default="x-session-id", min_length=1, description="Request header naming the session."
    )
    capacity: int = Field(default=65536, ge=1, description="Sessions remembered (LRU).")


@dataclass(frozen=True, slots=True)
class PluginEntry:
    name: str
    kind: Literal["filter", "scorer"]
    args: type[BaseModel]
    default_weight: float | None = None  # scorers: the weight when a profile sets none


CATALOGUE: Mapping[str, PluginEntry] = {
    e.name: e
    for e in (
        PluginEntry("ready", "filter", NoArgs),
        PluginEntry("saturation", "filter", SaturationArgs),
        PluginEntry("lora-capable", "filter", LoraCapableArgs),
        PluginEntry("least-request", "scorer", LeastRequestArgs, 1.0),
        PluginEntry("prefill-queue", "scorer", PrefillQueueArgs, 1.0),
        PluginEntry("kv-cache", "scorer", NoArgs, 1.0),
        PluginEntry("prefix-cache", "scorer", PrefixCacheArgs, 2.0),
        PluginEntry("precise-prefix", "scorer", PrecisePrefixArgs, 5.0),
        PluginEntry("least-latency", "scorer", LeastLatencyArgs, 1.0),
        PluginEntry("lora-affinity", "scorer", NoArgs, 1.0),
        PluginEntry("session-affinity", "scorer", SessionAffinityArgs, 10.0),
        PluginEntry("random", "scorer", NoArgs, 1.0),
    )
}
"""Every plugin a profile may name."""


class PluginSpecLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def weight(self) -> int | float | None: ...
    @property
    def args(self) -> Mapping[str, Any] | None: ...


class ProfileLike(Protocol):
    @property
    def filters(self) -> Sequence[PluginSpecLike] | None: ...
    @property
    def scorers(self) -> Sequence[PluginSpecLike] | None: ...


def _error_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown argument"
        elif err.get("type") == "value_error":  # a check across arguments: its own words
            msg = str((err.get("ctx") or {}).get("error", msg))
        parts.append(f"argument '{loc}': {msg}" if loc else msg)
    return "; ".join(parts)


def validate_plugin(
    kind: str, position: int, spec: PluginSpecLike
) -> tuple[PluginEntry, BaseModel, float]:
    """``spec``, the ``position``-th filter or scorer of a profile, checked: its catalogue entry,
    its validated arguments and its weight (0 for filters). A ValueError names the plugin and
    the argument at fault."""
    where = f"scheduler {kind}s[{position}]"
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a plugin needs a 'name'")
    entry = CATALOGUE.get(name)
    if entry is None:
        known = ", ".join(sorted(n for n, e in CATALOGUE.items() if e.kind == kind))
        raise ValueError(f"{where}: unknown {kind} plugin '{name}' (known {kind}s: {known})")
    if entry.kind != kind:
        raise ValueError(f"{where}: plugin '{name}' is a {entry.kind}, not a {kind}")
    raw_args = getattr(spec, "args", None)
    if raw_args is None:
        raw_args = {}
    if isinstance(raw_args, BaseModel):
        raw_args = raw_args.model_dump()
    if not isinstance(raw_args, Mapping):
        raise ValueError(f"{where}: plugin '{name}': 'args' must be a mapping")
    try:
        args = entry.args.model_validate(dict(raw_args))
    except ValidationError as exc:
        raise ValueError(f"{where}: plugin '{name}': {_error_text(exc)}") from None
    weight = 0.0
    if kind == "scorer":
        raw_weight = getattr(spec, "weight", None)
        if raw_weight is None:
            raw_weight = entry.default_weight if entry.default_weight is not None else 1.0
        if isinstance(raw_weight, bool) or not isinstance(raw_weight, int | float):
            raise ValueError(f"{where}: plugin '{name}': 'weight' must be a number")
        if not raw_weight >= 0 or raw_weight == float("inf"):
            raise ValueError(
                f"{where}: plugin '{name}': 'weight' must be a finite number >= 0, got {raw_weight}"
            )
        weight = float(raw_weight)
    return entry, args, weight


def check_profile(profile: ProfileLike) -> None:
    """Raise ValueError (naming the plugin and argument) unless every filter and scorer of
    ``profile`` is a known plugin with valid arguments and weight."""
    for i, spec in enumerate(getattr(profile, "filters", None) or ()):
        validate_plugin("filter", i, spec)
    for i, spec in enumerate(getattr(profile, "scorers", None) or ()):
        validate_plugin("scorer", i, spec)
