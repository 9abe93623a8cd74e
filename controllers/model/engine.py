"""The engine's command and arguments from a backend's `type`, `args` and `config`, the path of
its weights and whether the Model has LoRA adapters (pure; the pod around it: ``pod.py``).

The rules (docs/model.md, "The engine container"):

- vLLM / vLLMDisaggregated: ``vllm serve <weights> --host 0.0.0.0 --port <port>
  --served-model-name <Model name> [--enable-lora] [kv transfer] [config] [args]``;
- SGLang: ``python3 -m sglang.launch_server --model-path <weights> --host 0.0.0.0 --port <port>
  --served-model-name <Model name> [multi-node] [--enable-lora] [config] [args]``;
- ``config`` renders as ``--key value`` (true: ``--key``; false and null: left out; a list:
  ``--key v1 v2``; a map: ``--key '<json>'``), then ``args`` verbatim: the user's arguments come
  last, so they win where the engine takes the last value;
- a backend's ``command`` replaces all of that: the engine runs ``command`` [config] [args], and
  :func:`engine_env` names the weights, the served name and the port for ``$(VAR)`` in ``args``;
- ``<weights>`` is a local path: the downloader init container put them there (hf://, s3://) or
  they are mounted (pvc://, file://); LoRA adapters are loaded at run time by the runtime
  sidecar through the engine's API, so the engine only enables LoRA.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from crds.registry import Backend, BackendWorker

DIST_INIT_PORT = 5000  # SGLang multi-node rendezvous on the entry pod

DEFAULT_IMAGES: Mapping[str, str] = {
    "vLLM": "vllm/vllm-openai:v0.8.5",
    "vLLMDisaggregated": "vllm/vllm-openai:v0.8.5",
    "SGLang": "lmsysorg/sglang:v0.4.6",
}
"""The engine image when a backend sets none."""

PD_KV_TRANSFER = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
"""vLLM's KV transfer config on prefill and decode pods of a vLLMDisaggregated backend."""

PD_CONNECTOR = "nixl"
"""The ModelServer's ``kvConnector.type`` and the PD proxy's ``--connector`` for that config."""


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


ENV_MODEL_PATH = "MATRIXINFER_MODEL_PATH"
ENV_SERVED_MODEL_NAME = "MATRIXINFER_SERVED_MODEL_NAME"
ENV_PORT = "MATRIXINFER_PORT"


def engine_env(backend: Backend, served_name: str, weights: str, port: int) -> list[dict[str, str]]:
    """What :func:`engine_args` would have derived, as env of the engine container of a backend
    with its own ``command`` (for ``$(VAR)`` in its ``args``); none for the types' commands."""
    if not backend.command:
        return []
    return [
        {"name": ENV_MODEL_PATH, "value": weights},
        {"name": ENV_SERVED_MODEL_NAME, "value": served_name},
        {"name": ENV_PORT, "value": str(port)},
    ]


def _sets(flag: str, args: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def engine_args(
    backend: Backend,
    worker: BackendWorker,
    served_name: str,
    weights: str,
    port: int,
    *,
    lora: bool,
) -> tuple[list[str], list[str]]:
    """(command, args) of the engine container of one role of ``backend``, reading the weights
    at ``weights`` and listening on ``port``; ``lora``: the Model has adapters to load."""
    user = config_args(backend.config) + list(backend.args or [])
    if backend.command:  # the user's engine: nothing derived (engine_env says it instead)
        return list(backend.command), user
    common = ["--host", "0.0.0.0", "--port", str(port), "--served-model-name", served_name]
    enable_lora = ["--enable-lora"] if lora and not _sets("--enable-lora", user) else []
    if backend.type == "SGLang":
        command = ["python3", "-m", "sglang.launch_server"]
        args = ["--model-path", weights, *common]
        if worker.pods > 1:  # one engine over the role instance's pods; rank = WORKER_INDEX
            args += [
                "--nnodes",
                str(worker.pods),
                "--node-rank",
                "$(WORKER_INDEX)",
                "--dist-init-addr",
                f"$(ENTRY_ADDRESS):{DIST_INIT_PORT}",
            ]
        return command, args + enable_lora + user
    command = ["vllm", "serve"]
    args = [weights, *common, *enable_lora]
    pd = backend.type == "vLLMDisaggregated" and worker.type in ("prefill", "decode")
    if pd and not _sets("--kv-transfer-config", user):
        args += ["--kv-transfer-config", json.dumps(PD_KV_TRANSFER, separators=(",", ":"))]
    return command, args + user
