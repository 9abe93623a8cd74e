"""The gateway stack: the extproc (one process, or several behind Envoy's least-request ext_proc
cluster), the xDS server and one Envoy in front of a configuration directory.

Used by ``matrixinfer demo``, ``matrixinfer gateway``, the integration tests and the benchmark.
Children are started through :mod:`matrixinfer.process` (own process group, log file, readiness
polled with a deadline, SIGTERM then SIGKILL).
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.service import format_duration
from matrixinfer.envoy_config import AdsBootstrap, render_ads_bootstrap
from matrixinfer.process import Child, envoy_child, free_port, http_ok

__all__ = ["GatewayStack", "StackOptions"]

EDS_CLUSTER = "matrixinfer_pods"


@dataclass(slots=True)
class StackOptions:
    listen_host: str = "127.0.0.1"
    listen_port: int | None = None  # None: a free port
    body_mode: str = "BUFFERED"
    body_limit: int = 10 * 1024 * 1024
    fail_open: bool = False
    # ext_proc wait per reply outside the queue; None: the generator's GatewaySettings default
    # (queued requests are extended by the extproc up to the derived max_message_timeout)
    message_timeout_ms: int | None = None
    scrape_interval: float = 0.2
    # slow clients (docs/gateway.md "Timeouts for slow clients"), seconds; None: matrixinfer-xds's
    # defaults (10s, 30s; 5m for a routed request's answer)
    request_headers_timeout: float | None = None
    request_body_idle_timeout: float | None = None
    stream_idle_timeout: float | None = None
    config_poll: float = 1.0
    # None: ModelServers, ModelRoutes and pods come from the configuration directory; a URL: from
    # that Kubernetes API server (the local cluster's, matrixinfer/localcluster.py), watched
    kube_server: str | None = None
    retries: int = 2
    access_log: bool = False
    access_log_format: str = "text"  # text | json (docs/gateway.md "Access log")
    extproc_log_level: str = "info"
    envoy_log_level: str = "warn"
    envoy_concurrency: int = 2
    extra_extproc_args: Sequence[str] = field(default_factory=tuple)
    extra_xds_args: Sequence[str] = field(default_factory=tuple)  # e.g. --no-policy-filters
    transport: str = "h2"  # extproc's ext_proc server: h2 (hand-written) or grpc (grpc.aio)
    # extproc processes (replicas) behind Envoy's ext_proc cluster; each keeps its own in-flight
    # counts, prefix index, queue and local buckets (docs/gateway.md "Several extproc processes")
    extproc_processes: int = 1
    # the extproc processes' HTTP (/metrics) ports, chosen before the stack starts (the local
    # cluster's autoscaler reads them, docs/autoscaling.md); empty: free ports
    http_ports: Sequence[int] = field(default_factory=tuple)
    # policies (docs/policies.md), passed to every extproc process as matrixinfer-extproc's flags
    # of the same names; any of them turns the policies and Envoy's usage-accounting filters on
    policies: bool = False
    auth_config: Path | None = None
    policy_config: Path | None = None
    ratelimit_fail: str | None = None  # open | closed; None: the extproc's default (open)
    redis_password_file: Path | None = None
    redis_headroom: float | None = None
    # tracing (docs/gateway.md "Tracing"): "host:port" of an OTLP/gRPC collector; Envoy traces
    # (matrixinfer-xds --tracing-collector) and every extproc process (--tracing, with
    # OTEL_EXPORTER_OTLP_ENDPOINT pointing there; other OTEL_* variables are inherited)
    tracing_collector: str | None = None

    def policy_args(self) -> list[str]:
        """The extproc flags for the policy fields set here."""
        out = ["--policies"] if self.policies else []
        for flag, value in (
            ("--auth-config", self.auth_config),
            ("--policy-config", self.policy_config),
            ("--ratelimit-fail", self.ratelimit_fail),
            ("--redis-password-file", self.redis_password_file),
            ("--redis-headroom", self.redis_headroom),
        ):
            if value is not None:
                out += [flag, str(value)]
        return out

    def extproc_args(self) -> list[str]:
        return [*self.policy_args(), *self.extra_extproc_args]


def _policies_on(extproc_args: Sequence[str]) -> bool:
    return any(
        a == "--policies" or a.startswith(("--auth-config", "--policy-config"))
        for a in extproc_args
    )


class GatewayStack:
    def __init__(
        self, config_dir: Path | str, run_dir: Path | str, options: StackOptions | None = None
    ):
        self.config_dir = Path(config_dir)
        self.run_dir = Path(run_dir)
        self.options = options or StackOptions()
        o = self.options
        self.listen_port = o.listen_port or free_port(o.listen_host)
        self.admin_port = free_port()
        if o.extproc_processes < 1:
            raise ValueError(f"extproc_processes must be >= 1, got {o.extproc_processes}")
        self.grpc_ports = [free_port() for _ in range(o.extproc_processes)]
        if o.http_ports and len(o.http_ports) != o.extproc_processes:
            raise ValueError(
                f"http_ports has {len(o.http_ports)} ports for {o.extproc_processes} extproc"
                " processes"
            )
        self.http_ports = list(o.http_ports) or [free_port() for _ in range(o.extproc_processes)]
        self.grpc_port, self.http_port = self.grpc_ports[0], self.http_ports[0]
        self.xds_port = free_port()
        self.xds_http_port = free_port()
        self.bootstrap_path = self.run_dir / "envoy.yaml"
        # one key signs the charges every extproc process hands out (any of them settles a usage
        # report, whichever process Envoy's access-log stream reaches)
        own_key = _policies_on(o.extproc_args()) and not any(
            a.startswith("--charge-key-file") for a in o.extra_extproc_args
        )
        self.charge_key_path = self.run_dir / "charge.key" if own_key else None
        self.extprocs = [
            self._extproc_child(i, grpc, http)
            for i, (grpc, http) in enumerate(zip(self.grpc_ports, self.http_ports, strict=True))
        ]
        self.extproc = self.extprocs[0]
        # the ADS server (controllers/xds) serves Envoy's listener, routes, clusters and the pods'
        # endpoints, generated from the same configuration directory
        self.xds = Child(
            "xds",
            [
                sys.executable,
                "-m",
                "controllers.xds.main",
                *self._source_args(),
                "--port",
                str(self.xds_port),
                "--http-port",
                str(self.xds_http_port),
                *(a for port in self.grpc_ports for a in ("--extproc", f"127.0.0.1:{port}")),
                "--listen-host",
                o.listen_host,
                "--listen-port",
                str(self.listen_port),
                "--body-mode",
                o.body_mode,
                "--body-limit",
                str(o.body_limit),
                *(
                    ["--message-timeout", f"{o.message_timeout_ms}ms"]
                    if o.message_timeout_ms is not None
                    else []
                ),
                "--retries",
                str(o.retries),
                *(
                    a
                    for flag, value in (
                        ("--request-headers-timeout", o.request_headers_timeout),
                        ("--request-body-idle-timeout", o.request_body_idle_timeout),
                        ("--stream-idle-timeout", o.stream_idle_timeout),
                    )
                    if value is not None
                    for a in (flag, format_duration(value))
                ),
                *(["--fail-open"] if o.fail_open else []),
                *(["--tracing-collector", o.tracing_collector] if o.tracing_collector else []),
                *(
                    ["--access-log", "--access-log-format", o.access_log_format]
                    if o.access_log
                    else []
                ),
                "--log-level",
                o.extproc_log_level,
                *o.extra_xds_args,
            ],
            log_path=self.run_dir / "xds.log",
            ready=lambda: http_ok(f"{self.xds_url}/healthz"),
            ready_timeout=30,
        )
        self.envoy = envoy_child(
            "envoy",
            self.bootstrap_path,
            self.admin_port,
            self.run_dir / "envoy.log",
            concurrency=o.envoy_concurrency,
            log_level=o.envoy_log_level,
            ready_timeout=30,
        )

    def _source_args(self) -> list[str]:
        """Where the extproc and the xDS server read the configuration from."""
        o = self.options
        if o.kube_server is not None:
            return ["--source", "kubernetes", "--server", o.kube_server]
        return ["--config", str(self.config_dir), "--config-poll", format_duration(o.config_poll)]

    def _extproc_child(self, index: int, grpc_port: int, http_port: int) -> Child:
        o = self.options
        suffix = "" if index == 0 else f"-{index}"
        return Child(
            f"extproc{suffix}",
            [
                sys.executable,
                "-m",
                "extproc.main",
                *self._source_args(),
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--body-mode",
                o.body_mode,
                "--body-limit",
                str(o.body_limit),
                "--scrape-interval",
                format_duration(o.scrape_interval),
                "--log-level",
                o.extproc_log_level,
                "--transport",
                o.transport,
                # the local stack reads /debug/state (matrixinfer gateway's reload messages)
                "--debug-state",
                *(
                    ["--charge-key-file", str(self.charge_key_path)]
                    if self.charge_key_path is not None
                    else []
                ),
                *o.extproc_args(),
                *(["--tracing"] if o.tracing_collector else []),
            ],
            env=(
                {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{o.tracing_collector}"}
                if o.tracing_collector
                else None
            ),
            log_path=self.run_dir / f"extproc{suffix}.log",
            ready=lambda: http_ok(f"http://127.0.0.1:{http_port}/healthz"),
            ready_timeout=30,
        )

    # ---- addresses ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the OpenAI API through Envoy, e.g. http://127.0.0.1:8080/v1."""
        return f"http://{self.options.listen_host}:{self.listen_port}/v1"

    @property
    def extproc_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def xds_url(self) -> str:
        return f"http://127.0.0.1:{self.xds_http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    # ---- lifecycle ----------------------------------------------------------------------------
    def write_bootstrap(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.bootstrap_path.write_text(
            render_ads_bootstrap(AdsBootstrap(admin_port=self.admin_port, xds_port=self.xds_port))
        )

    def start(self) -> GatewayStack:
        self.write_bootstrap()
        if self.charge_key_path is not None and not self.charge_key_path.exists():
            self.charge_key_path.touch(mode=0o600)
            self.charge_key_path.write_text(secrets.token_hex(32) + "\n")
        try:
            for child in self.extprocs:
                child.start()
            self.xds.start()
            self.envoy.start()
        except BaseException:
            self.stop()
            raise
        return self

    def drain(self, timeout: float) -> bool:
        """Envoy stops taking new requests (admin ``POST /drain_listeners?graceful``: every new
        request is told to close its connection, then the listeners close) while the requests in
        flight, streams included, finish; returns once none is left (True) or after ``timeout``
        seconds (False). Call before :meth:`stop`."""
        if not self.envoy.running():
            return True
        try:
            # connections open now are told to close after their request; the listeners close
            _admin_post(f"{self.admin_url}/drain_listeners?graceful")
            _admin_post(f"{self.admin_url}/drain_listeners")
        except (urllib.error.URLError, OSError):
            return False
        deadline = time.monotonic() + timeout
        while True:
            active = self.active_requests()
            if active == 0:
                return True
            if time.monotonic() >= deadline or active is None:
                return False
            time.sleep(0.05)

    def active_requests(self) -> int | None:
        """Requests in flight on Envoy's listeners (``http.<prefix>.downstream_rq_active`` summed
        over every HTTP connection manager but the admin's own); None when Envoy does not answer."""
        url = f"{self.admin_url}/stats?filter=downstream_rq_active$&format=json"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                stats = json.loads(resp.read()).get("stats", [])
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return sum(
            int(s.get("value", 0))
            for s in stats
            if s.get("name", "").startswith("http.") and not s["name"].startswith("http.admin.")
        )

    def stop(self) -> None:
        self.envoy.stop()
        self.xds.stop()
        for child in self.extprocs:
            child.stop()

    def __enter__(self) -> GatewayStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- introspection ------------------------------------------------------------------------
    def extproc_ready(self) -> bool:
        return all(http_ok(f"http://127.0.0.1:{port}/readyz") for port in self.http_ports)

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.extproc_url}/debug/state", timeout=10) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def envoy_hosts(self, cluster_name: str = EDS_CLUSTER) -> set[str]:
        """Addresses Envoy currently has in a cluster (from its admin /clusters); by default the
        pods cluster."""
        with urllib.request.urlopen(f"{self.admin_url}/clusters?format=json", timeout=10) as resp:
            data = json.loads(resp.read())
        out: set[str] = set()
        for cluster in data.get("cluster_statuses", []):
            if cluster.get("name") != cluster_name:
                continue
            for host in cluster.get("host_statuses", []):
                sock = host["address"]["socket_address"]
                out.add(f"{sock['address']}:{sock['port_value']}")
        return out


def _admin_post(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=5):
        pass
