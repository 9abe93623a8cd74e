"""``KindCluster`` without a cluster: a fake runner records every kubectl, helm and kind command
and its stdin, and answers ``kubectl get pods`` like a cluster running the last applied Model.
The applied Model passes the CRD schema, its CEL rules and the Python model; the engine it
generates is the simulator from the chart's image with arguments the simulator accepts; the
chart install gives the Model controller that image as ``--runtime-image``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import kubernetes_validate
import yaml

import crds
from controllers.main import parse_args as controllers_args
from controllers.model.planner import desired
from e2e.cluster import KindCluster
from matrixinfer.kubelet import expand
from sim.cli import build_config, serve_parser
from tests.crds.apiserver import api_server_errors

from .chart import objects

IMAGE = "registry.local/mi:e2e-7"
K8S_VERSION = "1.30.0"


class FakeKind:
    """Records commands; ``kubectl get pods`` lists the ready entry pods of the last Model
    applied (one per replica; a new revision gives new uids), minus the force-deleted ones."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.model: dict[str, Any] | None = None
        self.deleted: set[str] = set()

    def __call__(self, argv: Sequence[str], stdin: str | None) -> str:
        argv = list(argv)
        self.calls.append((argv, stdin))
        if "apply" in argv and stdin is not None:
            for doc in yaml.safe_load_all(stdin):
                if doc["kind"] == "Model":
                    self.model = doc
        if "delete" in argv and "pod" in argv:
            self.deleted.add(argv[argv.index("pod") + 1])
        if "get" in argv and "pods" in argv:
            return json.dumps({"items": self._pods()})
        return ""

    def _pods(self) -> list[dict[str, Any]]:
        if self.model is None:
            return []
        backend = self.model["spec"]["backends"][0]
        revision = next(a for a in backend["args"] if a.startswith("--seed="))
        ready = [{"type": "Ready", "status": "True"}]
        pods = []
        for i in range(backend["minReplicas"]):
            name = f"{self.model['metadata']['name']}-sim-{i}-server-0-0"
            if name in self.deleted:
                continue
            pods.append({"metadata": {"name": name, "uid": f"{name}{revision}"},
                         "status": {"conditions": ready}})  # fmt: skip
        return pods

    def commands(self, program: str) -> list[list[str]]:
        return [argv for argv, _ in self.calls if argv[0] == program]

    def applied(self) -> list[dict[str, Any]]:
        return [
            doc
            for argv, stdin in self.calls
            if "apply" in argv and stdin is not None
            for doc in yaml.safe_load_all(stdin)
        ]


def test_kind_cluster_applies_edits_and_deletes_a_model_with_kubectl() -> None:
    fake = FakeKind()
    spawned: list[list[str]] = []
    cluster = KindCluster(image=IMAGE, run=fake, spawn=spawned.append, poll_interval=0.01)
    cluster.install()
    cluster.deploy_model("m", 2)
    cluster.scale("m", 3)
    before = set(cluster.pod_ids("m"))
    cluster.roll("m")
    assert len(cluster.pod_ids("m")) == 3 and not before & set(cluster.pod_ids("m"))
    killed = cluster.kill_pod("m")
    cluster.uninstall()

    # the chart install: the image, which the controllers pass on as --runtime-image
    [helm_install, helm_uninstall] = fake.commands("helm")
    sets = dict(helm_install[i + 1].split("=", 1) for i, a in enumerate(helm_install)
                if a == "--set")  # fmt: skip
    assert sets == cluster.helm_values()
    values: dict[str, Any] = {}
    for key, value in sets.items():
        *path, last = key.split(".")
        node = values
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    [controllers] = [
        d["spec"]["template"]["spec"]["containers"][0]
        for d in objects(values)
        if d["kind"] == "Deployment"
        and d["spec"]["template"]["spec"]["containers"][0]["command"][0]
        == "matrixinfer-controllers"
    ]
    assert controllers_args(controllers["command"][1:]).runtime_image == IMAGE
    assert helm_uninstall[:2] == ["helm", "uninstall"]
    assert spawned and "port-forward" in spawned[0]

    # the Model as applied: scale and roll are edits of it
    models = [d for d in fake.applied() if d["kind"] == "Model"]
    assert [m["spec"]["backends"][0]["minReplicas"] for m in models] == [2, 3, 3]
    assert [m["spec"]["backends"][0]["args"][-1] for m in models] == [
        "--seed=0", "--seed=0", "--seed=1"
    ]  # fmt: skip
    for doc in models:
        assert api_server_errors(doc) == []  # the CRD schema and its CEL rules
        model = crds.parse_object(doc, "applied Model")
        assert isinstance(model, crds.Model)
        [infer] = [c.manifest for c in desired(model, runtime_image=IMAGE).children
                   if c.ref.kind == "ModelInfer"]  # fmt: skip
        pod = infer["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]
        engine = pod["containers"][0]
        assert (engine["image"], engine["command"]) == (IMAGE, ["matrixinfer-sim"])
        assert {c["image"] for c in [*pod["initContainers"], *pod["containers"]]} == {IMAGE}
        env = {e["name"]: e.get("value", "pod-0") for e in engine["env"]}
        cfg = build_config(serve_parser().parse_args([expand(a, env) for a in engine["args"]]))
        assert (cfg.model, cfg.port, cfg.pod_name) == ("m", 8000, "pod-0")
    # the weights the downloader checks, written by a Job before the Model
    for doc in fake.applied():
        if doc["kind"] in ("PersistentVolumeClaim", "Job"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = [d["kind"] for d in fake.applied()]
    assert kinds[:3] == ["PersistentVolumeClaim", "Job", "Model"]

    # a crash is a forced delete; uninstall deletes the Model while the operator still runs
    kubectl = fake.commands("kubectl")
    name = killed.split("/")[0]
    assert any(a[-5:] == ["pod", name, "--grace-period=0", "--force", "--wait=false"][-5:]
               for a in kubectl)  # fmt: skip
    order = [" ".join(a[:3]) if a[0] != "kubectl" else " ".join(a[5:8]) for a, _ in fake.calls]
    assert order.index("delete model m") < order.index("helm uninstall mi")
    assert [a[:3] for a in fake.commands("kind")][-1] == ["kind", "delete", "cluster"]
