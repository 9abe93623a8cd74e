"""The cluster interface the end-to-end suite is written against, and its two implementations:

- :class:`LocalStackCluster` — the local stack (simulator processes on loopback addresses, the
  extproc, the xDS server and Envoy from ``matrixinfer.stack``): runs on any machine, in
  ``make test``. It plays the controllers' part itself (starts and replaces the pods, writes the
  ModelServer/ModelRoute and the pods' Endpoints into the configuration directory).
- :class:`KindCluster` — a kind cluster: ``make image``, ``kind load``, ``helm install`` of
  ``charts/matrixinfer``, model resources applied with kubectl, the gateway reached through
  ``kubectl port-forward``. Needs Docker, kind, kubectl and helm (``make e2e``).

A model here is a ModelServer + ModelRoute over ``replicas`` simulator pods labelled
``app: <model>``; a *revision* replaces every pod (new names, new addresses).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from matrixinfer.process import ReadinessTimeout, free_port, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from sim.fleet import SimPod, SimProcess, sim_argv

__all__ = ["Cluster", "ClusterError", "KindCluster", "LocalStackCluster", "model_resources"]

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
        """SIGKILL one pod (a crash) and return its name; the pod is not replaced yet."""
        ...

    def wait_replaced(self, model: str, replicas: int) -> None:
        """Until ``replicas`` live pods serve the model again (the controller's repair)."""
        ...

    def pods(self, model: str) -> list[str]:
        """Names of the model's live pods."""
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


@dataclass
class _Model:
    name: str
    revision: int = 0
    pods: dict[str, SimProcess] = field(default_factory=dict)
    serial: int = 0  # a replacement pod gets a new name, as a controller's would


class LocalStackCluster:
    """The local stack as a cluster: pods are simulator processes on 127.0.1.x addresses."""

    def __init__(self, run_dir: Path | None = None, first_host: str = "127.0.1.1") -> None:
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="matrixinfer-e2e-"))
        self.config_dir = self.run_dir / "config"
        self.port = free_port(first_host)
        self._next_host = ipaddress.IPv4Address(first_host)
        self._models: dict[str, _Model] = {}
        self._stack: GatewayStack | None = None

    @property
    def gateway_url(self) -> str:
        if self._stack is None:
            raise ClusterError("gateway_url: not installed")
        return self._stack.url.removesuffix("/v1")

    def install(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self._stack = GatewayStack(self.config_dir, self.run_dir, StackOptions(access_log=True))
        self._stack.start()

    def deploy_model(self, model: str, replicas: int) -> None:
        m = self._models.setdefault(model, _Model(model))
        (self.config_dir / f"{model}.yaml").write_text(model_resources(model, self.port))
        self._converge(m, replicas)

    def scale(self, model: str, replicas: int) -> None:
        self._converge(self._model(model), replicas)

    def roll(self, model: str) -> None:
        m = self._model(model)
        old = list(m.pods)
        m.revision += 1
        for name in old:  # surge one, then retire one: the model keeps serving throughout
            self._start_pod(m)
            self._publish(m)
            m.pods.pop(name).stop()
            self._publish(m)

    def kill_pod(self, model: str) -> str:
        m = self._model(model)
        name, proc = next(iter(m.pods.items()))
        proc.signal(signal.SIGKILL)
        if proc.proc is not None:
            proc.proc.wait()
        return name

    def wait_replaced(self, model: str, replicas: int) -> None:
        m = self._model(model)
        for name in [n for n, p in m.pods.items() if not p.running()]:
            m.pods.pop(name).stop()
        self._converge(m, replicas)

    def pods(self, model: str) -> list[str]:
        return sorted(n for n, p in self._model(model).pods.items() if p.running())

    def uninstall(self) -> None:
        if self._stack is not None:
            self._stack.stop()
            self._stack = None
        for m in self._models.values():
            for proc in m.pods.values():
                proc.stop()
            m.pods.clear()

    # -- the controllers' part
    def _model(self, model: str) -> _Model:
        if model not in self._models:
            raise ClusterError(f"model {model!r} is not deployed")
        return self._models[model]

    def _start_pod(self, m: _Model) -> None:
        name = f"{m.name}-r{m.revision}-{m.serial}"
        m.serial += 1
        host = str(self._next_host)
        self._next_host += 1
        if not self._next_host.is_loopback:
            raise ClusterError("out of loopback addresses for pods")
        pod = SimPod(name, host, self.port)
        proc = SimProcess(
            pod, sim_argv(pod, m.name), self.run_dir / f"{pod.name}.log", timeout=30.0
        )
        proc.start()
        m.pods[pod.name] = proc

    def _converge(self, m: _Model, replicas: int) -> None:
        while len(m.pods) < replicas:
            self._start_pod(m)
        while len(m.pods) > replicas:
            name = sorted(m.pods)[-1]
            m.pods.pop(name).stop()
        self._publish(m)

    def _publish(self, m: _Model) -> None:
        """The pods as the gateway's Endpoints document; wait until Envoy knows exactly them."""
        lines = [
            "apiVersion: gateway.matrixinfer.ai/v1alpha1",
            "kind: Endpoints",
            "metadata:",
            f"  name: {m.name}-pods",
            "spec:",
            "  endpoints:",
        ]
        for name, proc in sorted(m.pods.items()):
            address, labels = proc.pod.address, f"{{app: {m.name}}}"
            lines.append(f"  - {{name: {name}, address: '{address}', labels: {labels}}}")
        if not m.pods:
            lines[-1] = "  endpoints: []"
        path = self.config_dir / f"zz-{m.name}-pods.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)  # the config watcher never reads half a file
        want = {p.pod.address for p in m.pods.values()}
        stack = self._stack
        if stack is None:
            raise ClusterError("deploy before install")
        try:
            wait_until(lambda: self._served(stack, m.name, want), 30.0, f"{m.name} pods served")
        except ReadinessTimeout as exc:
            raise ClusterError(f"{exc}; logs in {self.run_dir}") from None

    @staticmethod
    def _served(stack: GatewayStack, model: str, want: set[str]) -> bool:
        if not want <= stack.envoy_hosts():
            return False
        with urllib.request.urlopen(f"{stack.extproc_url}/debug/state", timeout=5) as resp:
            state = json.loads(resp.read())
        return want == _ready_addresses(state, model)


def _ready_addresses(state: object, model: str) -> set[str]:
    """The ready pod addresses the extproc's /debug/state lists for the ModelServer ``model``."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            addr = node.get("address")
            if isinstance(addr, str) and node.get("ready", True) and _names(node, model):
                found.add(addr)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(state)
    return found


def _names(node: dict[str, object], model: str) -> bool:
    labels = node.get("labels")
    return isinstance(labels, dict) and labels.get("app") == model


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
        name = self.pods(model)[0]
        self._kubectl("delete", "pod", name, "--grace-period=0", "--force", "--wait=false")
        return name

    def wait_replaced(self, model: str, replicas: int) -> None:
        _poll(lambda: len(self.pods(model)) == replicas, 180.0, f"{model}: {replicas} pods")

    def pods(self, model: str) -> list[str]:
        out = self._kubectl("get", "pods", "-l", f"app={model}", "-o", "json")
        items = json.loads(out)["items"]
        return sorted(
            p["metadata"]["name"]
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
