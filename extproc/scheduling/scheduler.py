"""The scheduler: filters, then weighted scorers, then the best pod plus next-best fallbacks.

Pure and synchronous: no I/O, an injected clock and rng. One instance per profile; the gateway
calls :meth:`Scheduler.schedule` on the request path and the lifecycle hooks around it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from extproc.kvindex import KVBlockIndex
from extproc.scheduling.plugins import PLUGINS, Context, Filter, Plugin, Scorer
from extproc.scheduling.types import NoPodAvailable, SchedulingRequest, SchedulingResult
from fleet.plugins import PluginSpecLike, ProfileLike, validate_plugin
from fleet.pods import Pod
from fleet.profile import DEFAULT_PROFILE

__all__ = ["PluginSpecLike", "ProfileLike", "Scheduler", "build_scheduler"]


class Scheduler:
    """Runs a profile's filters and scorers over a ModelServer's pods."""

    __slots__ = (
        "_clock",
        "_finished_hooks",
        "_forget_hooks",
        "_rng",
        "_routed_hooks",
        "filters",
        "max_fallbacks",
        "plugins",
        "scorers",
    )

    def __init__(
        self,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        *,
        max_fallbacks: int = 2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.filters = list(filters)
        self.scorers = [(s, float(w)) for s, w in scorers if w > 0]
        self.plugins = [*self.filters, *(s for s, _ in scorers)]
        # only plugins that override a hook are called for it (hooks run on every request)
        self._routed_hooks = [p for p in self.plugins if type(p).on_routed is not Plugin.on_routed]
        self._finished_hooks = [
            p for p in self.plugins if type(p).on_finished is not Plugin.on_finished
        ]
        self._forget_hooks = [
            p for p in self.plugins if type(p).forget_pod is not Plugin.forget_pod
        ]
        self.max_fallbacks = max_fallbacks
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()

    def schedule(self, request: SchedulingRequest, pods: Sequence[Pod]) -> SchedulingResult:
        """The best pod for ``request`` and up to ``max_fallbacks`` next-best distinct pods.

        Raises :class:`NoPodAvailable` (or its subclass ``AllPodsSaturated``) with a reason that
        names the ModelServer and why no pod qualifies.
        """
        ms = request.model_server
        server = f"ModelServer {ms}" if ms else "the ModelServer"
        if not pods:
            raise NoPodAvailable(f"{server} has no pods")
        ctx = Context(request, self._clock(), self._rng, server, {})
        candidates = list(pods)
        for f in self.filters:
            kept = f.filter(ctx, candidates)
            if not kept:
                raise f.error(ctx, candidates)
            candidates = kept
        n = len(candidates)
        totals: list[float] | None = None
        for scorer, weight in self.scorers:
            scores = scorer.score(ctx, candidates)
            if scores is None:
                continue
            if totals is None:
                totals = [weight * s for s in scores]
            else:
                totals = [t + weight * s for t, s in zip(totals, scores, strict=True)]
        if totals is None:
            totals = [0.0] * n
        ranked = _rank(candidates, totals, 1 + self.max_fallbacks, self._rng)
        return SchedulingResult(ranked[0], ranked[1:], ctx.state, candidates, totals)

    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        """The gateway answered Envoy with ``result``: credit the prefix index, session table."""
        for p in self._routed_hooks:
            p.on_routed(request, result)

    def on_finished(self, request_id: str, pod_name: str) -> None:
        """The request ended (its ext_proc stream closed)."""
        for p in self._finished_hooks:
            p.on_finished(request_id, pod_name)

    def forget_pod(self, pod_name: str) -> None:
        """The pod is gone: plugins drop their state about it."""
        for p in self._forget_hooks:
            p.forget_pod(pod_name)


def _rank(pods: list[Pod], totals: list[float], k: int, rng: random.Random) -> list[Pod]:
    """The ``k`` best pods by total, best first; equal totals in a random order (from ``rng``)."""
    n = len(pods)
    if n == 1:
        return pods
    order = sorted(range(n), key=totals.__getitem__, reverse=True)  # stable
    ranked_totals = [totals[i] for i in order]  # descending
    k = min(k, n)
    # no tie among the k best nor at the cut: the order is the ranking (no rng draw); sorted,
    # a tie is two neighbours
    last = k if k < n else n - 1
    i = 0
    while i < last and ranked_totals[i] != ranked_totals[i + 1]:
        i += 1
    if i == last:
        return [pods[g] for g in order[:k]]
    # the pods before the first tie, then each group of equal totals in a random order
    ranked = [pods[g] for g in order[:i]]
    while len(ranked) < k:
        t = ranked_totals[i]
        j = i + 1
        while j < n and ranked_totals[j] == t:
            j += 1
        need = k - len(ranked)
        if j - i == 1:
            ranked.append(pods[order[i]])
        else:
            ranked += [pods[g] for g in rng.sample(order[i:j], min(need, j - i))[:need]]
        i = j
    return ranked


def _build_plugin(kind: str, position: int, spec: PluginSpecLike) -> tuple[Any, float]:
    """The plugin ``spec`` names, checked against the catalogue (:func:`fleet.plugins.
    validate_plugin`) and built, with its weight."""
    entry, args, weight = validate_plugin(kind, position, spec)
    plugin = PLUGINS[entry.name].factory(args)
    plugin.key = f"{entry.name}#{position}"
    return plugin, weight


def build_scheduler(
    profile: ProfileLike | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    max_fallbacks: int | None = None,
    kv_index: KVBlockIndex | None = None,
) -> Scheduler:
    """A scheduler for ``profile`` (None = :data:`DEFAULT_PROFILE`).

    ``profile`` is any object with ``.filters`` and ``.scorers`` of items with ``.name``,
    ``.weight`` and ``.args`` (``ModelServer.spec.scheduler`` or :class:`SchedulerProfile`).
    Unknown plugins or bad arguments raise ValueError naming the plugin and the argument.
    ``max_fallbacks`` defaults to the profile's ``fallbacks`` if it has one, else 2.
    ``kv_index``: the gateway's KV-block index, bound to every plugin (:meth:`Plugin.bind`).
    """
    if profile is None:
        profile = DEFAULT_PROFILE
    filters: list[Filter] = []
    scorers: list[tuple[Scorer, float]] = []
    for i, spec in enumerate(getattr(profile, "filters", None) or ()):
        plugin, _ = _build_plugin("filter", i, spec)
        filters.append(plugin)
    for i, spec in enumerate(getattr(profile, "scorers", None) or ()):
        plugin, weight = _build_plugin("scorer", i, spec)
        scorers.append((plugin, weight))
    if kv_index is not None:
        for plugin in (*filters, *(scorer for scorer, _ in scorers)):
            plugin.bind(kv_index)
    if max_fallbacks is None:
        fb = getattr(profile, "fallbacks", None)
        max_fallbacks = fb if isinstance(fb, int) and not isinstance(fb, bool) else 2
    if max_fallbacks < 0:
        raise ValueError(f"max_fallbacks must be >= 0, got {max_fallbacks}")
    return Scheduler(filters, scorers, max_fallbacks=max_fallbacks, clock=clock, rng=rng)
