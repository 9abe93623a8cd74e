"""Rendering the chart offline (helm-python-sdk: Helm's own Go library, bundled in the wheel; no
helm binary or cluster) for the chart tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "matrixinfer"
RELEASE = "mi"
NAMESPACE = "matrixinfer"

# The documented values combinations (docs/install.md); each renders, lints and validates.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "one-namespace": {"watchNamespace": NAMESPACE},
    "policies-redis": {
        "extproc": {
            "policies": {
                "enabled": True,
                "apiKeysSecret": "matrixinfer-api-keys",
                "routeSecrets": [
                    {"namespace": "models", "name": "redis-auth"},
                    {"namespace": NAMESPACE, "name": "mi-redis"},
                ],
            },
            "autoscaling": {"enabled": True},
        },
        "redis": {"enabled": True},
    },
    "gateway-api-pool": {
        "envoy": {
            "mode": "gatewayAPI",
            "gatewayAPI": {"inferencePool": {"selector": {"app": "llama"}}},
        }
    },
    "gateway-api-service": {
        "envoy": {
            "mode": "gatewayAPI",
            "gatewayAPI": {
                "createGateway": False,
                "gatewayName": "inference-gateway",
                "inferencePool": {"enabled": False},
                "backendRef": {"name": "llama", "port": 8000},
            },
        }
    },
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
        }
    },
    "single-controller": {"controllers": {"replicas": 1, "leaderElection": {"enabled": False}}},
    "webhooks-operator": {
        "watchNamespace": NAMESPACE,
        "controllers": {"replicas": 1, "webhooks": {"configurations": "operator"}},
    },
    "console": {"console": {"enabled": True}},
    "webhooks-cert-manager": {"controllers": {"webhooks": {"certManager": {"enabled": True}}}},
}


def render(values: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    """template path -> rendered text."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        return chart.render(values, name=RELEASE, namespace=namespace, is_install=True)


def objects(values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the templates render (not the CRDs, which Helm installs from crds/)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(render(values, namespace).items()):
        if path.endswith(".txt"):
            continue
        out += [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def crds() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((CHART / "crds").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
