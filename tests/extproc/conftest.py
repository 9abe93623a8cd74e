"""Shared, expensive fixtures for the gateway integration tests: one simulator fleet and one
gateway stack (extproc + Envoy) per test module, on loopback with free ports."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrixinfer.process import ReadinessTimeout, wait_until
from matrixinfer.stack import GatewayStack, StackOptions
from sim.fleet import Fleet
from tests.conftest import E2E_MESSAGE_TIMEOUT_MS, sim_fleet

BODY_LIMIT = 256 * 1024
SCRAPE_INTERVAL = 0.1
# bound for pods whose scrapes time out or fail with HTTP errors; a killed pod (connection
# refused) is marked not ready after one failed scrape (see test_fallback_retry.py for retries)
STALE_AFTER = 2.0

MODEL_YAML = """
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: pool}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  trafficPolicy:
    retry: {attempts: 2, retryOn: [connect-failure, refused-stream]}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: pinned-0}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {pod: sim-0}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: lora-pool}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
  scheduler:
    filters: [{name: ready}, {name: lora-capable}]
    scorers: [{name: lora-affinity, weight: 5}, {name: least-request, weight: 1}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: rewrite}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: noretry}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: sim}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: noretry}
spec:
  modelName: noretry-model
  rules: [{targets: [{modelServerName: noretry}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: left}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {pod: sim-2}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: right}
spec:
  model: demo-model
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {pod: sim-3}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {name: empty}
spec:
  inferenceEngine: vLLM
  workloadSelector: {matchLabels: {app: nothing}}
  workloadPort: {port: 8000}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: demo}
spec:
  modelName: demo-model
  rules:
  - name: pinned
    match: {headers: {x-pin: {exact: sim-0}}}
    targets: [{modelServerName: pinned-0}]
  - name: default
    targets: [{modelServerName: pool}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: loras}
spec:
  loraAdapters: [lora-a, lora-b]
  rules:
  - name: pinned
    match: {headers: {x-pin: {exact: sim-0}}}
    targets: [{modelServerName: pinned-0}]
  - name: default
    targets: [{modelServerName: lora-pool}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: alias}
spec:
  modelName: alias-model
  rules: [{targets: [{modelServerName: rewrite}]}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: split}
spec:
  modelName: split-model
  rules:
  - targets:
    - {modelServerName: left, weight: 30}
    - {modelServerName: right, weight: 70}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: strict}
spec:
  modelName: strict-model
  rules:
  - name: team-only
    match: {headers: {x-team: {exact: ml}}}
    targets: [{modelServerName: rewrite}]
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: nowhere}
spec:
  modelName: empty-model
  queue: {maxWait: 1s}  # no pod ever comes: the wait for one (scale from zero) ends after 1 s
  rules: [{targets: [{modelServerName: empty}]}]
"""


def endpoints_yaml(fleet: Fleet) -> str:
    lines = [
        "apiVersion: gateway.matrixinfer.ai/v1alpha1",
        "kind: Endpoints",
        "metadata: {name: sims}",
        "spec:",
        "  endpoints:",
    ]
    for pod in fleet.pods:
        lines.append(
            f"  - {{name: {pod.name}, address: '{pod.address}', "
            f"labels: {{app: sim, pod: {pod.name}}}}}"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with sim_fleet(
        tmp_path_factory, "127.0.0.60", 4,
        "--time-scale", "0.02", "--max-loras", "2", "--lora-modules", "lora-a=/l/a", "lora-b=/l/b",
        logs="sims",
    ) as f:  # fmt: skip
        yield f


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory: pytest.TempPathFactory, fleet: Fleet) -> Path:
    d = tmp_path_factory.mktemp("gateway-config")
    (d / "model.yaml").write_text(MODEL_YAML)
    (d / "sims.yaml").write_text(endpoints_yaml(fleet))
    return d


def start_stack(config_dir: Path, run_dir: Path, fleet: Fleet, **options: Any) -> GatewayStack:
    settings: dict[str, Any] = {
        "body_limit": BODY_LIMIT,
        "scrape_interval": SCRAPE_INTERVAL,
        "config_poll": 0.1,
        "access_log": True,
        "envoy_concurrency": 1,
        "extra_extproc_args": ("--stale-after", str(STALE_AFTER)),
        "message_timeout_ms": E2E_MESSAGE_TIMEOUT_MS,
    }
    opts = StackOptions(**(settings | options))
    stack = GatewayStack(config_dir, run_dir, opts).start()
    try:
        addresses = {p.address for p in fleet.pods}
        wait_until(
            lambda: stack.extproc_ready() and addresses <= stack.envoy_hosts(),
            60,
            "gateway config applied and pods known to Envoy",
        )
    except ReadinessTimeout as exc:
        stack.stop()
        raise ReadinessTimeout(f"{exc}; extproc log:\n{stack.extproc.log_tail(20)}") from None
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, config_dir: Path, fleet: Fleet
) -> Iterator[GatewayStack]:
    s = start_stack(config_dir, tmp_path_factory.mktemp("gateway-run"), fleet)
    try:
        yield s
    finally:
        s.stop()


def debug_state(stack: GatewayStack) -> dict[str, Any]:
    return stack.state()


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data
