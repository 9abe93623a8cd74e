"""Benchmark of the ModelInfer controller.

1. Planner: one `plan()` over 1,000 InferGroups x 4 roles (entry + 1 worker each: 8,000 pods),
   in three situations: steady state (nothing to do), cold start (every manifest built), and the
   first step of a rolling update. Baseline in the same process: parsing the 8,000 pod objects
   into the planner's input (`observe.pod_from_json`), work any reconcile has to do anyway.
2. Operator: the real Kopf operator against the emulated API server (kmock) bringing up
   N ModelInfers x G groups (one role, one entry pod per group) until every status reports all
   groups ready.

    .venv/bin/python -m bench.modelinfer_planner [--runs 20] [--modelinfers 100] [--groups 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from controllers.modelinfer import observe
from controllers.modelinfer.planner import plan
from controllers.modelinfer.spec import group_template, parse
from controllers.modelinfer.types import Observed, PlannerState
from crds.workload import ModelInfer

ROLES = ("prefill", "decode", "router", "cache")


def big_object(groups: int, image: str = "vllm:1") -> dict[str, Any]:
    tmpl = {"spec": {"containers": [{"name": "engine", "image": image}]}}
    roles = [
        {
            "name": r,
            "replicas": 1,
            "workerReplicas": 1,
            "entryTemplate": tmpl,
            "workerTemplate": tmpl,
        }
        for r in ROLES
    ]
    return {
        "apiVersion": "workload.matrixinfer.ai/v1alpha1",
        "kind": "ModelInfer",
        "metadata": {"name": "big", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"replicas": groups, "template": {"roles": roles}},
    }


def model_infer(obj: dict[str, Any]) -> ModelInfer:
    spec = parse(obj)
    assert isinstance(spec, ModelInfer), spec
    return spec


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, float, float]:
    """(median wall ms, p95 wall ms, min wall ms, median CPU ms) over `runs` calls.

    CPU time (time.process_time) is what the call itself costs; wall time on a shared machine
    also includes waiting for a core while other processes run.
    """
    walls, cpus = [], []
    fn()  # warm-up
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    walls.sort()
    return (
        statistics.median(walls) * 1000,
        walls[int(0.95 * (len(walls) - 1))] * 1000,
        walls[0] * 1000,
        statistics.median(cpus) * 1000,
    )


def planner_bench(groups: int, runs: int) -> list[tuple[str, float, float, float, float]]:
    spec = model_infer(big_object(groups))
    template = group_template(spec.spec.template)
    cold = plan(spec, Observed(), PlannerState(), 0.0)
    pod_json = []
    for c in cold.create_pods:
        m = copy.deepcopy(c.manifest)
        m["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        pod_json.append(m)
    pods = tuple(p for p in (observe.pod_from_json(j, 0.0) for j in pod_json) if p is not None)
    revisions = {template.revision: template}
    services = tuple(
        s for s in (observe.service_from_json(c.manifest) for c in cold.create_services) if s
    )
    steady_obs = Observed(
        pods=pods,
        services=services,
        revisions=revisions,
        current_revision=template.revision,
    )
    first = plan(spec, steady_obs, PlannerState(), 0.0)
    steady_obs = Observed(
        pods=pods,
        services=services,
        revisions=revisions,
        current_revision=template.revision,
        status=first.status or {},
        conditions=observe.conditions_from_status(first.status or {}),
    )
    assert not plan(spec, steady_obs, PlannerState(), 0.0).has_changes
    new_spec = model_infer(big_object(groups, "vllm:2"))
    update = plan(new_spec, steady_obs, PlannerState(), 0.0)
    assert len(update.delete_pods) == 8  # one group (maxUnavailable 1) of 8 pods
    rows = [
        (
            "baseline: parse 8,000 pod objects",
            *timed(lambda: [observe.pod_from_json(j, 0.0) for j in pod_json], runs),
        ),
        (
            "plan, steady state (no actions)",
            *timed(lambda: plan(spec, steady_obs, PlannerState(), 0.0), runs),
        ),
        (
            "plan, rolling update step",
            *timed(lambda: plan(new_spec, steady_obs, PlannerState(), 0.0), runs),
        ),
        (
            "plan, cold start (8,000 pod manifests)",
            *timed(lambda: plan(spec, Observed(), PlannerState(), 0.0), max(3, runs // 4)),
        ),
    ]
    return rows


async def operator_bench(modelinfers: int, groups: int) -> dict[str, Any]:
    from matrixinfer.testing.kube import Kubelet, emulator, operator

    tmpl = {"spec": {"containers": [{"name": "engine", "image": "vllm:1"}]}}
    async with emulator(history_limit=32) as api:
        kubelet = Kubelet(api, interval=0.05)
        ktask = asyncio.create_task(kubelet.run())
        try:
            async with operator(api, resync_seconds=30.0):
                api.k.by_kind = {}
                t0 = time.perf_counter()
                first_pod: list[float] = []

                async def watch_first_pod() -> None:
                    while not api.pods():  # noqa: ASYNC110 (kmock has no hook to wait on)
                        await asyncio.sleep(0.05)
                    first_pod.append(time.perf_counter() - t0)

                watcher = asyncio.create_task(watch_first_pod())
                await asyncio.gather(
                    *(
                        api.create_modelinfer(
                            {
                                "apiVersion": "workload.matrixinfer.ai/v1alpha1",
                                "kind": "ModelInfer",
                                "metadata": {"name": f"mi{i}", "namespace": "ns", "uid": f"u{i}"},
                                "spec": {
                                    "replicas": groups,
                                    "template": {
                                        "roles": [{"name": "server", "entryTemplate": tmpl}]
                                    },
                                },
                            }
                        )
                        for i in range(modelinfers)
                    )
                )
                t_created = time.perf_counter() - t0
                last_report = 0.0
                while True:
                    mis = api.objects("workload.matrixinfer.ai/v1alpha1/modelinfers")
                    done = sum(
                        1
                        for m in mis.values()
                        if (m.get("status") or {}).get("readyReplicas") == groups
                    )
                    if done == modelinfers:
                        break
                    if time.perf_counter() - last_report > 10:
                        last_report = time.perf_counter()
                        print(
                            f"  {last_report - t0:.0f}s: {done}/{modelinfers} ready, "
                            f"{len(api.pods())} pods, {api.k.handled} requests",
                            file=sys.stderr,
                        )
                    if time.perf_counter() - t0 > 900:
                        raise TimeoutError(
                            f"only {done}/{modelinfers} ModelInfers ready after 900 s"
                        )
                    await asyncio.sleep(0.1)
                total = time.perf_counter() - t0
                watcher.cancel()
                n_pods = len(api.pods())
                n_requests = sum(api.k.by_kind.values())
                kinds = dict(sorted(api.k.by_kind.items(), key=lambda kv: -kv[1]))
        finally:
            ktask.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ktask
    return {
        "modelinfers": modelinfers,
        "groups": groups,
        "pods": n_pods,
        "create_requests_s": t_created,
        "first_pod_s": first_pod[0] if first_pod else float("nan"),
        "all_ready_s": total,
        "api_requests": n_requests,
        "requests_per_modelinfer": n_requests / modelinfers,
        "by_kind": kinds,
    }


async def emulator_baseline(n: int) -> float:
    """Seconds for n pod creates straight into the emulator (what the operator cannot beat)."""
    from matrixinfer.testing.kube import emulator

    async with emulator(history_limit=32) as api:
        t0 = time.perf_counter()
        for i in range(n):
            await api.request(
                "POST",
                "/api/v1/namespaces/ns/pods",
                {"metadata": {"name": f"p{i}", "namespace": "ns"}, "spec": {}},
            )
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--modelinfers", type=int, default=100)
    ap.add_argument("--operator-groups", type=int, default=8)
    ap.add_argument("--skip-operator", action="store_true")
    args = ap.parse_args()
    print(f"## Planner: {args.groups} groups x {len(ROLES)} roles x 2 pods\n")
    print("| case | wall median ms | wall p95 ms | wall min ms | CPU median ms |")
    print("|---|---:|---:|---:|---:|")
    rows = planner_bench(args.groups, args.runs)
    base = rows[0][4]
    for name, med, p95, low, cpu in rows:
        print(f"| {name} | {med:.1f} | {p95:.1f} | {low:.1f} | {cpu:.1f} |")
    print(f"\nCPU ratio steady-state plan / baseline parse: {rows[1][4] / base:.2f}x")
    print(f"CPU ratio rolling-update step / baseline parse: {rows[2][4] / base:.2f}x\n")
    if args.skip_operator:
        return
    res = asyncio.run(operator_bench(args.modelinfers, args.operator_groups))
    n = int(res["pods"])
    baseline = asyncio.run(emulator_baseline(n))
    print(f"## Operator: {res['modelinfers']} ModelInfers x {res['groups']} groups on kmock\n")
    for k, v in res.items():
        if k == "by_kind":
            print(
                "- requests by kind (the fake kubelet's pod status PATCHes included): "
                + ", ".join(f"{kind} {n}" for kind, n in v.items())
            )
        else:
            print(f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}")
    print(f"- baseline: {n} sequential pod POSTs into the emulator: {baseline:.2f} s")
    print(f"- ratio all_ready / baseline: {res['all_ready_s'] / baseline:.2f}x")


if __name__ == "__main__":
    main()
