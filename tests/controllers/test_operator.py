"""The real Kopf operator against the emulated API server (kmock)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.process import Child, free_port, http_ok
from matrixinfer.testing.kube import Api, Kubelet, emulator, eventually, operator
from tests.controllers.fakecluster import container, make_object
from tests.xds.kube import TokenProxy, write_kubeconfig

pytestmark = pytest.mark.timeout(180)


def status_of(api: Api, name: str = "llama") -> dict[str, Any]:
    mi = api.modelinfer(name)
    return (mi or {}).get("status") or {}


def converged(api: Api, replicas: int, name: str = "llama") -> bool:
    st = status_of(api, name)
    conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
    return (
        st.get("readyReplicas") == replicas
        and st.get("updatedReplicas") == replicas
        and conds.get("Progressing") == "False"
    )


def env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


async def test_create_makes_pods_services_env_and_status(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=2))
        await eventually(lambda: converged(api, 2), what="2 ready groups")
    events = api.objects("v1/events")
    assert any(e.get("reason") == "CreatingGroups" for e in events.values()), events
    pods = api.pods()
    assert sorted(pods) == sorted(
        f"llama-{g}-{r}"
        for g in (0, 1)
        for r in ("prefill-0-0", "prefill-0-1", "decode-0-0", "decode-1-0")
    )
    assert sorted(api.services()) == ["llama-0-prefill-0", "llama-1-prefill-0"]
    w = pods["llama-0-prefill-0-1"]
    assert env(w)["ENTRY_ADDRESS"] == "llama-0-prefill-0-0.llama-0-prefill-0.ns.svc"
    assert env(w)["WORKER_INDEX"] == "1" and env(w)["GROUP_SIZE"] == "2"
    assert w["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    st = status_of(api)
    assert st["replicas"] == 2 and st["observedGeneration"] == 1
    assert st["labelSelector"].startswith("workload.matrixinfer.ai/model-infer=llama")
    mi = api.modelinfer("llama")
    assert mi is not None
    assert "workload.matrixinfer.ai/finalizer" in mi["metadata"].get("finalizers", [])
    assert len(api.objects("apps/v1/controllerrevisions")) == 1


def groups_of(api: Api, name: str = "llama") -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for pod in api.pods().values():
        labels = pod["metadata"]["labels"]
        if labels.get("workload.matrixinfer.ai/model-infer") == name:
            out.setdefault(int(labels["workload.matrixinfer.ai/group"]), []).append(pod)
    return out


def ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


async def mark(api: Api, names: list[str]) -> None:
    """Label pods so a test can tell the same pod object from a recreated one."""
    for n in names:
        await api.request(
            "PATCH", f"/api/v1/namespaces/ns/pods/{n}", {"metadata": {"labels": {"marker": "x"}}}
        )


def marked(api: Api) -> set[str]:
    return {n for n, p in api.pods().items() if p["metadata"]["labels"].get("marker") == "x"}


async def test_scale_up_and_down(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=2))
        await eventually(lambda: converged(api, 2), what="2 groups")
        await api.patch_modelinfer("llama", {"replicas": 4})
        await eventually(lambda: converged(api, 4) and len(groups_of(api)) == 4, what="4 groups")
        assert sorted(groups_of(api)) == [0, 1, 2, 3]
        await api.patch_modelinfer("llama", {"replicas": 1})
        await eventually(lambda: converged(api, 1) and len(groups_of(api)) == 1, what="1 group")
        assert sorted(groups_of(api)) == [0]  # equal groups: the highest indices go first
        assert sorted(api.services()) == ["llama-0-prefill-0"]
        assert status_of(api)["replicas"] == 1


async def test_template_change_rolls_out_group_by_group(api: Api, kubelet: Kubelet) -> None:
    kubelet.delay = 0.15  # pods take a moment to become ready, so the rollout has steps
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=3))
        await eventually(lambda: converged(api, 3), what="3 groups")
        old_rev = status_of(api)["updateRevision"]
        new_roles = make_object(replicas=3)["spec"]["template"]["roles"]
        for r in new_roles:
            r["entryTemplate"] = container("vllm:2")
            if "workerTemplate" in r:
                r["workerTemplate"] = container("vllm:2")
        await api.patch_modelinfer("llama", {"template": {"roles": new_roles}})
        least_ready = 3
        saw_update = False

        def done() -> bool:
            nonlocal least_ready, saw_update
            groups = groups_of(api)
            n_ready = sum(1 for pods in groups.values() if len(pods) == 4 and all(map(ready, pods)))
            least_ready = min(least_ready, n_ready)
            st = status_of(api)
            conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
            saw_update |= conds.get("UpdateInProgress") == "True"
            return st.get("updateRevision") != old_rev and converged(api, 3)

        await eventually(done, 60, "the rollout to finish")
        assert saw_update
        assert least_ready >= 2, f"maxUnavailable 1 broken: only {least_ready}/3 groups ready"
        st = status_of(api)
        assert st["currentRevision"] == st["updateRevision"] != old_rev
        for pods in groups_of(api).values():
            for pod in pods:
                assert pod["spec"]["containers"][0]["image"] == "vllm:2"
                assert (
                    pod["metadata"]["labels"]["workload.matrixinfer.ai/revision"]
                    == (st["updateRevision"])
                )
        assert len(api.objects("apps/v1/controllerrevisions")) == 1  # the old one is collected


async def test_deleted_pod_recreates_its_role_instance(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=1))
        await eventually(lambda: converged(api, 1), what="1 group")
        all_pods = sorted(api.pods())
        await mark(api, all_pods)
        await api.delete("/api/v1/namespaces/ns/pods/llama-0-prefill-0-1")  # a worker
        await eventually(
            lambda: (
                sorted(api.pods()) == all_pods
                and converged(api, 1)
                and marked(api) == {"llama-0-decode-0-0", "llama-0-decode-1-0"}
            ),
            what="the prefill instance (entry and worker) recreated, decode pods untouched",
        )


async def test_group_recreate_policy_recreates_the_whole_group(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=2, recoveryPolicy="GroupRecreate"))
        await eventually(lambda: converged(api, 2), what="2 groups")
        await mark(api, sorted(api.pods()))
        await api.patch_pod_status("llama-1-decode-1-0", {"phase": "Failed", "conditions": []})
        await eventually(
            lambda: (
                converged(api, 2)
                and len(api.pods()) == 8
                and marked(api) == {n for n in api.pods() if n.startswith("llama-0-")}
            ),
            what="group 1 recreated, group 0 untouched",
        )


async def test_operator_restarted_mid_rollout_finishes_without_duplicates(
    api: Api, kubelet: Kubelet
) -> None:
    kubelet.delay = 0.3
    obj = make_object(replicas=4, rolloutStrategy={"maxUnavailable": 1})
    async with operator(api):
        await api.create_modelinfer(obj)
        await eventually(lambda: converged(api, 4), 60, "4 groups")
        roles = obj["spec"]["template"]["roles"]
        for r in roles:
            r["entryTemplate"] = container("vllm:3")
            r.pop("workerTemplate", None)
            r["workerReplicas"] = 0
        await api.patch_modelinfer("llama", {"template": {"roles": roles}})

        def some_updated() -> bool:
            return any(p["spec"]["containers"][0]["image"] == "vllm:3" for p in api.pods().values())

        await eventually(some_updated, 10, "the rollout to start")
    assert not converged(api, 4) or status_of(api).get("currentRevision") != status_of(api).get(
        "updateRevision"
    ), "the rollout finished before the restart; the test would prove nothing"
    requests_before = len(list(api.k))
    async with operator(api):
        await eventually(
            lambda: (
                converged(api, 4)
                and all(
                    p["spec"]["containers"][0]["image"] == "vllm:3" for p in api.pods().values()
                )
            ),
            # four groups one at a time (maxUnavailable 1), each waiting for the kubelet's 0.3 s:
            # 7 s here, 23 s in a 1-core loaded run
            60,
            "the rollout to finish after the restart",
        )
    assert sorted(groups_of(api)) == [0, 1, 2, 3]
    assert sorted(api.pods()) == sorted(
        f"llama-{g}-{r}" for g in range(4) for r in ("prefill-0-0", "decode-0-0", "decode-1-0")
    )
    assert api.services() == {}  # no more workers: the headless Services are gone
    creates_after = [
        r for r in list(api.k)[requests_before:] if r.method == "POST" and "/pods" in str(r.url)
    ]
    assert creates_after, "the restarted operator created the remaining pods"


async def test_deleting_the_modelinfer_removes_its_children(api: Api, kubelet: Kubelet) -> None:
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=2))
        await eventually(lambda: converged(api, 2), what="2 groups")
        await api.delete_modelinfer("llama")
        await eventually(
            lambda: (
                api.modelinfer("llama") is None
                and not api.pods()
                and not api.services()
                and not api.objects("apps/v1/controllerrevisions")
            ),
            what="the ModelInfer and every child gone",
        )


async def test_invalid_spec_is_reported_on_a_condition(api: Api, kubelet: Kubelet) -> None:
    roles = [{"name": "prefill", "replicas": 1, "workerReplicas": 2, "entryTemplate": container()}]
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=1, roles=roles))

        def reported() -> dict[str, Any] | None:
            for c in status_of(api).get("conditions", []):
                if c["type"] == "SpecValid" and c["status"] == "False":
                    return dict(c)
            return None

        cond = await eventually(reported, what="SpecValid=False")
        assert cond["reason"] == "InvalidWorkerTemplate"
        assert "spec.template.roles[0].workerTemplate" in cond["message"]
        assert api.pods() == {}


async def test_gang_scheduling_with_volcano_podgroups(kubelet: Kubelet) -> None:
    tmpl = {"spec": {"schedulerName": "volcano", "containers": [{"name": "e", "image": "x"}]}}
    roles = [
        {
            "name": "prefill",
            "replicas": 1,
            "workerReplicas": 1,
            "entryTemplate": tmpl,
            "workerTemplate": tmpl,
        },
        {"name": "decode", "replicas": 2, "entryTemplate": tmpl},
    ]
    obj = make_object(replicas=2, roles=roles, gangPolicy={"minRoleReplicas": {"decode": 1}})
    async with emulator(volcano=True) as api:
        vk = Kubelet(api)
        task = asyncio.create_task(vk.run())
        try:
            async with operator(api):
                await api.create_modelinfer(obj)
                await eventually(lambda: converged(api, 2), what="2 gang-scheduled groups")
                pgs = api.objects("scheduling.volcano.sh/v1beta1/podgroups")
                assert sorted(pgs) == ["llama-0", "llama-1"]
                assert pgs["llama-0"]["spec"]["minMember"] == 2 + 1
                assert pgs["llama-0"]["spec"]["minTaskMember"] == {"prefill": 2, "decode": 1}
                ann = api.pods()["llama-1-decode-0-0"]["metadata"]["annotations"]
                assert ann["scheduling.k8s.io/group-name"] == "llama-1"
                await api.delete_modelinfer("llama")
                await eventually(
                    lambda: (
                        not api.objects("scheduling.volcano.sh/v1beta1/podgroups")
                        and not api.pods()
                    ),
                    what="PodGroups and pods deleted with the ModelInfer",
                )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_no_podgroups_without_the_crd(api: Api, kubelet: Kubelet) -> None:
    tmpl = {"spec": {"schedulerName": "volcano", "containers": [{"name": "e", "image": "x"}]}}
    roles = [{"name": "decode", "replicas": 1, "entryTemplate": tmpl}]
    async with operator(api):
        await api.create_modelinfer(make_object(replicas=1, roles=roles))
        await eventually(lambda: converged(api, 1), what="1 group of plain pods")

        def gang_condition() -> str | None:
            for c in status_of(api).get("conditions", []):
                if c["type"] == "GangScheduling":
                    return str(c["reason"])
            return None

        assert await eventually(gang_condition) == "PodGroupCRDMissing"
        ann = api.pods()["llama-0-decode-0-0"]["metadata"].get("annotations") or {}
        assert "scheduling.k8s.io/group-name" not in ann


async def test_metrics_and_liveness_endpoints(api: Api, kubelet: Kubelet) -> None:
    metrics_port, live_port = free_port(), free_port()
    async with operator(
        api,
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
        liveness_endpoint=f"http://127.0.0.1:{live_port}/healthz",
    ):
        await api.create_modelinfer(make_object(replicas=2))
        await eventually(lambda: converged(api, 2), what="2 groups")

        def scraped() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            out: dict[str, float] = {}
            for fam in text_string_to_metric_families(text.read().decode()):
                for s in fam.samples:
                    key = s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[key + "}"] = s.value
            return out

        def groups_ready() -> dict[str, float] | None:
            m = scraped()
            key = "matrixinfer_controller_infer_groups{model_infer=llama,namespace=ns,state=Ready}"
            return m if m.get(key) == 2 else None

        m = await eventually(groups_ready, what="the groups metric to show 2 Ready")
        assert (
            m["matrixinfer_controller_reconcile_duration_seconds_count{controller=modelinfer}"] > 0
        )
        assert (
            m["matrixinfer_controller_actions_total{action=create_pod,controller=modelinfer}"] == 8
        )
        assert await asyncio.to_thread(http_ok, f"http://127.0.0.1:{live_port}/healthz")


async def test_the_console_script_runs_the_operator(
    api: Api, kubelet: Kubelet, logdir: Path
) -> None:
    """`matrixinfer-controllers` as a real child process against the emulator."""
    live, metrics = free_port(), free_port()
    exe = Path(sys.executable).parent / "matrixinfer-controllers"
    child = Child(
        "controllers",
        [
            str(exe),
            "--server",
            api.url,
            "--namespace",
            "ns",
            "--liveness-port",
            str(live),
            "--metrics-port",
            str(metrics),
            "--metrics-host",
            "127.0.0.1",
        ],
        log_path=logdir / "controllers.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{live}/healthz"),
        ready_timeout=30,
    )
    await asyncio.to_thread(child.start)  # the emulator keeps serving in this loop meanwhile
    try:
        await api.create_modelinfer(make_object(replicas=1))
        await eventually(lambda: converged(api, 1), 20, "1 group made by the child process")
        assert len(api.pods()) == 4
    finally:
        code = await asyncio.to_thread(child.stop)
    assert code in (0, -15), child.log_tail()


async def test_role_rolling_update_replaces_only_the_changed_role(
    api: Api, kubelet: Kubelet
) -> None:
    obj = make_object(replicas=2, rolloutStrategy={"type": "RoleRollingUpdate"})
    async with operator(api):
        await api.create_modelinfer(obj)
        await eventually(lambda: converged(api, 2), what="2 groups")
        prefill = sorted(n for n in api.pods() if "-prefill-" in n)
        await mark(api, prefill)
        roles = obj["spec"]["template"]["roles"]
        roles[1]["entryTemplate"] = container("vllm:2")  # only decode changes
        await api.patch_modelinfer("llama", {"template": {"roles": roles}})

        def done() -> bool:
            st = status_of(api)
            pods = api.pods()
            return (
                converged(api, 2)
                and st.get("currentRevision") == st.get("updateRevision")
                and all(
                    p["spec"]["containers"][0]["image"] == "vllm:2"
                    for n, p in pods.items()
                    if "-decode-" in n
                )
            )

        await eventually(done, what="decode pods replaced")
        assert marked(api) == set(prefill)  # the prefill pods were never recreated
        rev = status_of(api)["updateRevision"]
        assert all(
            p["metadata"]["labels"]["workload.matrixinfer.ai/revision"] == rev
            for p in api.pods().values()
        )


async def test_the_operator_logs_in_again_with_a_rotated_token(
    api: Api, kubelet: Kubelet, logdir: Path, tmp_path: Path
) -> None:
    """`matrixinfer-controllers --kubeconfig` through a proxy that admits only the token in a
    file: after the token rotates, Kopf meets a 401 and logs in again; the login handler
    re-reads the token, so the new one is sent. (That the operator then reconciles new objects
    is not asserted: against the emulator it does not even after a plain dropped connection.)"""
    token = tmp_path / "token"
    token.write_text("token-1\n")
    proxy = TokenProxy(api.url, token)
    await proxy.start()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", proxy.url, token)
    live = free_port()
    exe = Path(sys.executable).parent / "matrixinfer-controllers"
    child = Child(
        "controllers",
        [str(exe), "--kubeconfig", str(kubeconfig), "--namespace", "ns",
         "--liveness-port", str(live), "--metrics-port", "0"],
        log_path=logdir / "controllers.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{live}/healthz"),
        ready_timeout=30,
    )  # fmt: skip
    await asyncio.to_thread(child.start)
    try:
        await api.create_modelinfer(make_object(replicas=1))
        await eventually(lambda: converged(api, 1), 20, "1 group with the first token")
        assert proxy.refused == 0

        # the token rotates; the open watches stay (as a real API server keeps them); Kopf's
        # next request (patching the new object) is refused, Kopf logs in again
        token.write_text("token-2\n")
        await api.create_modelinfer(make_object(name="second", replicas=1))
        log = logdir / "controllers.log"
        await eventually(
            lambda: "Re-authentication has finished" in log.read_text(), 30, "Kopf's new login"
        )
        await eventually(lambda: proxy.admitted.get("token-2", 0) > 0, 30, "the new token used")
        assert proxy.refused > 0
        assert "Kubernetes credentials loaded again" in log.read_text()
        assert http_ok(f"http://127.0.0.1:{live}/healthz")
    finally:
        code = await asyncio.to_thread(child.stop)
        await proxy.stop()
    assert code in (0, -15), child.log_tail()
