"""Small builders shared by the extproc tests (real crds objects from YAML text)."""

from __future__ import annotations

from typing import Any

import crds
from fleet.config import GatewayConfig, StaticEndpoint


def objects(text: str) -> list[Any]:
    return list(crds.load_documents(text, "test.yaml"))


def server_yaml(
    name: str,
    labels: dict[str, str],
    model: str | None = None,
    port: int = 8000,
    grpc_port: int | None = None,
) -> str:
    label_text = ", ".join(f"{k}: {v}" for k, v in labels.items())
    model_line = f"  model: {model}\n" if model else ""
    grpc = f", grpcPort: {grpc_port}" if grpc_port is not None else ""
    return (
        "apiVersion: networking.matrixinfer.ai/v1alpha1\nkind: ModelServer\n"
        f"metadata: {{name: {name}}}\nspec:\n{model_line}"
        f"  inferenceEngine: vLLM\n  workloadSelector: {{matchLabels: {{{label_text}}}}}\n"
        f"  workloadPort: {{port: {port}{grpc}}}\n"
    )


def config(text: str, endpoints: list[tuple[str, str, dict[str, str]]]) -> GatewayConfig:
    objs = objects(text)
    return GatewayConfig(
        routes=[o for o in objs if o.kind == "ModelRoute"],
        servers=[o for o in objs if o.kind == "ModelServer"],
        endpoints=[StaticEndpoint(n, a, labels) for n, a, labels in endpoints],
    )
