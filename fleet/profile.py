"""Scheduler profiles: which filters and weighted scorers a ModelServer uses.

A profile is any object with ``.filters`` and ``.scorers`` sequences of items carrying ``.name``,
``.weight`` and ``.args`` — the shape of ``ModelServer.spec.scheduler`` in ``crds`` — or the
pydantic :class:`SchedulerProfile` below (usable from a gateway config file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from crds.networking import SchedulerProfile as ServerSchedulerProfile


class PluginSpec(BaseModel):
    """One plugin in a profile: its registered name, its weight (scorers only) and its args."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registered plugin name, e.g. 'prefix-cache'.")
    weight: float | None = Field(
        default=None,
        ge=0,
        description="Scorer weight (total = sum of weight x score); unset = the plugin's default. "
        "Ignored for filters.",
    )
    args: Mapping[str, Any] | None = Field(
        default=None, description="Plugin arguments; see docs/scheduling.md for each plugin."
    )


class SchedulerProfile(BaseModel):
    """Filters run in order, then every scorer scores the remaining pods."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filters: list[PluginSpec] = Field(default_factory=list)
    scorers: list[PluginSpec] = Field(default_factory=list)
    fallbacks: int = Field(
        default=2, ge=0, le=8, description="How many next-best distinct pods follow the primary."
    )


Profile = SchedulerProfile | ServerSchedulerProfile
"""A gateway-wide profile (files' GatewayConfig) or a ModelServer's ``spec.scheduler``."""

DEFAULT_FILTERS = [
    PluginSpec(name="ready"),
    PluginSpec(name="saturation", args={"max_waiting": 8, "max_kv_cache_usage": 0.95}),
    PluginSpec(name="lora-capable"),
]
"""The filters every built-in profile starts with: ready pods, not saturated, able to serve the
request's LoRA adapter."""

DEFAULT_PROFILE = SchedulerProfile(
    # the default filters without the KV-usage bound: a pod whose running requests hold most of
    # its KV cache still takes a request that shares their prefix (a few new blocks), and
    # filtering it out sends that request to a pod that must prefill it and evict for it; a pod
    # that really cannot take more shows it in its queue (max_waiting). Measured on the prefix
    # suite's zipf_prefix point (bench/reports/prefix.findings.md).
    filters=[
        PluginSpec(name="saturation", args={"max_waiting": 8, "max_kv_cache_usage": 1.0})
        if f.name == "saturation"
        else f
        for f in DEFAULT_FILTERS
    ],
    scorers=[
        # abstains unless the candidates' KV events are followed; when it scores, prefix-cache
        # and least-request abstain (its cost holds both)
        PluginSpec(name="precise-prefix", weight=5.0),
        PluginSpec(name="prefix-cache", weight=2.0),
        PluginSpec(name="least-request", weight=3.0),
        PluginSpec(name="kv-cache", weight=1.0),
        PluginSpec(name="lora-affinity", weight=1.0),
        # a conversation (x-session-id header, else the body's user field) stays on the pod that
        # served it last until the saturation filter takes that pod out: more than all the others
        PluginSpec(name="session-affinity", weight=15.0),
    ],
)
"""The gateway-wide default (see docs/scheduling.md for why these weights)."""
