"""The pod of one role of a backend: the engine and what MatrixInfer runs beside it (pure).

Every pod of a generated ModelInfer (docs/model.md, "The pod"):

- init container ``download``: ``matrixinfer-downloader <modelURI>`` into the ``cache`` volume
  (hf://, s3://), or a check that a pvc:// or file:// path is there;
- container ``engine``: reads the weights where the downloader left them
  (:func:`fleet.artefacts.artefact_path`: ``/var/cache/matrixinfer/hf/org/name/main``,
  ``/mnt/pvc/<claim>/<path>``, ...);

and entry pods (the ones that serve HTTP) also:

- container ``runtime``: ``matrixinfer-runtime`` beside the engine: the pod's readiness
  (``/ready``: the engine healthy and the Model's LoRA adapters loaded), the adapters (the file
  of the ConfigMap ``<model>-lora-adapters``, which follows the Model: the sidecar re-reads it,
  so a changed list is loaded without a new pod) and the unified ``/metrics`` on port
  ``runtime`` (8100);
- container ``pd-proxy`` on the decode pods of a vLLMDisaggregated backend:
  ``matrixinfer-pd-proxy`` holds the serving port 8000 (the ModelServer's ``workloadPort``, so
  the gateway sends requests to it) and the decode engine moves to 8001 (docs/pd.md).

The three MatrixInfer programs run from one image (``--runtime-image`` of the controllers).
Credentials (``HF_TOKEN``, ``AWS_*``) and endpoints (``HF_ENDPOINT``, ``AWS_ENDPOINT_URL``) come
from the backend's ``env``, which the downloader and the sidecar get as the engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from controllers.model.engine import DEFAULT_IMAGES, PD_CONNECTOR, engine_args, engine_env
from crds.registry import Backend, BackendWorker, LoraAdapter
from fleet.artefacts import Uri, artefact_path, parse_uri
from fleet.service import version

__all__ = [
    "ADAPTERS_FILE",
    "ADAPTERS_KEY",
    "CACHE_MOUNT",
    "DEFAULT_RUNTIME_IMAGE",
    "PD_ENGINE_PORT",
    "PVC_ROOT",
    "RUNTIME_PORT",
    "SERVE_PORT",
    "adapters_config_name",
    "adapters_file",
    "check_cache_uri",
    "check_mountable",
    "pod_template",
]

SERVE_PORT = 8000
"""The port the gateway reaches on an entry pod (the ModelServer's ``workloadPort``): the
engine's, or the PD proxy's on decode pods."""
PD_ENGINE_PORT = 8001
"""The decode engine's port behind its PD proxy."""
RUNTIME_PORT = 8100
"""The runtime sidecar's port (``/ready``, ``/metrics``, ``/v1/lora_adapters``)."""
CACHE_MOUNT = "/var/cache/matrixinfer"
PVC_ROOT = "/mnt/pvc"
"""``pvc://claim/...`` artefacts: the claim is mounted read-only at ``/mnt/pvc/<claim>``."""
ADAPTERS_DIR = "/etc/matrixinfer/lora"
ADAPTERS_KEY = "adapters.yaml"
ADAPTERS_FILE = f"{ADAPTERS_DIR}/{ADAPTERS_KEY}"
RUNTIME_GID = 10001
"""The MatrixInfer image's user and group: a PVC cache is made writable for it (fsGroup)."""

DEFAULT_RUNTIME_IMAGE = f"ghcr.io/matrixinfer/matrixinfer:{version()}"
"""The image of the downloader, the sidecar and the PD proxy when none is configured."""

_ENGINE_KIND = {"vLLM": "vllm", "vLLMDisaggregated": "vllm", "SGLang": "sglang"}


def _runtime_resources() -> dict[str, Any]:
    """Requests of each MatrixInfer container (no limits: a download may need more for a
    while)."""
    return {"requests": {"cpu": "100m", "memory": "128Mi"}}


def adapters_config_name(model: str) -> str:
    """The ConfigMap holding a Model's ``loraAdapters`` (the sidecars' adapters file)."""
    return f"{model}-lora-adapters"


def adapters_file(adapters: Sequence[LoraAdapter]) -> dict[str, str]:
    """That ConfigMap's ``data``: the adapters file ``matrixinfer-runtime --lora-adapters``
    reads (a YAML list of ``{name, uri}``)."""
    listed = [{"name": a.name, "uri": a.uri} for a in adapters]
    return {ADAPTERS_KEY: yaml.safe_dump(listed, sort_keys=False)}


def check_mountable(uri: Uri) -> None:
    """ValueError when a file:// path cannot be mounted at its own path: the root, or a path
    on or under (or above) the pod's own mounts (the cache, the claims, the adapters file)."""
    if uri.scheme != "file":
        return
    path = PurePosixPath(uri.path)
    if path == PurePosixPath("/"):
        raise ValueError(f"{uri.text!r}: cannot mount the root directory")
    for ours in (CACHE_MOUNT, PVC_ROOT, ADAPTERS_DIR):
        mine = PurePosixPath(ours)
        if path == mine or mine in path.parents or path in mine.parents:
            raise ValueError(f"{uri.text!r}: overlaps {ours}, where the pod mounts its own files")


def check_cache_uri(text: str) -> None:
    """ValueError unless ``text`` is ``pvc://claim[/sub]`` or ``hostpath:///dir``."""
    scheme, _, rest = text.partition("://")
    if scheme == "pvc" and rest.partition("/")[0]:
        return
    if scheme == "hostpath" and rest.startswith("/") and rest.strip("/"):
        return
    raise ValueError(f"{text!r}: expected pvc://claim[/path] or hostpath:///dir")


@dataclass(slots=True)
class _Volumes:
    """The pod's volumes, and the mounts each container gets, collected once per pod."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)  # the cache mount
    artefacts: list[dict[str, Any]] = field(default_factory=list)  # pvc:// and file:// mounts
    _by_source: dict[str, str] = field(default_factory=dict)  # claim / host path -> volume

    def add_cache(self, cache_uri: str | None) -> None:
        mount: dict[str, Any] = {"name": "cache", "mountPath": CACHE_MOUNT}
        if cache_uri is None:
            self.volumes.append({"name": "cache", "emptyDir": {}})
        else:
            scheme, _, rest = cache_uri.partition("://")
            if scheme == "pvc":
                claim, _, sub = rest.partition("/")
                self.volumes.append(
                    {"name": "cache", "persistentVolumeClaim": {"claimName": claim}}
                )
                if sub.strip("/"):
                    mount["subPath"] = sub.strip("/")
            else:
                path = "/" + rest.strip("/")
                self.volumes.append(
                    {"name": "cache", "hostPath": {"path": path, "type": "DirectoryOrCreate"}}
                )
        self.cache.append(mount)

    def add_artefact(self, uri: Uri) -> None:
        """A read-only volume for a pvc:// claim (at ``/mnt/pvc/<claim>``) or a file:// path
        (the host's path at the same path); hf:// and s3:// need none (the cache)."""
        if uri.scheme == "pvc":
            key, prefix = f"pvc:{uri.location}", "pvc"
            source: dict[str, Any] = {
                "persistentVolumeClaim": {"claimName": uri.location, "readOnly": True}
            }
            mount_path = f"{PVC_ROOT}/{uri.location}"
        elif uri.scheme == "file":
            key, prefix = f"file:{uri.path}", "host"
            source = {"hostPath": {"path": uri.path}}
            mount_path = uri.path
        else:
            return
        if key in self._by_source:
            return
        name = f"{prefix}-{sum(1 for k in self._by_source if k.startswith(prefix))}"
        self._by_source[key] = name
        self.volumes.append({"name": name, **source})
        self.artefacts.append({"name": name, "mountPath": mount_path, "readOnly": True})

    def mounts(self) -> list[dict[str, Any]]:
        return [*self.cache, *self.artefacts]


def _path(uri: Uri) -> str:
    return str(artefact_path(uri, PurePosixPath(CACHE_MOUNT), PurePosixPath(PVC_ROOT)))


def _env(backend: Backend) -> list[dict[str, Any]]:
    return [dict(e) for e in backend.env or []]


def _with(env: list[dict[str, Any]], name: str, value: str) -> list[dict[str, Any]]:
    """``env`` plus ``name=value`` unless the user sets ``name``."""
    if any(e.get("name") == name for e in env):
        return env
    return [*env, {"name": name, "value": value}]


def _probe(path: str, port: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": 5}


def pod_template(
    served_name: str,
    backend: Backend,
    worker: BackendWorker,
    adapters: Sequence[LoraAdapter],
    *,
    entry: bool,
    runtime_image: str,
) -> dict[str, Any]:
    """The pod template of one role of ``backend`` (``entry``: the pod that serves HTTP; worker
    pods join its engine and get neither the sidecar nor a port). URIs must be valid
    (:func:`fleet.artefacts.parse_uri`); the planner reports bad ones before calling this."""
    model_uri = parse_uri(backend.model_uri)
    adapter_uris = [parse_uri(a.uri) for a in adapters]
    vols = _Volumes()
    vols.add_cache(backend.cache_uri)
    for uri in (model_uri, *adapter_uris):
        vols.add_artefact(uri)
    decode = backend.type == "vLLMDisaggregated" and worker.type == "decode"
    engine_port = PD_ENGINE_PORT if decode else SERVE_PORT
    kind = _ENGINE_KIND[backend.type]

    command, args = engine_args(
        backend, worker, served_name, _path(model_uri), engine_port, lora=bool(adapters)
    )
    env = _with(_env(backend), "HF_HOME", CACHE_MOUNT)
    for var in engine_env(backend, served_name, _path(model_uri), engine_port):
        env = _with(env, var["name"], var["value"])
    if adapters and kind == "vllm":  # the sidecar loads adapters through vLLM's API
        env = _with(env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    engine: dict[str, Any] = {
        "name": "engine",
        "image": backend.image or DEFAULT_IMAGES[backend.type],
        "command": command,
        "args": args,
        "env": env,
        "volumeMounts": vols.mounts(),
    }
    if entry:
        name = "engine" if decode else "http"
        engine["ports"] = [{"name": name, "containerPort": engine_port, "protocol": "TCP"}]
    resources = worker.resources if worker.resources is not None else backend.resources
    if resources is not None:
        engine["resources"] = dict(resources)

    download: dict[str, Any] = {
        "name": "download",
        "image": runtime_image,
        "command": ["matrixinfer-downloader"],
        "args": [backend.model_uri, "--cache", CACHE_MOUNT, "--pvc-root", PVC_ROOT],
        "volumeMounts": vols.mounts(),
        "resources": _runtime_resources(),
    }
    if backend.env:
        download["env"] = _env(backend)
    containers = [engine]
    annotations = {"kubectl.kubernetes.io/default-container": "engine"}
    if entry:
        runtime_args = [
            "--engine", kind,
            "--engine-url", f"http://127.0.0.1:{engine_port}",
            "--port", str(RUNTIME_PORT),
            "--cache", CACHE_MOUNT,
            "--pvc-root", PVC_ROOT,
        ]  # fmt: skip
        runtime_mounts = vols.mounts()
        if adapters:
            runtime_args += ["--lora-adapters", ADAPTERS_FILE]
            runtime_mounts.append(
                {"name": "lora-adapters", "mountPath": ADAPTERS_DIR, "readOnly": True}
            )
            vols.volumes.append(
                {"name": "lora-adapters", "configMap": {"name": adapters_config_name(served_name)}}
            )
        runtime: dict[str, Any] = {
            "name": "runtime",
            "image": runtime_image,
            "command": ["matrixinfer-runtime"],
            "args": runtime_args,
            "ports": [{"name": "runtime", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
            "readinessProbe": _probe("/ready", RUNTIME_PORT),
            "volumeMounts": runtime_mounts,
            "resources": _runtime_resources(),
        }
        if backend.env:
            runtime["env"] = _env(backend)
        containers.append(runtime)
    if entry and decode:
        proxy_args = ["--engine", f"http://127.0.0.1:{PD_ENGINE_PORT}", "--port", str(SERVE_PORT)]
        containers.append(
            {
                "name": "pd-proxy",
                "image": runtime_image,
                "command": ["matrixinfer-pd-proxy"],
                "args": [*proxy_args, "--connector", PD_CONNECTOR],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                ],
                "ports": [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}],
                "readinessProbe": _probe("/health", SERVE_PORT),
                "resources": _runtime_resources(),
            }
        )
    spec: dict[str, Any] = {
        "initContainers": [download],
        "containers": containers,
        "volumes": vols.volumes,
    }
    if backend.cache_uri is not None and backend.cache_uri.startswith("pvc://"):
        spec["securityContext"] = {
            "fsGroup": RUNTIME_GID,
            "fsGroupChangePolicy": "OnRootMismatch",
        }
    return {"metadata": {"annotations": annotations}, "spec": spec}
