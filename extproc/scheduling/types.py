"""The scheduler's vocabulary: plain data shared by the datastore, the plugins and the servicer.

Pure: no gRPC, HTTP or Kubernetes here. Hot-path objects are slotted dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleet.pods import Pod


@dataclass(slots=True)
class SchedulingRequest:
    """What the scheduler may know about a request."""

    request_id: str
    model: str  # the model name the request asked for
    lora: str | None = None  # the LoRA adapter it targets, if any
    prompt: str = ""  # prompt text (chat messages flattened) for prefix hashing
    estimated_input_tokens: int = 0
    session_key: str | None = None  # stickiness key (header value or caller identity)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    model_server: str | None = None  # the ModelServer chosen by routing, named in error reasons


@dataclass(slots=True)
class SchedulingResult:
    """The primary pod and the fallbacks Envoy may retry on, best first."""

    primary: Pod
    fallbacks: list[Pod] = field(default_factory=list)
    # per-request data plugins computed while scoring (e.g. prefix block hashes), handed back to
    # them in ``Scheduler.on_routed`` so nothing is computed twice; opaque to callers.
    plugin_state: dict[str, object] = field(default_factory=dict)
    # the pods that passed the filters and their total weighted scores (same order), for logs
    candidates: list[Pod] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    # prefill/decode serving: the prefill pod (and its fallbacks) paired with ``primary``, the
    # decode pod; None when the ModelServer has no pdGroup or the group has no ready prefill pod
    prefill: SchedulingResult | None = None

    def endpoints(self) -> list[str]:
        return [self.primary.address] + [p.address for p in self.fallbacks]

    def scores(self) -> dict[str, float]:
        """Total weighted score by candidate pod name."""
        return {p.name: t for p, t in zip(self.candidates, self.totals, strict=False)}


class NoPodAvailable(Exception):
    """No pod can take the request; ``reason`` is shown to the caller (503)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoPodReady(NoPodAvailable):
    """No candidate pod is ready right now (raised by the ``ready`` filter): a request waiting
    for room keeps waiting, as for saturation, until one is (``extproc.gateway.WakeRoom``)."""


class AllPodsSaturated(NoPodAvailable):
    """Every candidate pod is saturated right now: the request may wait in the fair queue and be
    scheduled again later (raised by the ``saturation`` filter)."""
