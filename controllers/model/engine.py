"""The engine container of a backend: command and arguments from the backend's `type`, `args`,
`config`, `modelURI` and the Model's LoRA adapters; volumes for weights on a PVC or the host.

Pure functions over the API's models. The rules (docs/model.md, "The engine container"):

- vLLM / vLLMDisaggregated: ``vllm serve <model> --host 0.0.0.0 --port 8000
  --served-model-name <Model name> [LoRA] [config] [args]``;
- SGLang: ``python3 -m sglang.launch_server --model-path <model> --host 0.0.0.0 --port 8000
  --served-model-name <Model name> [multi-node] [LoRA] [config] [args]``;
- ``config`` renders as ``--key value`` (true: ``--key``; false and null: left out; a list:
  ``--key v1 v2``; a map: ``--key '<json>'``), then ``args`` verbatim: the user's arguments come
  last, so they win where the engine takes the last value;
- where the weights are (``modelURI``): ``hf://org/name`` → ``org/name`` (the engine downloads
  it from the Hub, honouring ``HF_TOKEN`` / ``HF_ENDPOINT`` from ``env``); ``s3://bucket/path`` →
  passed as is (vLLM streams it with ``--load-format runai_streamer`` unless the user sets a load
  format); ``pvc://claim/path`` → the claim mounted read-only at ``/mnt/model``, the engine reads
  ``/mnt/model/path``; ``file:///dir`` → a hostPath volume of ``/dir`` at ``/mnt/model``.
  LoRA adapters follow the same rules under ``/mnt/lora/<n>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crds.registry import Backend, BackendWorker, LoraAdapter

ENGINE_PORT = 8000
MODEL_MOUNT = "/mnt/model"
LORA_MOUNT = "/mnt/lora"
CACHE_MOUNT = "/var/cache/matrixinfer"
DIST_INIT_PORT = 5000  # SGLang multi-node rendezvous on the entry pod

DEFAULT_IMAGES: Mapping[str, str] = {
    "vLLM": "vllm/vllm-openai:v0.8.5",
    "vLLMDisaggregated": "vllm/vllm-openai:v0.8.5",
    "SGLang": "lmsysorg/sglang:v0.4.6",
}
"""The engine image when a backend sets none."""

PD_KV_TRANSFER = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
"""vLLM's KV transfer config on prefill and decode pods of a vLLMDisaggregated backend."""


@dataclass(slots=True)
class Storage:
    """Volumes and mounts the engine container needs, collected while rendering paths."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, source: dict[str, Any], mount_path: str, read_only: bool) -> None:
        self.volumes.append({"name": name, **source})
        mount: dict[str, Any] = {"name": name, "mountPath": mount_path}
        if read_only:
            mount["readOnly"] = True
        self.mounts.append(mount)


def _split(uri: str) -> tuple[str, str]:
    scheme, _, rest = uri.partition("://")
    return scheme, rest


def weights_path(uri: str, volume: str, mount: str, storage: Storage) -> str:
    """What the engine is given for weights at ``uri``; adds a volume for pvc:// and file://."""
    scheme, rest = _split(uri)
    if scheme == "hf":
        return rest
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        storage.add(
            volume,
            {"persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            mount,
            read_only=True,
        )
        return f"{mount}/{sub}".rstrip("/") if sub else mount
    if scheme == "file":
        storage.add(volume, {"hostPath": {"path": "/" + rest.lstrip("/")}}, mount, True)
        return mount
    return uri  # s3:// and anything the engine understands itself


def cache_volume(cache_uri: str | None, storage: Storage) -> None:
    """The download cache: a PVC (sub-path), a host directory, or an emptyDir."""
    if cache_uri is None:
        storage.add("cache", {"emptyDir": {}}, CACHE_MOUNT, read_only=False)
        return
    scheme, rest = _split(cache_uri)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        storage.add("cache", {"persistentVolumeClaim": {"claimName": claim}}, CACHE_MOUNT, False)
        if sub:
            storage.mounts[-1]["subPath"] = sub
    else:  # hostpath:///dir
        storage.add(
            "cache",
            {"hostPath": {"path": "/" + rest.lstrip("/"), "type": "DirectoryOrCreate"}},
            CACHE_MOUNT,
            False,
        )


def config_args(config: Mapping[str, Any] | None) -> list[str]:
    """``config`` as command-line flags, in the order given."""
    out: list[str] = []
    for key, value in (config or {}).items():
        flag = key if key.startswith("-") else f"--{key}"
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"), sort_keys=True)]
        else:
            out += [flag, str(value)]
    return out


def _sets(flag: str, args: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def engine_args(
    backend: Backend,
    worker: BackendWorker,
    served_name: str,
    adapters: list[LoraAdapter],
    storage: Storage,
) -> tuple[list[str], list[str]]:
    """(command, args) of the engine container of one role of ``backend``."""
    model = weights_path(backend.model_uri, "model", MODEL_MOUNT, storage)
    user = config_args(backend.config) + list(backend.args or [])
    common = ["--host", "0.0.0.0", "--port", str(ENGINE_PORT), "--served-model-name", served_name]
    lora: list[str] = []
    for i, a in enumerate(adapters):
        path = weights_path(a.uri, f"lora-{i}", f"{LORA_MOUNT}/{i}", storage)
        lora.append(f"{a.name}={path}")
    if backend.type == "SGLang":
        command = ["python3", "-m", "sglang.launch_server"]
        args = ["--model-path", model, *common]
        if worker.pods > 1:  # one engine over the role instance's pods; rank = WORKER_INDEX
            args += [
                "--nnodes",
                str(worker.pods),
                "--node-rank",
                "$(WORKER_INDEX)",
                "--dist-init-addr",
                f"$(ENTRY_ADDRESS):{DIST_INIT_PORT}",
            ]
        if lora:
            args += ["--lora-paths", *lora]
        return command, args + user
    command = ["vllm", "serve"]
    args = [model, *common]
    if backend.model_uri.startswith("s3://") and not _sets("--load-format", user):
        args += ["--load-format", "runai_streamer"]
    if lora:
        args += ["--enable-lora", "--lora-modules", *lora]
    pd = backend.type == "vLLMDisaggregated" and worker.type in ("prefill", "decode")
    if pd and not _sets("--kv-transfer-config", user):
        args += ["--kv-transfer-config", json.dumps(PD_KV_TRANSFER, separators=(",", ":"))]
    return command, args + user
