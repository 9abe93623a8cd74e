"""``matrixinfer-extproc``: the ext_proc gRPC server, its HTTP side port, config and scraper."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import disable_created_metrics

from extproc.datastore import Datastore
from extproc.demand import DemandCollector
from extproc.gateway import DEFAULT_WAKE_TIMEOUT, Gateway
from extproc.health import HealthMetrics
from extproc.kvevents import KVEventsSubscriber, targets_of
from extproc.kvindex import KVBlockIndex
from extproc.metrics import GatewayMetrics
from extproc.parsing import DEFAULT_BODY_LIMIT
from extproc.scheduling import build_scheduler
from extproc.tracing import Tracing, TracingError
from extproc.tracing import setup as setup_tracing
from extproc.transport.grpc_servicer import BODY_MODES, ExtProcServicer
from extproc.transport.http_side import build_app
from fleet.config import GatewayConfig
from fleet.envoy_eds import write_eds
from fleet.files import ConfigWatcher
from fleet.kubeconfig import KubeAccess, KubeConfigError, add_kube_args
from fleet.service import (
    HelpFormatter,
    add_service_args,
    configure_logging,
    duration,
    fraction,
    signalled_stop,
)

__all__ = ["build_parser", "main", "parse_args", "serve"]

log = logging.getLogger("matrixinfer.extproc")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``matrixinfer-extproc`` (:func:`parse_args` checks the combinations)."""
    p = argparse.ArgumentParser(
        prog="matrixinfer-extproc",
        description="MatrixInfer gateway: the Envoy ext_proc server that routes OpenAI requests. "
        "Durations: 500ms, 2s, 1m30s (a bare number is seconds).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=Path, default=None, help="directory of YAML configuration")
    p.add_argument(
        "--source",
        choices=("files", "kubernetes"),
        default="files",
        help="files: --config DIR; kubernetes: watch ModelRoute/ModelServer/Pods (docs/xds.md)",
    )
    p.add_argument("--namespace", default=None, help="--source kubernetes: one namespace only")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port")
    p.add_argument("--http-port", type=int, default=9090, help="metrics/health port")
    p.add_argument(
        "--body-mode",
        choices=BODY_MODES,
        default="BUFFERED",
        help="must match the Envoy filter's request_body_mode",
    )
    p.add_argument(
        "--body-limit",
        type=int,
        default=DEFAULT_BODY_LIMIT,
        help="largest request body in bytes; larger ones get 413",
    )
    p.add_argument("--scrape-interval", type=duration, default="200ms", help="pod /metrics period")
    p.add_argument(
        "--stale-after",
        type=duration,
        default=None,
        help="a pod whose scrapes fail this long is not ready (default 2 x scrape interval)",
    )
    p.add_argument(
        "--config-poll", type=duration, default="1s", help="config directory poll period"
    )
    p.add_argument(
        "--eds-file",
        type=Path,
        default=None,
        help="write the pods as an Envoy ClusterLoadAssignment to this file (for override_host)",
    )
    p.add_argument("--eds-cluster", default="matrixinfer_pods", help="cluster name in --eds-file")
    p.add_argument(
        "--wake-timeout",
        type=duration,
        default=f"{DEFAULT_WAKE_TIMEOUT:g}s",
        help="how long a request waits in the gateway, when its ModelRoute sets no queue "
        "(queue.maxWait otherwise), for a ModelServer with no ready pod (at zero, or starting) "
        "and, without policies, for room on a ModelServer whose pods are all saturated (first "
        "come first served); then 503 with Retry-After; 0: 503 at once (default 60s)",
    )
    p.add_argument(
        "--kv-index-capacity",
        type=int,
        default=1_000_000,
        help="block hashes kept from the engines' KV events, LRU (default 1000000, ~200 MB)",
    )
    p.add_argument(
        "--debug-state",
        action="store_true",
        help="serve GET /debug/state (the datastore: pods, addresses, configuration errors) on "
        "the HTTP port; off by default, as that port also serves /metrics beyond loopback",
    )
    p.add_argument(
        "--tracing",
        action="store_true",
        help="OpenTelemetry spans of the pipeline stages, children of Envoy's (docs/gateway.md "
        "'Tracing'), sent by OTLP/gRPC as the OTEL_* variables say (OTEL_EXPORTER_OTLP_ENDPOINT, "
        "OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER...); off by default",
    )
    pol = p.add_argument_group("policies (docs/policies.md); none given: the plain data path")
    pol.add_argument(
        "--policies",
        action="store_true",
        help="apply ModelRoute rateLimit/access/queue and account usage (implied by --auth-config)",
    )
    pol.add_argument(
        "--auth-config", type=Path, default=None, help="YAML: apiKeysFile, jwt, anonymousRoutes"
    )
    pol.add_argument(
        "--policy-config",
        type=Path,
        default=None,
        help="YAML: gateway-wide policy options (tokenEstimate: {method: chars|tokenize, "
        "timeoutMs}); implies --policies",
    )
    pol.add_argument(
        "--api-keys-secret",
        default=None,
        metavar="NAMESPACE/NAME",
        help="API keys from this Secret, watched (needs --source kubernetes; implies --policies)",
    )
    pol.add_argument(
        "--ratelimit-fail",
        choices=("open", "closed"),
        default="open",
        help="Redis unreachable: open = local buckets, closed = 503",
    )
    pol.add_argument(
        "--redis-password-file", type=Path, default=None, help="file holding the Redis password"
    )
    pol.add_argument(
        "--redis-headroom",
        type=fraction,
        default=0.25,
        metavar="FRACTION",
        help="admit without waiting for Redis (and charge it behind the request) while this "
        "replica's recent view of the budget shows more than this fraction of every limited "
        "bucket left after the request; closer to the limit, ask Redis first "
        "(1 = always ask Redis first)",
    )
    pol.add_argument(
        "--charge-key-file",
        type=Path,
        default=None,
        help="file holding the key (at least 16 bytes) that signs the charge carried with each "
        "request; give every extproc replica behind one Envoy the same file so any of them can "
        "settle a usage report (default: a random key per process)",
    )
    pol.add_argument(
        "--tenant-priority",
        action="append",
        default=[],
        metavar="TENANT=N",
        help="queue priority of a tenant's requests (higher first; default 0); repeatable",
    )
    pol.add_argument(
        "--usage-grace",
        type=duration,
        default="10s",
        help="how long to wait for a request's usage report before charging its estimate",
    )
    p.add_argument(
        "--transport",
        choices=("h2", "grpc"),
        default="h2",
        help="ext_proc server: h2 = the hand-written HTTP/2 transport (extproc/transport/h2.py); "
        "grpc = grpc.aio, the library implementation (docs/gateway.md) (default: h2)",
    )
    add_kube_args(p)
    add_service_args(p)
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.source == "files" and args.config is None:
        p.error("--config DIR is required (or --source kubernetes)")
    if args.api_keys_secret is not None:
        if args.source != "kubernetes":
            p.error("--api-keys-secret needs --source kubernetes (else use apiKeysFile)")
        ns, _, name = args.api_keys_secret.partition("/")
        if not ns or not name or "/" in name:
            p.error(f"--api-keys-secret {args.api_keys_secret!r}: expected NAMESPACE/NAME")
    return args


class ExtProcApp:
    """Everything one extproc process runs, wired together."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.metrics = GatewayMetrics()
        self.datastore = Datastore()
        HealthMetrics(self.metrics.registry, self.datastore)
        if args.kv_index_capacity < 1:
            raise SystemExit(f"--kv-index-capacity must be >= 1, got {args.kv_index_capacity}")
        self.kv_index = KVBlockIndex(args.kv_index_capacity)
        kv_index = self.kv_index
        self.tracing: Tracing | None = None
        if args.tracing:
            try:
                self.tracing = setup_tracing()
            except TracingError as exc:
                raise SystemExit(f"matrixinfer-extproc: --tracing: {exc}") from None
        self.gateway = Gateway(
            self.datastore,
            self.metrics,
            body_limit=args.body_limit,
            scheduler_factory=lambda profile: build_scheduler(profile=profile, kv_index=kv_index),
            wake_timeout=args.wake_timeout,
            tracing=self.tracing,
        )
        self.policies: Any = None
        if (
            args.policies
            or args.auth_config is not None
            or args.api_keys_secret is not None
            or args.policy_config is not None
        ):
            self.policies = build_policies(args, self.metrics)
            self.gateway.policies = self.policies
        # per-ModelServer waiting / in-flight gauges: the autoscaler's gateway signal
        self.metrics.registry.register(
            DemandCollector(
                self.datastore,
                lambda: self.policies.queues if self.policies is not None else None,
                self.gateway.waking.counts,
            )
        )
        self.watcher: Any
        if args.source == "kubernetes":
            from fleet.kube import KubeSource

            secrets: list[tuple[str, str]] = []
            auth = self.policies.settings.auth if self.policies is not None else None
            if auth is not None and auth.api_keys_secret is not None:
                ns, _, name = auth.api_keys_secret.partition("/")
                secrets.append((ns, name))
            self.watcher = KubeSource(
                KubeAccess.from_args(args),
                self._apply,
                namespace=args.namespace,
                on_result=self._counted,
                secrets=secrets,
                route_secrets=self.policies is not None,
                on_secret=self.policies.update_secret if self.policies is not None else None,
            )
        else:
            self.watcher = ConfigWatcher(
                args.config,
                self._apply,
                interval=args.config_poll,
                on_result=self._counted,
            )
        self.scraper: Any = None
        self.kv_events = KVEventsSubscriber(
            self.kv_index,
            lambda: targets_of(self.datastore.snapshot.servers.values()),
            registry=self.metrics.registry,
        )
        self.started = time.monotonic()

    def _apply(self, config: GatewayConfig) -> None:
        snap = self.datastore.apply(config)
        for warning in snap.warnings:
            log.warning("configuration: %s", warning)
        for kind, n in self.datastore.sizes().items():
            self.metrics.datastore_objects.labels(kind).set(n)
        if self.args.eds_file is not None:
            write_eds(
                self.args.eds_file, self.args.eds_cluster, (p.address for p in snap.pods.values())
            )

    def _counted(self, ok: bool) -> None:
        self.metrics.config_reloads.labels("applied" if ok else "rejected").inc()

    def ready(self) -> tuple[bool, str]:
        if self.watcher.status.applied == 0:
            return False, "no configuration applied yet: " + (self.watcher.status.last_error or "")
        return True, "ready"

    def state(self) -> dict[str, Any]:
        out = self.datastore.to_json()
        out["config"] = {
            "directory": str(self.args.config),
            "applied": self.watcher.status.applied,
            "rejected": self.watcher.status.rejected,
            "lastError": self.watcher.status.last_error,
        }
        out["kvEvents"] = self.kv_events.state()
        # requests waiting without a fair queue: for a ready pod, or in the line for room
        out["waiting"] = self.gateway.waking.state()
        return out

    def _start_scraper(self) -> None:
        try:
            from extproc.scraper import MetricsScraper, ScrapeTarget
        except ImportError:
            log.warning("extproc.scraper is not available: pod metrics are not scraped")
            return

        def targets() -> list[Any]:
            return [ScrapeTarget(n, u, e) for n, u, e in self.datastore.scrape_targets()]

        self.scraper = scraper = MetricsScraper(
            targets,
            self.datastore.publish_metrics,
            interval=self.args.scrape_interval,
            timeout=max(0.1, min(0.5, 2 * self.args.scrape_interval)),
            stale_after=self.args.stale_after
            if self.args.stale_after is not None
            else 2 * self.args.scrape_interval,
            registry=self.metrics.registry,
        )
        self.gateway.on_lora_missing.append(scraper.refresh_loras)

    def access_log_servicer(self) -> Any:
        """Envoy's access-log service: every answered request (the gateway's status counter,
        timings, logs) and, with policies, the usage reports."""
        from extproc.policies.usage import AccessLogServicer

        ledger = self.policies.ledger if self.policies is not None else None
        return AccessLogServicer(ledger, self.gateway.answered, self.datastore.attempt)

    async def _start_policy_tasks(self) -> list[asyncio.Task[None]]:
        """The policies' background work (usage settlement, JWKS refresh), when policies run."""
        background: list[asyncio.Task[None]] = []
        if self.policies is not None:
            background.append(asyncio.create_task(self.policies.run()))
            auth = self.policies.auth
            if auth is not None and auth.jwks is not None:
                await auth.jwks.refresh()
                background.append(asyncio.create_task(auth.jwks.run()))
        return background

    async def _start_side_services(self) -> web.AppRunner:
        """The HTTP side port, the config watcher and the metrics scraper (both transports)."""
        app = build_app(
            self.metrics.registry, self.state, self.ready, debug_state=self.args.debug_state
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.args.host, self.args.http_port).start()
        self.watcher.start()
        self._start_scraper()
        if self.scraper is not None:
            await self.scraper.start()
        await self.kv_events.start()
        return runner

    async def _stop_side_services(self, background: list[asyncio.Task[None]]) -> None:
        await self.watcher.stop()
        for task in background:
            task.cancel()
        if self.policies is not None:
            await self.policies.close()
        if self.scraper is not None:
            await self.scraper.stop()
        await self.kv_events.stop()

    async def run(self, stop: asyncio.Event) -> None:
        args = self.args
        if not self.watcher.load_now():
            log.error("starting without a configuration; fix %s (it is watched)", args.config)
        if args.transport == "h2":
            await self._run_h2(stop)
            return
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", args.body_limit + 1024 * 1024),
                # measured (bench/reports/extproc_cost.md): ~10% less CPU per request in this
                # process and in Envoy; no BDP pings on Envoy's long-lived loopback connection
                ("grpc.http2.bdp_probe", 0),
                ("grpc.optimization_target", "throughput"),
            ]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(
            ExtProcServicer(self.gateway, body_mode=args.body_mode, body_limit=args.body_limit),
            server,
        )
        from envoy.service.accesslog.v3 import als_pb2_grpc

        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.access_log_servicer(), server)
        background = await self._start_policy_tasks()
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        grpc_address = f"{args.host}:{args.grpc_port}"
        if server.add_insecure_port(grpc_address) == 0:
            raise OSError(f"cannot listen on {grpc_address}")
        await server.start()
        for service in ("", EXT_PROC_SERVICE):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        runner = await self._start_side_services()
        log.info(
            "extproc serving ext_proc on %s (body mode %s), HTTP on %s:%d",
            grpc_address,
            args.body_mode,
            args.host,
            args.http_port,
        )
        try:
            await stop.wait()
        finally:
            log.info("extproc stopping")
            for service in ("", EXT_PROC_SERVICE):
                await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            await self._stop_side_services(background)
            await server.stop(grace=1.0)
            await runner.cleanup()

    async def _run_h2(self, stop: asyncio.Event) -> None:
        """The same services on the hand-written HTTP/2 transport (extproc/transport/h2.py)."""
        from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

        from extproc.transport.h2 import PROCESS_PATH, GrpcMethod, H2Server

        args = self.args
        servicer = ExtProcServicer(
            self.gateway, body_mode=args.body_mode, body_limit=args.body_limit
        )
        from envoy.service.accesslog.v3 import als_pb2

        methods = {PROCESS_PATH: GrpcMethod(servicer.Process, pb.ProcessingRequest.FromString)}
        methods["/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"] = GrpcMethod(
            self.access_log_servicer().StreamAccessLogs,
            als_pb2.StreamAccessLogsMessage.FromString,
            True,
        )
        background = await self._start_policy_tasks()
        server = H2Server(
            methods,
            health_services=("", EXT_PROC_SERVICE),
            max_message=args.body_limit + 1024 * 1024,
        )
        await server.start(args.host, args.grpc_port)
        runner = await self._start_side_services()
        log.info(
            "extproc serving ext_proc (h2 transport) on %s:%d (body mode %s), HTTP on %s:%d",
            args.host,
            args.grpc_port,
            args.body_mode,
            args.host,
            args.http_port,
        )
        try:
            await stop.wait()
        finally:
            log.info("extproc stopping")
            server.stopping = True  # health: NOT_SERVING from here on
            await self._stop_side_services(background)
            await server.stop(grace=1.0)
            await runner.cleanup()


def build_policies(args: argparse.Namespace, metrics: GatewayMetrics) -> Any:
    from extproc.policies.auth import AuthConfig
    from extproc.policies.enforce import Policies, PolicySettings
    from extproc.policies.token_estimate import PolicyConfig

    priorities: dict[str, int] = {}
    for item in args.tenant_priority:
        tenant, _, value = item.partition("=")
        try:
            priorities[tenant] = int(value)
        except ValueError:
            raise SystemExit(f"--tenant-priority {item!r}: expected TENANT=INTEGER") from None
    password = None
    if args.redis_password_file is not None:
        password = args.redis_password_file.read_text().strip()
    charge_key = None
    if args.charge_key_file is not None:
        charge_key = _read_charge_key(args.charge_key_file)
    try:
        auth = AuthConfig.load(args.auth_config) if args.auth_config is not None else None
        policy_config = (
            PolicyConfig.load(args.policy_config) if args.policy_config is not None else None
        )
    except ValueError as exc:
        raise SystemExit(f"matrixinfer-extproc: {exc}") from None
    if args.api_keys_secret is not None:
        if auth is None:
            auth = AuthConfig()
        elif auth.api_keys_file is not None:
            raise SystemExit(
                "matrixinfer-extproc: --api-keys-secret and the auth config's apiKeysFile are "
                "exclusive; give one"
            )
        auth.api_keys_secret = args.api_keys_secret
    if auth is not None and auth.api_keys_secret is not None and args.source != "kubernetes":
        raise SystemExit(
            f"matrixinfer-extproc: apiKeysSecret {auth.api_keys_secret} needs --source kubernetes"
        )
    settings = PolicySettings(
        auth=auth,
        fail_open=args.ratelimit_fail == "open",
        redis_password=password,
        usage_grace=args.usage_grace,
        tenant_priorities=priorities,
        token_estimate=policy_config.token_estimate if policy_config is not None else None,
        charge_key=charge_key,
        redis_headroom=args.redis_headroom,
    )
    return Policies(settings, metrics.registry)


def _read_charge_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise SystemExit(f"matrixinfer-extproc: --charge-key-file {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise SystemExit(
            f"matrixinfer-extproc: --charge-key-file {path}: the key has {len(key)} bytes, at "
            "least 16 are needed (e.g. `openssl rand -hex 32`)"
        )
    return key


async def serve(args: argparse.Namespace) -> None:
    app = ExtProcApp(args)
    if args.source == "kubernetes":
        await app.watcher.connect()  # no or a broken configuration: KubeConfigError, before all
    try:
        await app.run(signalled_stop())
    finally:
        if app.tracing is not None:  # the spans still batched go out
            await asyncio.to_thread(app.tracing.shutdown)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    # counters and histograms without their *_created series (a timestamp per labelled child
    # that dashboards do not use and that doubles the scraped series)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
    try:
        asyncio.run(serve(args))
    except KubeConfigError as exc:
        print(f"matrixinfer-extproc: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("extproc cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
