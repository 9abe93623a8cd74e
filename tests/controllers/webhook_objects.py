"""Small valid documents of the five kinds, for the admission tests."""

from __future__ import annotations

import copy
from typing import Any

from tests.controllers.fakecluster import make_object

NS = "ns"


def route(name: str = "r1", model: str = "llama", loras: list[str] | None = None,
          server: str = "ms1") -> dict[str, Any]:  # fmt: skip
    target = {"modelServerName": server}
    spec: dict[str, Any] = {"modelName": model, "rules": [{"targets": [target]}]}
    if loras:
        spec["loraAdapters"] = loras
    return {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def server(name: str = "ms1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"workload.matrixinfer.ai/model-infer": name}},
            "workloadPort": {"port": 8000},
            **spec,
        },
    }


def model(name: str = "m1", loras: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "backends": [{"name": "a", "type": "vLLM", "modelURI": "hf://org/model"}],
    }
    if loras:
        spec["loraAdapters"] = [{"name": n, "uri": f"hf://org/{n}"} for n in loras]
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def policy(name: str = "p1", target: str = "llama") -> dict[str, Any]:
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "AutoscalingPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "metrics": [{"name": "vllm:num_requests_waiting", "targetValue": 8}],
            "homogeneousTarget": {"targetRef": {"name": target}, "maxReplicas": 4},
        },
    }


def model_infer(name: str = "llama", partition: int = 0, roles: list[str] | None = None,
                live: int = 0) -> dict[str, Any]:  # fmt: skip
    obj = make_object(name=name)
    del obj["metadata"]["uid"]
    if roles is not None:
        base = obj["spec"]["template"]["roles"][1]
        obj["spec"]["template"]["roles"] = [{**copy.deepcopy(base), "name": r} for r in roles]
    if partition:
        obj["spec"]["rolloutStrategy"] = {"partition": partition}
    if live:
        obj["status"] = {"replicas": live}
    return obj
