"""Queued prefill tokens per prefill pod, as this gateway knows them (the ``prefill-queue`` scorer).

A prefill pod is busy for a request's prompt only, and for a time proportional to the prompt's
length, so its load is the prompt tokens it has still to prefill, not a request count. The
gateway cannot count a prefill pod's requests in flight the way it counts a decode pod's: the
decode pod's PD proxy, not the gateway, talks to the prefill pod, and the gateway only sees the
whole request end, long after its prefill. What it knows:

- every prompt it sent to the pod, with its estimated tokens and when (:meth:`PrefillQueue.routed`);
- the engine's own count of requests waiting + running at the last scrape (``Pod.metrics``).

The engine serves its queue first come, first served, so the requests it still held at the scrape
are the last ``waiting + running`` of those sent before the scrape; everything sent after the
scrape is queued too. :meth:`PrefillQueue.queued_tokens` adds up their tokens. Between scrapes
(100-200 ms, a burst of arrivals) this is what keeps the gateway from sending every prompt to the
pod the last scrape showed idle.

Pure: plain data, times passed in (the scheduler's monotonic clock, as ``scraped_at``).
"""

from __future__ import annotations

from collections import deque

from fleet.pods import Pod

__all__ = ["PrefillQueue"]

KEPT = 256  # prompts remembered per pod: more than any engine queue worth scoring


class PrefillQueue:
    """Prompts sent to each prefill pod: (time sent, estimated prompt tokens), oldest first."""

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent: dict[str, deque[tuple[float, int]]] = {}

    def routed(self, pod_name: str, tokens: int, now: float) -> None:
        sent = self._sent.get(pod_name)
        if sent is None:
            sent = self._sent[pod_name] = deque(maxlen=KEPT)
        sent.append((now, max(0, tokens)))

    def forget(self, pod_name: str) -> None:
        self._sent.pop(pod_name, None)

    def queued_tokens(self, pod: Pod) -> float:
        """Prompt tokens the pod has still to prefill: those of the prompts sent after its last
        fresh scrape, plus those of the last ``waiting + running`` prompts sent before it (the
        engine's queue then, first come first served). Engine requests beyond what this gateway
        sent (other gateways') count the mean of its prompts. Stale or missing engine counts: the
        prompts sent since the last scrape only (all of them when none ever arrived)."""
        sent = self._sent.get(pod.name)
        m = pod.metrics
        scraped = m.scraped_at
        if sent is None:
            return 0.0
        after = 0
        i = len(sent)
        while i > 0 and sent[i - 1][0] > scraped:
            i -= 1
            after += sent[i][1]
        if m.stale or (m.waiting is None and m.running is None):
            return float(after)
        held = round((m.waiting or 0.0) + (m.running or 0.0))
        before = 0.0
        known = min(held, i)
        for j in range(i - known, i):
            before += sent[j][1]
        if held > known and sent:
            before += (held - known) * sum(t for _, t in sent) / len(sent)
        return float(after + before)
