"""Prefill/decode pairing: the decode pod first, then a prefill pod of the same group.

A ModelServer with ``workloadSelector.pdGroup`` serves each request on two pods: a prefill pod
computes the prompt's KV cache, a decode pod receives it and generates. :class:`PDScheduler`
picks the decode pod with the decode profile (load, KV use, session affinity) over the pods with
``decodeLabels``, then the prefill pod with the prefill profile (prefix-cache affinity, queue) over
the pods with ``prefillLabels`` and the decode pod's value of the ``groupKey`` label.

Fallbacks: the decode fallbacks are decode pods of the same group (an Envoy retry on one of them
still pairs with the chosen prefill pod); the prefill fallbacks follow the prefill pick. When the
best decode pod's group has no prefill pod that passes the prefill filters, the next decode pod
whose group has one is taken; when no group has one, the decode pod serves the request alone
(``result.prefill`` is None: its PD proxy decodes without remote prefill). Only when prefill pods
exist and every one is saturated is the request held (``AllPodsSaturated``: the fair queue).

Pure and synchronous, like :mod:`extproc.scheduling.scheduler`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from extproc.scheduling.scheduler import Scheduler
from extproc.scheduling.types import (
    AllPodsSaturated,
    NoPodAvailable,
    SchedulingRequest,
    SchedulingResult,
)
from fleet.pods import Pod, selects
from fleet.profile import DEFAULT_FILTERS, PluginSpec, SchedulerProfile

__all__ = ["DECODE_PROFILE", "PREFILL_PROFILE", "PDGroupLike", "PDScheduler"]


class PDGroupLike(Protocol):
    """``crds.networking.PDGroup``'s shape."""

    @property
    def group_key(self) -> str: ...
    @property
    def prefill_labels(self) -> Mapping[str, str]: ...
    @property
    def decode_labels(self) -> Mapping[str, str]: ...


DECODE_PROFILE = SchedulerProfile(
    filters=DEFAULT_FILTERS,
    scorers=[
        PluginSpec(name="session-affinity", weight=10.0),
        PluginSpec(name="least-request", weight=3.0),
        PluginSpec(name="kv-cache", weight=2.0),
        PluginSpec(name="lora-affinity", weight=1.0),
    ],
)
"""The decode pod's default profile (a PD ModelServer without ``scheduler``): the decode pod holds
the conversation's KV cache for the whole answer, so load, free KV cache and session affinity."""

PREFILL_PROFILE = SchedulerProfile(
    filters=DEFAULT_FILTERS,
    scorers=[
        PluginSpec(name="precise-prefix", weight=5.0),
        PluginSpec(name="prefix-cache", weight=3.0),
        PluginSpec(name="prefill-queue", weight=2.0),
    ],
)
"""The prefill pod's default profile (a PD ModelServer without ``prefillScheduler``): a prefill pod
is busy for the prompt only, so cached prefix first, then its queue in prompt tokens
(``prefill-queue``: the gateway never counts a prefill pod's requests in flight, the decode pod's
proxy calls it)."""


class PDScheduler:
    """Pairs a decode pod (``decode`` scheduler) with a prefill pod (``prefill`` scheduler) of
    the same ``group.group_key`` value. Same interface as :class:`Scheduler`."""

    __slots__ = ("_prefill_of", "decode", "group", "prefill")

    def __init__(self, group: PDGroupLike, decode: Scheduler, prefill: Scheduler) -> None:
        self.group = group
        self.decode = decode
        self.prefill = prefill
        self._prefill_of: dict[str, str] = {}  # request id -> prefill pod name, until finished

    def schedule(self, request: SchedulingRequest, pods: Sequence[Pod]) -> SchedulingResult:
        group = self.group
        ms = request.model_server
        server = f"ModelServer {ms}" if ms else "the ModelServer"
        decode_pods = [p for p in pods if selects(group.decode_labels, p.labels)]
        if not decode_pods:
            labels = ", ".join(f"{k}={v}" for k, v in group.decode_labels.items())
            raise NoPodAvailable(f"{server} has no decode pods (pdGroup.decodeLabels {labels})")
        by_group: dict[str, list[Pod]] = {}
        key = group.group_key
        for p in pods:
            value = p.labels.get(key)
            if value and selects(group.prefill_labels, p.labels):
                by_group.setdefault(value, []).append(p)
        result = self.decode.schedule(request, decode_pods)
        order = _ranked(result)
        saturated: AllPodsSaturated | None = None
        tried: set[str] = set()
        for pod in order:
            value = pod.labels.get(key)
            if not value or value in tried or value not in by_group:
                continue
            tried.add(value)
            try:
                prefill = self.prefill.schedule(request, by_group[value])
            except AllPodsSaturated as exc:
                saturated = exc
                continue
            except NoPodAvailable:
                continue
            paired = self._with_primary(result, pod, order)
            paired.prefill = prefill
            return paired
        if saturated is not None:
            raise AllPodsSaturated(f"every prefill pod of {server}: {saturated.reason}")
        return result  # no prefill pod anywhere: the decode pod serves alone

    def _with_primary(
        self, result: SchedulingResult, pod: Pod, order: list[Pod]
    ) -> SchedulingResult:
        """``result`` with ``pod`` as primary and decode fallbacks from its own group."""
        key = self.group.group_key
        value = pod.labels.get(key)
        same = [p for p in order if p is not pod and p.labels.get(key) == value]
        return SchedulingResult(
            pod,
            same[: self.decode.max_fallbacks],
            result.plugin_state,
            result.candidates,
            result.totals,
        )

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        self.decode.on_routed(request, result)
        if result.prefill is not None:
            self._prefill_of[request.request_id] = result.prefill.primary.name
            self.prefill.on_routed(request, result.prefill)

    def on_finished(self, request_id: str, pod_name: str) -> None:
        self.decode.on_finished(request_id, pod_name)
        prefill_pod = self._prefill_of.pop(request_id, None)
        if prefill_pod is not None:
            self.prefill.on_finished(request_id, prefill_pod)

    def forget_pod(self, pod_name: str) -> None:
        self.decode.forget_pod(pod_name)
        self.prefill.forget_pod(pod_name)


def _ranked(result: SchedulingResult) -> list[Pod]:
    """The decode candidates best first: the pick, its fallbacks, then the rest by score."""
    head = [result.primary, *result.fallbacks]
    seen = {id(p) for p in head}
    rest = sorted(
        (
            (t, i)
            for i, (p, t) in enumerate(zip(result.candidates, result.totals, strict=False))
            if id(p) not in seen
        ),
        key=lambda ti: -ti[0],
    )
    return head + [result.candidates[i] for _, i in rest]
