"""The cluster interface the end-to-end suite is written against, and its two implementations:

- :class:`LocalStackCluster` — the local stack in local mode (``matrixinfer.localcluster``: an
  in-memory API server, the real operator, pods as simulator processes on loopback addresses;
  the extproc, the xDS server and Envoy reading that API): runs on any machine, in
  ``make test``. A model is a ``Model`` file in the directory the local cluster applies.
- :class:`KindCluster` — a kind cluster: ``make image``, ``kind load``, ``helm install`` of
  ``charts/matrixinfer``, model resources applied with kubectl, the gateway reached through
  ``kubectl port-forward``. Needs Docker, kind, kubectl and helm (``make e2e``).

A *revision* replaces every pod. A pod's identity is ``name/uid`` (:meth:`Cluster.pod_ids`): a
controller may give a replacement pod the old one's name (the ModelInfer controller does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from matrixinfer.get import list_objects
from matrixinfer.localcluster import LocalCluster, LocalOptions
from matrixinfer.process import ReadinessTimeout, free_port, wait_until
from matrixinfer.stack import GatewayStack, StackOptions

__all__ = [
    "Cluster",
    "ClusterError",
    "KindCluster",
    "LocalStackCluster",
    "local_model",
    "model_resources",
]

POD_HEADER = "x-inference-pod"  # the simulator names the pod that answered


class ClusterError(RuntimeError):
    """A cluster operation failed; the message names the operation and what was seen."""


class Cluster(Protocol):
    """What the e2e tests do to a cluster. Every method returns once the change is served."""

    @property
    def gateway_url(self) -> str:
        """Base URL of the OpenAI API (``…/v1`` is appended by the caller)."""
        ...

    def install(self) -> None: ...

    def deploy_model(self, model: str, replicas: int) -> None: ...

    def scale(self, model: str, replicas: int) -> None: ...

    def roll(self, model: str) -> None:
        """A new revision: every pod replaced by a new one."""
        ...

    def kill_pod(self, model: str) -> str:
        """SIGKILL one pod (a crash) and return its id (``name/uid``); not replaced yet."""
        ...

    def wait_replaced(self, model: str, replicas: int) -> None:
        """Until ``replicas`` live pods serve the model again (the controller's repair)."""
        ...

    def pods(self, model: str) -> list[str]:
        """Names of the model's live pods."""
        ...

    def pod_ids(self, model: str) -> list[str]:
        """``name/uid`` of the model's live pods."""
        ...

    def uninstall(self) -> None: ...


def model_resources(model: str, port: int) -> str:
    """The ModelServer and ModelRoute of one model (YAML), the same for both clusters."""
    return f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata:
  name: {model}
spec:
  inferenceEngine: vLLM
  workloadSelector:
    matchLabels: {{app: {model}}}
  workloadPort: {{port: {port}}}
  trafficPolicy:
    retry: {{attempts: 2}}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata:
  name: {model}
spec:
  modelName: {model}
  rules:
  - name: default
    targets:
    - modelServerName: {model}
"""


LOCAL_CLAIM = "e2e-weights"


def local_model(model: str, replicas: int, revision: int = 0) -> str:
    """The Model of the local stack: one vLLM backend whose pods the local kubelet runs as
    simulators; ``revision`` changes the engine arguments (a new pod template). Its weights are
    on the claim ``e2e-weights`` (:data:`LOCAL_CLAIM`), a folder of the configuration directory:
    nothing to download."""
    return f"""apiVersion: registry.matrixinfer.ai/v1alpha1
kind: Model
metadata:
  name: {model}
spec:
  backends:
  - name: sim
    type: vLLM
    modelURI: pvc://{LOCAL_CLAIM}/{model}
    args: ["--seed={revision}"]
    minReplicas: {replicas}
"""


@dataclass
class _Model:
    name: str
    replicas: int
    revision: int = 0


class LocalStackCluster:
    """The local stack in local mode: the Model controller, the ModelInfer controller and a local
    kubelet (pods as simulator processes on 127.0.1.x) against an in-memory API server, and the
    gateway reading that API."""

    def __init__(self, run_dir: Path | None = None, first_host: str = "127.0.1.1") -> None:
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="matrixinfer-e2e-"))
        self.config_dir = self.run_dir / "config"
        self.first_host = first_host
        self._models: dict[str, _Model] = {}
        self._killed: set[str] = set()  # ids of pods kill_pod crashed
        self._local: LocalCluster | None = None
        self._stack: GatewayStack | None = None

    @property
    def gateway_url(self) -> str:
        if self._stack is None:
            raise ClusterError("gateway_url: not installed")
        return self._stack.url.removesuffix("/v1")

    def install(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self._local = LocalCluster(
            LocalOptions(self.config_dir, self.run_dir, first_host=self.first_host)
        ).start()
        self._stack = GatewayStack(
            self.config_dir,
            self.run_dir,
            StackOptions(access_log=True, kube_server=self._local.url),
        )
        self._stack.start()

    def deploy_model(self, model: str, replicas: int) -> None:
        self._models[model] = _Model(model, replicas)
        self._write(self._models[model])

    def scale(self, model: str, replicas: int) -> None:
        m = self._model(model)
        m.replicas = replicas
        self._write(m)

    def roll(self, model: str) -> None:
        m = self._model(model)
        before = frozenset(self.pod_ids(model))
        m.revision += 1
        self._write(m, replaced=before)

    def kill_pod(self, model: str) -> str:
        pod = self._pods(model)[0]
        name = pod["metadata"]["name"]
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--pod-name" in argv and argv[argv.index(b"--pod-name") + 1] == name.encode():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
                self._killed.add(_pod_id(pod))
                return _pod_id(pod)
        raise ClusterError(f"kill_pod: no process runs pod {name}")

    def wait_replaced(self, model: str, replicas: int) -> None:
        self._wait_served(self._model(model), replicas, frozenset(self._killed))

    def pods(self, model: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self._pods(model))

    def pod_ids(self, model: str) -> list[str]:
        return sorted(_pod_id(p) for p in self._pods(model))

    def uninstall(self) -> None:
        if self._stack is not None:
            self._stack.stop()
            self._stack = None
        if self._local is not None:
            self._local.stop()
            self._local = None

    # -- helpers
    def _model(self, model: str) -> _Model:
        if model not in self._models:
            raise ClusterError(f"model {model!r} is not deployed")
        return self._models[model]

    def _write(self, m: _Model, replaced: frozenset[str] = frozenset()) -> None:
        weights = self.config_dir / "volumes" / LOCAL_CLAIM / m.name  # the claim, locally
        weights.mkdir(parents=True, exist_ok=True)
        (weights / "config.json").write_text('{"model_type": "llama"}\n')
        path = self.config_dir / f"{m.name}.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(local_model(m.name, m.replicas, m.revision))
        tmp.replace(path)  # the applier never reads half a file
        self._wait_served(m, m.replicas, replaced)

    def _pods(self, model: str) -> list[dict[str, Any]]:
        """The model's Running, Ready, not terminating pods, from the local API."""
        if self._local is None:
            raise ClusterError("not installed")
        out = []
        for p in list_objects(self._local.url, "pods"):
            meta, status = p.get("metadata") or {}, p.get("status") or {}
            labels = meta.get("labels") or {}
            if labels.get("registry.matrixinfer.ai/model") != model and not str(
                meta.get("name", "")
            ).startswith(f"{model}-"):
                continue
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ()
            )
            if ready and status.get("phase") == "Running" and not meta.get("deletionTimestamp"):
                out.append(p)
        return out

    def _wait_served(
        self, m: _Model, replicas: int, replaced: frozenset[str] = frozenset()
    ) -> None:
        """Until ``replicas`` pods (none of ``replaced``) are ready and the gateway routes to
        exactly them."""
        stack = self._stack
        if stack is None:
            raise ClusterError("deploy before install")

        def served() -> bool:
            pods = self._pods(m.name)
            if len(pods) != replicas or {_pod_id(p) for p in pods} & replaced:
                return False
            want = {f"{p['status']['podIP']}:8000" for p in pods}
            return want <= stack.envoy_hosts() and want == _ready_addresses(stack)

        try:
            wait_until(served, 90.0, f"{m.name}: {replicas} pods served")
        except ReadinessTimeout as exc:
            raise ClusterError(f"{exc}; logs in {self.run_dir}") from None


def _pod_id(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('name')}/{meta.get('uid')}"


def _ready_addresses(stack: GatewayStack) -> set[str]:
    """The ready pod addresses the extproc routes to (its /debug/state)."""
    with urllib.request.urlopen(f"{stack.extproc_url}/debug/state", timeout=5) as resp:
        state = json.loads(resp.read())
    return {str(p["address"]) for p in state.get("pods") or () if p.get("ready", True)}


class KindCluster:
    """A kind cluster with the chart installed (not runnable on machines without Docker)."""

    def __init__(self, name: str = "matrixinfer-e2e", image: str | None = None) -> None:
        for tool in ("docker", "kind", "kubectl", "helm"):
            if shutil.which(tool) is None:
                raise ClusterError(f"KindCluster needs {tool} on PATH")
        self.name = name
        self.image = image or "ghcr.io/matrixinfer/matrixinfer:e2e"
        self.namespace = "matrixinfer"
        self.local_port = free_port()
        self._forward: subprocess.Popen[bytes] | None = None
        self.root = Path(__file__).resolve().parents[1]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def _run(self, *argv: str, stdin: str | None = None) -> str:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise ClusterError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
        return out.stdout

    def _kubectl(self, *argv: str, stdin: str | None = None) -> str:
        return self._run("kubectl", "--context", f"kind-{self.name}", "-n", self.namespace,
                         *argv, stdin=stdin)  # fmt: skip

    def install(self) -> None:
        self._run("kind", "create", "cluster", "--name", self.name, "--wait", "120s")
        self._run("make", "-C", str(self.root), "image", f"IMAGE={self.image}")
        self._run("kind", "load", "docker-image", self.image, "--name", self.name)
        repo, _, tag = self.image.rpartition(":")
        self._run(
            "helm", "install", "mi", str(self.root / "charts" / "matrixinfer"),
            "--kube-context", f"kind-{self.name}", "-n", self.namespace, "--create-namespace",
            "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
            "--set", f"watchNamespace={self.namespace}", "--wait", "--timeout", "5m",
        )  # fmt: skip
        self._forward = subprocess.Popen(
            ["kubectl", "--context", f"kind-{self.name}", "-n", self.namespace, "port-forward",
             "svc/mi-matrixinfer-gateway", f"{self.local_port}:80"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _deployment(self, model: str, replicas: int, revision: str) -> str:
        return f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: {model}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {model}}}}}
  template:
    metadata:
      labels: {{app: {model}}}
      annotations: {{e2e/revision: "{revision}"}}
    spec:
      containers:
      - name: engine
        image: {self.image}
        command: [matrixinfer-sim, --model, {model}, --host, 0.0.0.0, --port, "8000"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        ports: [{{name: http, containerPort: 8000}}]
        readinessProbe: {{httpGet: {{path: /health, port: http}}}}
"""

    def deploy_model(self, model: str, replicas: int) -> None:
        # the engine pods as a plain Deployment until the Model controller lands (then: a Model
        # whose engine is the simulator image)
        self._kubectl("apply", "-f", "-", stdin=model_resources(model, 8000))
        self._kubectl("apply", "-f", "-", stdin=self._deployment(model, replicas, "0"))
        self._kubectl("rollout", "status", f"deploy/{model}", "--timeout=180s")

    def scale(self, model: str, replicas: int) -> None:
        self._kubectl("scale", f"deploy/{model}", f"--replicas={replicas}")
        self._kubectl("rollout", "status", f"deploy/{model}", "--timeout=180s")

    def roll(self, model: str) -> None:
        self._kubectl("rollout", "restart", f"deploy/{model}")
        self._kubectl("rollout", "status", f"deploy/{model}", "--timeout=180s")

    def kill_pod(self, model: str) -> str:
        pod_id = self.pod_ids(model)[0]
        name = pod_id.split("/")[0]
        self._kubectl("delete", "pod", name, "--grace-period=0", "--force", "--wait=false")
        return pod_id

    def wait_replaced(self, model: str, replicas: int) -> None:
        _poll(lambda: len(self.pods(model)) == replicas, 180.0, f"{model}: {replicas} pods")

    def pods(self, model: str) -> list[str]:
        return sorted(i.split("/")[0] for i in self.pod_ids(model))

    def pod_ids(self, model: str) -> list[str]:
        out = self._kubectl("get", "pods", "-l", f"app={model}", "-o", "json")
        items = json.loads(out)["items"]
        return sorted(
            f"{p['metadata']['name']}/{p['metadata']['uid']}"
            for p in items
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True"
                    for c in p.get("status", {}).get("conditions", []))
        )  # fmt: skip

    def uninstall(self) -> None:
        if self._forward is not None:
            self._forward.terminate()
            self._forward.wait(10)
        try:
            self._run("helm", "uninstall", "mi", "--kube-context", f"kind-{self.name}",
                      "-n", self.namespace, "--wait")  # fmt: skip
        finally:
            self._run("kind", "delete", "cluster", "--name", self.name)


def _poll(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(1.0)
