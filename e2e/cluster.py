"""The cluster interface the end-to-end suite is written against, and its two implementations:

- :class:`LocalStackCluster` — the local stack in local mode (``matrixinfer.localcluster``: an
  in-memory API server, the real operator, pods as simulator processes on loopback addresses;
  the extproc, the xDS server and Envoy reading that API): runs on any machine, in
  ``make test``. A model is a ``Model`` file in the directory the local cluster applies.
- :class:`KindCluster` — a kind cluster: ``make image``, ``kind load``, ``helm install`` of
  ``charts/matrixinfer``, the same ``Model`` applied, edited and deleted with kubectl, the
  gateway reached through ``kubectl port-forward``. Needs Docker, kind, kubectl and helm
  (``make e2e``).

Both run the one Model of :func:`local_model`: a vLLM backend whose engine is the simulator
from the MatrixInfer image, written as its own ``command`` (the local kubelet runs that command
as written; a cluster runs the image).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controllers.modelinfer.types import LABEL_ENTRY, LABEL_MODEL_INFER
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
    "weights_job",
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


LOCAL_CLAIM = "e2e-weights"
BACKEND = "sim"
SIM_IMAGE = "ghcr.io/matrixinfer/matrixinfer:e2e"
"""The image ``make e2e`` builds and loads into kind (the simulator is one of its programs)."""


def local_model(model: str, replicas: int, revision: int = 0, image: str = SIM_IMAGE) -> str:
    """The Model both clusters apply: one vLLM backend ``sim`` whose engine is the simulator
    from ``image`` (its own ``command``: the local kubelet runs it as written, a cluster runs
    the image); ``revision`` changes the engine's arguments (a new pod template). The weights
    are on the claim ``e2e-weights`` (:data:`LOCAL_CLAIM`): a folder of the configuration
    directory locally, a PersistentVolumeClaim :func:`weights_job` fills on kind."""
    return f"""apiVersion: registry.matrixinfer.ai/v1alpha1
kind: Model
metadata:
  name: {model}
spec:
  backends:
  - name: {BACKEND}
    type: vLLM
    image: {image}
    command: [matrixinfer-sim]
    args: [--served-model-name, $(MATRIXINFER_SERVED_MODEL_NAME), --host, 0.0.0.0,
           --port, $(MATRIXINFER_PORT), --pod-name, $(POD_NAME), "--seed={revision}"]
    env:
    - name: POD_NAME
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
    modelURI: pvc://{LOCAL_CLAIM}/{model}
    minReplicas: {replicas}
"""


def weights_job(model: str, image: str = SIM_IMAGE) -> str:
    """The claim ``e2e-weights`` and a Job that puts ``<model>/config.json`` on it: the
    simulator needs no weights, but the Model's downloader checks that a pvc:// path is there."""
    return f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {LOCAL_CLAIM}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 16Mi}}}}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {LOCAL_CLAIM}-{model}
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: write
        image: {image}
        command: [python, -c, "import pathlib; d = pathlib.Path('/w/{model}'); \
d.mkdir(parents=True, exist_ok=True); (d / 'config.json').write_text('{{}}')"]
        volumeMounts: [{{name: w, mountPath: /w}}]
      volumes:
      - name: w
        persistentVolumeClaim: {{claimName: {LOCAL_CLAIM}}}
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
        parent = f"PPid:\t{os.getpid()}"  # the kubelet runs here: its pods are our children
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
                ours = parent in (cmdline.parent / "status").read_text().splitlines()
            except OSError:
                continue
            named = b"--pod-name" in argv and argv[argv.index(b"--pod-name") + 1] == name.encode()
            if ours and named:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
                # the crash, then the pod deleted (as kind's kill_pod: kubectl delete --force):
                # the kubelet alone would restart the engine in place (restartPolicy Always)
                assert self._local is not None
                ns = pod["metadata"].get("namespace") or "default"
                url = f"{self._local.url}/api/v1/namespaces/{ns}/pods/{name}"
                with urllib.request.urlopen(
                    urllib.request.Request(url, method="DELETE"), timeout=10
                ):
                    pass
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


Runner = Callable[[Sequence[str], str | None], str]
"""Runs a command (argv, stdin) and returns its output; ClusterError when it fails."""


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    out = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
    return out.stdout


class KindCluster:
    """A kind cluster with the chart installed (not runnable on machines without Docker).

    A model is the :func:`local_model` Model, applied with ``kubectl apply``; scaling and a new
    revision are edits of that Model applied again (the Model owns its ModelInfer's replicas
    when the backend sets no ``maxReplicas``: a ``kubectl scale`` of the ModelInfer would be put
    back, so editing the Model is what a user does); a crash is ``kubectl delete pod --force``.
    ``run`` and ``spawn`` stand in for the programs in tests (they record what would be sent)."""

    def __init__(
        self,
        name: str = "matrixinfer-e2e",
        image: str | None = None,
        *,
        run: Runner | None = None,
        spawn: Callable[[list[str]], Any] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        if run is None:
            for tool in ("docker", "kind", "kubectl", "helm"):
                if shutil.which(tool) is None:
                    raise ClusterError(f"KindCluster needs {tool} on PATH")
        self.name = name
        self.image = image or SIM_IMAGE
        self.namespace = "matrixinfer"
        self.local_port = free_port()
        self._run_command: Runner = run or run_command
        self._spawn = spawn or (
            lambda argv: subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        self._forward: Any = None
        self._models: dict[str, _Model] = {}
        self.poll_interval = poll_interval
        self.root = Path(__file__).resolve().parents[1]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}"

    def _run(self, *argv: str, stdin: str | None = None) -> str:
        return self._run_command(argv, stdin)

    def _kubectl(self, *argv: str, stdin: str | None = None) -> str:
        return self._run("kubectl", "--context", f"kind-{self.name}", "-n", self.namespace,
                         *argv, stdin=stdin)  # fmt: skip

    def helm_values(self) -> dict[str, str]:
        """The chart values ``install`` sets: the image (also the controllers'
        ``--runtime-image``, so the Model's downloader, sidecar and simulator are the image
        loaded into kind) and the one namespace watched."""
        repo, _, tag = self.image.rpartition(":")
        return {"image.repository": repo, "image.tag": tag, "watchNamespace": self.namespace}

    def install(self) -> None:
        self._run("kind", "create", "cluster", "--name", self.name, "--wait", "120s")
        self._run("make", "-C", str(self.root), "image", f"IMAGE={self.image}")
        self._run("kind", "load", "docker-image", self.image, "--name", self.name)
        sets = [a for k, v in self.helm_values().items() for a in ("--set", f"{k}={v}")]
        self._run(
            "helm", "install", "mi", str(self.root / "charts" / "matrixinfer"),
            "--kube-context", f"kind-{self.name}", "-n", self.namespace, "--create-namespace",
            *sets, "--wait", "--timeout", "5m",
        )  # fmt: skip
        self._forward = self._spawn(
            ["kubectl", "--context", f"kind-{self.name}", "-n", self.namespace, "port-forward",
             "svc/mi-matrixinfer-gateway", f"{self.local_port}:80"]
        )  # fmt: skip

    def deploy_model(self, model: str, replicas: int) -> None:
        self._kubectl("apply", "-f", "-", stdin=weights_job(model, self.image))
        self._kubectl("wait", "--for=condition=complete", f"job/{LOCAL_CLAIM}-{model}",
                      "--timeout=180s")  # fmt: skip
        self._models[model] = _Model(model, replicas)
        self._apply(self._models[model])

    def scale(self, model: str, replicas: int) -> None:
        m = self._model(model)
        m.replicas = replicas
        self._apply(m)

    def roll(self, model: str) -> None:
        m = self._model(model)
        m.revision += 1
        self._apply(m, replaced=frozenset(self.pod_ids(model)))

    def kill_pod(self, model: str) -> str:
        pod_id = self.pod_ids(model)[0]
        name = pod_id.split("/")[0]
        self._kubectl("delete", "pod", name, "--grace-period=0", "--force", "--wait=false")
        return pod_id

    def wait_replaced(self, model: str, replicas: int) -> None:
        _poll(lambda: len(self.pods(model)) == replicas, 180.0, f"{model}: {replicas} pods",
              self.poll_interval)  # fmt: skip

    def pods(self, model: str) -> list[str]:
        return sorted(i.split("/")[0] for i in self.pod_ids(model))

    def pod_ids(self, model: str) -> list[str]:
        """The model's ready entry pods (the ones that serve), as ``name/uid``."""
        selector = f"{LABEL_MODEL_INFER}={model}-{BACKEND},{LABEL_ENTRY}=true"
        out = self._kubectl("get", "pods", "-l", selector, "-o", "json")
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
            if self._models:  # while the operator runs: it removes the children and finalizers
                self._kubectl("delete", "model", *sorted(self._models), "--wait=true",
                              "--timeout=120s")  # fmt: skip
            self._run("helm", "uninstall", "mi", "--kube-context", f"kind-{self.name}",
                      "-n", self.namespace, "--wait")  # fmt: skip
        finally:
            self._run("kind", "delete", "cluster", "--name", self.name)

    # -- helpers
    def _model(self, model: str) -> _Model:
        if model not in self._models:
            raise ClusterError(f"model {model!r} is not deployed")
        return self._models[model]

    def _apply(self, m: _Model, replaced: frozenset[str] = frozenset()) -> None:
        """Apply the Model as it now is; until ``m.replicas`` ready pods, none of ``replaced``."""
        self._kubectl("apply", "-f", "-", stdin=local_model(m.name, m.replicas, m.revision,
                                                             self.image))  # fmt: skip

        def served() -> bool:
            ids = set(self.pod_ids(m.name))
            return len(ids) == m.replicas and not ids & replaced

        _poll(served, 300.0, f"{m.name}: {m.replicas} ready pods", self.poll_interval)


def _poll(check: Callable[[], bool], within: float, what: str, every: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(every)
