"""Scheduler: filter and scorer plugins that pick a pod (plus fallbacks) for each request.

Public surface::

    sched = build_scheduler(profile=None, clock=time.monotonic, rng=None)
    result = sched.schedule(request, pods)   # SchedulingResult or raise NoPodAvailable
    sched.on_routed(request, result); sched.on_finished(request_id, pod_name)
    sched.forget_pod(pod_name)
"""

from extproc.scheduling.plugins import PLUGINS, PluginInfo, lora_servable
from extproc.scheduling.scheduler import Scheduler, build_scheduler
from extproc.scheduling.types import (
    AllPodsSaturated,
    NoPodAvailable,
    SchedulingRequest,
    SchedulingResult,
)
from fleet.pods import Pod, PodMetrics
from fleet.profile import DEFAULT_PROFILE, PluginSpec, SchedulerProfile

__all__ = [
    "DEFAULT_PROFILE",
    "PLUGINS",
    "AllPodsSaturated",
    "NoPodAvailable",
    "PluginInfo",
    "PluginSpec",
    "Pod",
    "PodMetrics",
    "Scheduler",
    "SchedulerProfile",
    "SchedulingRequest",
    "SchedulingResult",
    "build_scheduler",
    "lora_servable",
]
