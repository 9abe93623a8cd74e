"""Benchmark of the Model controller: N Models x 2 backends against the emulated API server.

The whole operator (Model, ModelInfer, status and autoscaling controllers, as
``matrixinfer-controllers`` runs them) in its own thread against kmock, with the fake kubelet
making every pod Running+Ready as soon as it appears:

1. apply N Models with two backends each (one replica each) and measure the time until every
   Model is **settled**: its children exist (2 ModelInfers, 2 ModelServers, 1 ModelRoute) and its
   status has ``observedGeneration`` equal to its generation with Initialized and Active True
   and Failed False (Active needs a ready pod per backend, so the ModelInfer controller and the
   kubelet are part of the figure);
2. edit every Model once (a new image on both backends) and measure the time until every Model
   is settled at the new generation and every child ModelInfer carries the new image and reports
   all its replicas updated and ready (the ModelInfer controller's rollout included).

Reported per phase: wall time, the per-Model time to settle (from its own create / patch), the
Model controller's reconcile-duration histogram
(``matrixinfer_controller_reconcile_duration_seconds{controller="model"}``, scraped from the
operator's /metrics) with its actions and errors, the API requests by kind, and the operator's
CPU time (every thread of the process except the main one, which runs the emulator, the kubelet
and this driver); then the operator's CPU while nothing changes. Each phase's figures go to
stderr as soon as it ends; the whole report to stdout at the end. kmock scans every object it
holds on each request, so Events and deleted objects are pruned from it as the run goes
(:func:`prune`).

    PYTHONPATH=. .venv/bin/python -m bench.model_reconcile [--models 500] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

MI = "workload.matrixinfer.ai/v1alpha1/modelinfers"
MS = "networking.matrixinfer.ai/v1alpha1/modelservers"
MR = "networking.matrixinfer.ai/v1alpha1/modelroutes"
MODELS = "registry.matrixinfer.ai/v1alpha1/models"
HISTOGRAM = "matrixinfer_controller_reconcile_duration_seconds"
BACKENDS = ("fast", "cheap")


def backends(image: str) -> list[dict[str, Any]]:
    """Two backends of one replica each (vLLM and SGLang), weighted 70/30."""
    return [
        {
            "name": "fast",
            "type": "vLLM",
            "modelURI": "hf://org/llama",
            "image": image,
            "minReplicas": 1,
            "maxReplicas": 1,
            "routeWeight": 70,
        },
        {
            "name": "cheap",
            "type": "SGLang",
            "modelURI": "pvc://weights/llama",
            "image": image,
            "minReplicas": 1,
            "maxReplicas": 1,
            "routeWeight": 30,
        },
    ]


def model_object(i: int, image: str = "vllm:1") -> dict[str, Any]:
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": f"m{i:04d}", "namespace": "ns"},
        "spec": {"backends": backends(image)},
    }


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def _engine_image(mi: dict[str, Any]) -> str | None:
    roles = ((mi.get("spec") or {}).get("template") or {}).get("roles") or []
    for role in roles:
        containers = ((role.get("entryTemplate") or {}).get("spec") or {}).get("containers") or []
        for c in containers:
            return str(c.get("image"))
    return None


def unsettled(
    model: dict[str, Any],
    generation: int,
    image: str,
    infers: dict[str, dict[str, Any]],
    servers: dict[str, dict[str, Any]],
    routes: dict[str, dict[str, Any]],
    old_revisions: dict[str, str] | None = None,
) -> str | None:
    """What keeps the Model from being settled, or None when it is: at ``generation`` in its
    status, Initialized, Active and not Failed; its children exist; its ModelInfers carry
    ``image`` and have rolled out a revision other than ``old_revisions[name]`` to every
    replica, all ready. (kmock keeps no ``generation`` on the objects the operator creates, so a
    ModelInfer's rollout is told by its revisions.)"""
    name = model["metadata"]["name"]
    st = model.get("status") or {}
    if st.get("observedGeneration") != generation:
        return f"status.observedGeneration {st.get('observedGeneration')} != {generation}"
    conds = _conditions(model)
    want = {"Initialized": "True", "Active": "True", "Failed": "False"}
    for ctype, status in want.items():
        c = conds.get(ctype) or {}
        if c.get("status") != status or c.get("observedGeneration") != generation:
            return f"condition {ctype}: {c}"
    if name not in routes:
        return "no ModelRoute"
    for b in BACKENDS:
        child = f"{name}-{b}"
        mi = infers.get(child)
        if mi is None or child not in servers:
            return f"no ModelInfer or ModelServer {child}"
        if _engine_image(mi) != image:
            return f"ModelInfer {child} image {_engine_image(mi)}"
        mst = mi.get("status") or {}
        replicas = (mi.get("spec") or {}).get("replicas", 1)
        rev = mst.get("updateRevision")
        if rev is None or rev != mst.get("currentRevision"):
            return f"ModelInfer {child} revisions {mst.get('currentRevision')} -> {rev}"
        if old_revisions is not None and old_revisions.get(child) == rev:
            return f"ModelInfer {child} still at revision {rev}"
        if mst.get("readyReplicas") != replicas or mst.get("updatedReplicas") != replicas:
            return f"ModelInfer {child} status {mst}"
    return None


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    requests_s: float = 0.0  # how long the driver took to send its N creates/patches
    per_model: list[float] = field(default_factory=list)  # seconds from its write to settled
    reconciles: int = 0
    reconcile_sum_s: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # delta of cumulative counts
    by_kind: dict[str, int] = field(default_factory=dict)
    operator_cpu_s: float = 0.0
    actions: dict[str, float] = field(default_factory=dict)
    pruned: int = 0  # Events and deleted objects dropped from the emulator (see prune())


def scrape(port: int) -> tuple[dict[float, float], float, float, dict[str, float]]:
    """(cumulative buckets, count, sum) of the Model controller's reconcile histogram, and its
    action counters (errors as ``error <reason>``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets: dict[float, float] = {}
    count = total = 0.0
    actions: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("controller") != "model":
                continue
            if s.name == HISTOGRAM + "_bucket":
                buckets[float(s.labels["le"])] = s.value
            elif s.name == HISTOGRAM + "_count":
                count = s.value
            elif s.name == HISTOGRAM + "_sum":
                total = s.value
            elif s.name == "matrixinfer_controller_actions_total":
                actions[s.labels["action"]] = s.value
            elif s.name == "matrixinfer_controller_reconcile_errors_total":
                actions["error " + s.labels["reason"]] = s.value
    return buckets, count, total, actions


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """The q-quantile of a histogram (cumulative counts by upper bound), interpolated inside
    its bucket as Prometheus's histogram_quantile does."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return bounds[-1]


def prune(api: Any) -> int:
    """Hard-delete the Events and the soft-deleted objects (pods excepted) from the emulator;
    the count removed.

    kmock finds the object of every request by scanning all the objects it holds, deleted ones
    and Kopf's Events included, so its cost per request grows with everything ever written and
    a long run becomes quadratic in the emulator (not in the operator). Nothing reads Events
    back, and a deleted object's watch event has been sent when it was deleted. Pods stay: the
    fake kubelet looks each one up between its own awaits."""
    gone = [
        key
        for key, obj in list(api.k.objects.items())
        if key[0].plural == "events" or (obj.deleted and key[0].plural != "pods")
    ]
    for key in gone:
        del api.k.objects[key]
    return len(gone)


def index_emulator_lookups() -> None:
    """Let kmock find a named object by its key instead of scanning every object it holds.

    ``KubernetesEmulator.__get_objs`` compares each stored object with the request (O(objects)
    per request: at 500 Models, ~10 requests/s with the emulator's thread saturated). A request
    naming one object (resource, namespace, name) is looked up in kmock's own dict first; on a
    miss (another resource type, a list, a missing object) the original scan answers, so the
    answers are the same."""
    from kmock._internal import k8s

    cls = k8s.KubernetesEmulator
    original = cls._KubernetesEmulator__get_objs  # type: ignore[attr-defined]
    if getattr(original, "indexed", False):
        return

    def get_objs(self: Any, request: Any, strict: bool) -> list[Any]:
        if request.name is not None and (strict or request.namespace is not None):
            key = (request.resource, request.namespace, request.name)
            with contextlib.suppress(TypeError):  # an unhashable resource: scan
                obj = self._objects._objects.get(key)
                if obj is not None:
                    return [obj]
        return list(original(self, request, strict))

    get_objs.indexed = True  # type: ignore[attr-defined]
    cls._KubernetesEmulator__get_objs = get_objs  # type: ignore[attr-defined]


def live_objects(api: Any, plurals: tuple[str, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """The live objects of namespace ``ns`` of each plural, by name, in one pass over kmock."""
    out: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in plurals}
    for (resource, ns, name), obj in list(api.k.objects.items()):
        bucket = out.get(resource.plural)
        if bucket is not None and ns == "ns" and not obj.deleted:
            bucket[name] = obj.raw
    return out


def poll_interval(n: int) -> float:
    """Seconds between two looks at the emulator for ``n`` Models: 1 s up to 150, then
    proportionally longer (a per-Model settle time is known to within this)."""
    return max(1.0, n / 150)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


class CpuMeter:
    """CPU seconds of every thread but the calling (main) one."""

    def others(self) -> float:
        return time.process_time() - time.thread_time()


async def write_models(api: Any, n: int, gen: int, image: str) -> dict[str, float]:
    """Create (generation 1) or edit every Model, 16 writes in flight (as ``kubectl apply`` of
    a directory would); when each write was sent, by Model name."""
    from matrixinfer.testing.kube import MODEL_PATH

    sem = asyncio.Semaphore(16)
    started: dict[str, float] = {}

    async def write(i: int) -> None:
        name = f"m{i:04d}"
        async with sem:
            started[name] = time.perf_counter()
            if gen == 1:
                await api.create_model(model_object(i, image))
            else:
                path = MODEL_PATH.format(ns="ns") + f"/{name}"
                current = {"metadata": {"generation": gen - 1}}
                await api._patch_spec(path, current, {"backends": backends(image)})

    for lo in range(0, n, 50):
        await asyncio.gather(*(write(i) for i in range(lo, min(n, lo + 50))))
        prune(api)
    return started


async def measure_phase(
    api: Any,
    op: Any,
    port: int,
    n: int,
    gen: int,
    image: str,
    old_revisions: dict[str, str] | None,
    deadline_s: float,
    progress: bool,
) -> Phase:
    """Write every Model at ``gen`` and wait until all are settled; what it took."""
    phase = Phase("apply" if gen == 1 else "edit")
    cpu = CpuMeter()
    b0, c0, s0, a0 = await asyncio.to_thread(scrape, port)
    cpu0 = cpu.others()
    api.k.by_kind = {}
    t0 = time.perf_counter()
    started = await write_models(api, n, gen, image)
    phase.requests_s = time.perf_counter() - t0
    done: dict[str, float] = {}
    last = last_prune = t0
    while len(done) < n:
        now = time.perf_counter()
        seen = live_objects(api, ("modelinfers", "modelservers", "modelroutes", "models"))
        infers, servers, routes = seen["modelinfers"], seen["modelservers"], seen["modelroutes"]
        why: dict[str, str] = {}
        for name, obj in seen["models"].items():
            if name in done:
                continue
            reason = unsettled(obj, gen, image, infers, servers, routes, old_revisions)
            if reason is None:
                done[name] = now - started[name]
            else:
                why[name] = reason
        if op.errors:
            raise RuntimeError(f"the operator failed: {op.errors!r}")
        if now - t0 > deadline_s:
            raise TimeoutError(
                f"{phase.name}: {len(done)}/{n} Models settled after {deadline_s} s;"
                f" e.g. {next(iter(why.items()), None)}"
            )
        if progress and now - last > 10:
            last = now
            print(
                f"  {phase.name} {now - t0:.0f}s: {len(done)}/{n} settled,"
                f" {api.k.handled} requests",
                file=sys.stderr,
            )
            for name, reason in list(why.items())[:2]:
                print(f"    {name}: {reason[:200]}", file=sys.stderr)
        if now - last_prune > 2.0:
            phase.pruned += prune(api)
            last_prune = now
        # the poll shares the emulator's thread and scans every object: not too often (at 500
        # Models a poll a second was a third of that thread's samples)
        await asyncio.sleep(poll_interval(n))
    phase.wall_s = time.perf_counter() - t0
    phase.operator_cpu_s = cpu.others() - cpu0
    phase.by_kind = {
        k.removeprefix("method.").replace(" None", " (discovery)"): v
        for k, v in sorted(api.k.by_kind.items(), key=lambda kv: -kv[1])
    }
    b1, c1, s1, a1 = await asyncio.to_thread(scrape, port)
    phase.buckets = {b: b1[b] - b0.get(b, 0.0) for b in b1}
    phase.reconciles = int(c1 - c0)
    phase.reconcile_sum_s = s1 - s0
    phase.actions = {k: v - a0.get(k, 0.0) for k, v in a1.items() if v - a0.get(k, 0.0)}
    phase.per_model = list(done.values())
    if progress:
        lines = [TABLE_HEADER, phase_row(n, phase), "", *phase_details(n, phase)]
        print("\n".join(lines), file=sys.stderr)
    return phase


async def run(
    n: int,
    deadline_s: float = 1800.0,
    progress: bool = True,
    history: int = 1,
    idle_s: float = 10.0,
) -> tuple[Phase, Phase, dict[str, Any]]:
    """Apply ``n`` Models, then edit each once, then leave the operator idle for ``idle_s``,
    against the emulator (whose request history is cut to ``history``: kmock matches each
    request against it)."""
    from matrixinfer.process import free_port
    from matrixinfer.testing.kube import Kubelet, emulator, operator

    port = free_port()
    index_emulator_lookups()
    async with emulator(history_limit=history) as api:
        kubelet = Kubelet(api, interval=0.5)  # a scan of every object per tick
        ktask = asyncio.create_task(kubelet.run())
        try:
            async with operator(api, resync_seconds=300.0, metrics_port=port) as op:
                apply = await measure_phase(
                    api, op, port, n, 1, "vllm:1", None, deadline_s, progress
                )
                await asyncio.sleep(1.0)  # trailing status writes land before the edit
                revisions = {
                    name: str((mi.get("status") or {}).get("updateRevision"))
                    for name, mi in api.objects(MI).items()
                }
                edit = await measure_phase(
                    api, op, port, n, 2, "vllm:2", revisions, deadline_s, progress
                )
                # steady state: nothing changes, what does the operator spend per second?
                cpu = CpuMeter()
                c0, t0, h0 = cpu.others(), time.perf_counter(), api.k.handled
                await asyncio.sleep(idle_s)
                idle = time.perf_counter() - t0
                stats = {
                    "pods": len(api.pods()),
                    "handled": api.k.handled,
                    "idle_s": idle,
                    "idle_cpu": (cpu.others() - c0) / idle,
                    "idle_requests_per_s": (api.k.handled - h0) / idle,
                }
        finally:
            ktask.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ktask
    return apply, edit, stats


def phase_row(n: int, p: Phase) -> str:
    q = [bucket_quantile(p.buckets, x) * 1000 for x in (0.5, 0.9, 0.99)]
    mean = p.reconcile_sum_s / p.reconciles * 1000 if p.reconciles else math.nan
    return (
        f"| {p.name} | {p.wall_s:.1f} | {p.requests_s:.1f} | {n / p.wall_s:.1f} | "
        f"{pct(p.per_model, 0.5):.1f} / {pct(p.per_model, 0.9):.1f} / "
        f"{max(p.per_model):.1f} | {p.reconciles} | {p.reconciles / n:.1f} | "
        f"{q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f} | {mean:.1f} | {p.operator_cpu_s:.1f} | "
        f"{p.operator_cpu_s / n * 1000:.0f} |"
    )


def phase_details(n: int, p: Phase) -> Iterator[str]:
    yield f"### {p.name}: API requests by kind (all clients: operator, kubelet, driver)\n"
    total = sum(p.by_kind.values())
    yield f"{total} requests, {total / n:.1f} per Model: " + ", ".join(
        f"{k} {v}" for k, v in p.by_kind.items()
    )
    yield ""
    yield "Model controller actions and errors: " + ", ".join(
        f"{k} {int(v)}" for k, v in sorted(p.actions.items())
    )
    yield ""
    yield "Reconcile-duration histogram (Model controller, cumulative): " + ", ".join(
        f"<= {b:g}s: {int(c)}" for b, c in sorted(p.buckets.items())
    )
    yield ""


TABLE_HEADER = (
    "| phase | wall s | driver writes s | Models/s | per-Model settle p50 / p90 / max s"
    " | reconciles | per Model | reconcile p50 / p90 / p99 ms (histogram) | mean ms"
    " | operator CPU s | CPU ms per Model |\n"
    "|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|"
)


def report(n: int, phases: tuple[Phase, Phase], stats: dict[str, Any]) -> Iterator[str]:
    yield f"## {n} Models x 2 backends ({stats['pods']} pods at the end)\n"
    yield (
        f"Idle afterwards (nothing changes, {stats['idle_s']:.0f} s): the operator uses"
        f" {100 * stats['idle_cpu']:.0f} % of a core and makes"
        f" {stats['idle_requests_per_s']:.1f} API requests/s.\n"
    )
    yield TABLE_HEADER
    for p in phases:
        yield phase_row(n, p)
    yield ""
    for p in phases:
        yield from phase_details(n, p)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=500, help="Models to apply (default 500)")
    ap.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per phase (default 1800)"
    )
    args = ap.parse_args(argv)
    apply_phase, edit_phase, stats = asyncio.run(run(args.models, args.timeout))
    for line in report(args.models, (apply_phase, edit_phase), stats):
        print(line)


if __name__ == "__main__":
    main()
