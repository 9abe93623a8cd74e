"""``matrixinfer-xds``: the ADS server on its own, fed from a configuration directory (local stack)
or from the Kubernetes API (``--source kubernetes``).

    matrixinfer-xds --config DIR --extproc 127.0.0.1:9002 --listen-port 8080 [--port 18000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controllers.xds.generate import GatewaySettings, XdsInputs, generate
from controllers.xds.server import AdsServer
from controllers.xds.sources import inputs_from_config, with_policy_filters
from fleet.kubeconfig import KubeAccess, KubeConfigError, KubeCredentials, add_kube_args
from fleet.service import (
    DeprecatedAlias,
    HelpFormatter,
    add_service_args,
    configure_logging,
    duration,
    format_duration,
    milliseconds,
    signalled_stop,
)

__all__ = ["XdsApp", "build_parser", "main", "parse_args", "settings_from_args"]

log = logging.getLogger("matrixinfer.xds")
_DEFAULTS = GatewaySettings()  # the one place the gateway's defaults are written


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``matrixinfer-xds``."""
    p = argparse.ArgumentParser(
        prog="matrixinfer-xds",
        description="MatrixInfer ADS server: Envoy config over xDS. "
        "Durations: 500ms, 2s, 1m30s (a bare number is seconds).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--source", choices=("files", "kubernetes"), default="files", help="where the config is"
    )
    p.add_argument("--config", type=Path, help="configuration directory (--source files)")
    p.add_argument("--namespace", default=None, help="watch one namespace (default: all)")
    p.add_argument(
        "--extproc-service", default="matrixinfer-extproc", help="extproc Service name (kubernetes)"
    )
    p.add_argument("--extproc-port", type=int, default=9002, help="extproc gRPC port (kubernetes)")
    p.add_argument("--config-poll", type=duration, default="1s", help="directory poll period")
    p.add_argument("--host", default="127.0.0.1", help="address of the ADS and HTTP ports")
    p.add_argument("--port", type=int, default=18000, help="ADS gRPC port")
    p.add_argument("--http-port", type=int, default=0, help="/healthz /metrics /debug/xds (0: off)")
    p.add_argument("--debounce", type=duration, default="50ms", help="push debounce")
    p.add_argument(
        "--extproc",
        action="append",
        default=[],
        help="extproc host:port (repeatable; with --source kubernetes: instead of the Service)",
    )
    p.add_argument("--listen-host", default="127.0.0.1", help="Envoy listener address")
    p.add_argument("--listen-port", type=int, default=8080, help="Envoy listener port")
    p.add_argument("--gateway-name", default="matrixinfer-gateway", help="Gateway this serves")
    p.add_argument("--body-mode", default="BUFFERED", choices=("BUFFERED", "FULL_DUPLEX_STREAMED"),
                   help="ext_proc request body mode (must match the extproc's)")  # fmt: skip
    p.add_argument("--body-limit", type=int, default=10 * 1024 * 1024, help="bytes")
    p.add_argument(
        "--message-timeout",
        type=duration,
        default=format_duration(_DEFAULTS.message_timeout_ms / 1000),
        help="ext_proc wait per reply outside the queue",
    )
    p.add_argument("--message-timeout-ms", type=milliseconds, dest="message_timeout",
                   action=DeprecatedAlias, replacement="--message-timeout")  # fmt: skip
    p.add_argument(
        "--max-message-timeout-cap",
        type=duration,
        default=format_duration(_DEFAULTS.max_message_timeout_cap_ms / 1000),
        help="ceiling of the queued-request extension, derived from the longest queue.maxWait",
    )
    p.add_argument("--max-message-timeout-cap-ms", type=milliseconds,
                   dest="max_message_timeout_cap", action=DeprecatedAlias,
                   replacement="--max-message-timeout-cap")  # fmt: skip
    p.add_argument(
        "--request-headers-timeout",
        type=duration,
        default=format_duration(_DEFAULTS.request_headers_timeout_s),
        help="a request's headers must arrive within this, else the connection is closed",
    )
    p.add_argument(
        "--request-body-idle-timeout",
        type=duration,
        default=format_duration(_DEFAULTS.request_body_idle_timeout_s),
        help="longest stall of a request body before it is routed (408)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=duration,
        default=format_duration(_DEFAULTS.stream_idle_timeout_s),
        help="longest silence on a routed request's answer (a ModelServer's streamIdleTimeout "
        "instead when it sets one)",
    )
    p.add_argument("--fail-open", action="store_true", help="route round-robin if extproc fails")
    p.add_argument("--retries", type=int, default=2, help="Envoy num_retries of the default route")
    p.add_argument("--access-log", action="store_true", help="Envoy access log to stdout")
    p.add_argument(
        "--access-log-format",
        choices=("text", "json"),
        default=_DEFAULTS.access_log_format,
        help="--access-log lines: text, or one JSON object per request (docs/gateway.md)",
    )
    p.add_argument(
        "--tracing-collector",
        default=_DEFAULTS.tracing_collector,
        metavar="HOST:PORT",
        help="OTLP/gRPC collector: Envoy traces requests with its OpenTelemetry tracer and "
        "sends W3C traceparent to the extproc and the engines (docs/gateway.md 'Tracing') "
        "(default empty: no tracing)",
    )
    p.add_argument(
        "--tracing-sampling",
        type=float,
        default=_DEFAULTS.tracing_sampling,
        help="percent of requests Envoy traces (a client's traceparent keeps its trace id; "
        "Envoy decides whether it is sampled)",
    )
    p.add_argument(
        "--no-policy-filters",
        action="store_true",
        help="leave out the usage filters (fleet.usage_envoy): no usage accounting, token "
        "metrics or time to first token",
    )
    add_kube_args(p)
    add_service_args(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    settings = GatewaySettings(
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        gateway_name=args.gateway_name,
        body_mode=args.body_mode,
        body_limit=args.body_limit,
        message_timeout_ms=round(args.message_timeout * 1000),
        max_message_timeout_cap_ms=round(args.max_message_timeout_cap * 1000),
        fail_open=args.fail_open,
        retries=args.retries,
        access_log=args.access_log,
        access_log_format=args.access_log_format,
        request_headers_timeout_s=args.request_headers_timeout,
        request_body_idle_timeout_s=args.request_body_idle_timeout,
        stream_idle_timeout_s=args.stream_idle_timeout,
        tracing_collector=args.tracing_collector,
        tracing_sampling=args.tracing_sampling,
    )
    if args.no_policy_filters:
        return settings
    return with_policy_filters(settings)


class XdsApp:
    """``credentials``: the API server's, shared with the caller (the operator's process);
    else loaded from ``--server`` / ``--kubeconfig`` / ``--context`` when ``run`` starts."""

    def __init__(
        self, args: argparse.Namespace, credentials: KubeCredentials | None = None
    ) -> None:
        self.args = args
        self.credentials = credentials
        self.settings = settings_from_args(args)
        self.ads = AdsServer(debounce=args.debounce)
        self.watcher: Any = None
        self.kube: Any = None
        self.bound_port = 0

    def publish(self, inputs: XdsInputs) -> None:
        self.ads.publish(generate(self.settings, inputs))

    def _apply_config(self, config: Any) -> None:
        self.publish(inputs_from_config(config, self.args.extproc))

    async def run(self, stop: asyncio.Event) -> None:
        args = self.args
        if args.source == "kubernetes" and self.credentials is None:
            # no or a broken configuration: KubeConfigError here, before anything listens
            self.credentials = await KubeAccess.from_args(args).load()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        address = f"{args.host}:{args.port}"
        self.bound_port = server.add_insecure_port(address)
        if self.bound_port == 0:
            raise OSError(f"cannot listen on {address}")
        runner: web.AppRunner | None = None
        if args.source == "files":
            from fleet.files import ConfigWatcher, load_directory

            if args.config is None:
                raise OSError("--config DIR is required with --source files")
            self.watcher = ConfigWatcher(args.config, self._apply_config, interval=args.config_poll)
            # the first set is installed before Envoy can connect (no debounce)
            try:
                config = load_directory(args.config)
            except Exception as exc:  # ConfigError: named file/object/field
                log.error("configuration rejected, serving nothing until fixed: %s", exc)
            else:
                self.ads.publish_now(
                    generate(self.settings, inputs_from_config(config, args.extproc))
                )
        else:
            from fleet.kube import KubeSource, extproc_endpoints

            def on_change(config: Any) -> None:
                # --extproc given: those addresses (the local stack's processes), not a Service
                endpoints = args.extproc or extproc_endpoints(
                    self.kube, args.extproc_service, args.extproc_port
                )
                self.publish(inputs_from_config(config, endpoints))

            self.kube = KubeSource(self.credentials, on_change, namespace=args.namespace)
        await server.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.kube is not None:
            self.kube.start()
        if args.http_port:
            runner = web.AppRunner(self._http_app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, args.host, args.http_port).start()
        log.info("ADS serving on %s:%d", args.host, self.bound_port)
        try:
            await stop.wait()
        finally:
            if self.watcher is not None:
                await self.watcher.stop()
            if self.kube is not None:
                await self.kube.stop()
            await server.stop(grace=0.5)
            if runner is not None:
                await runner.cleanup()

    def _http_app(self) -> web.Application:
        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(self.ads.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        async def debug(_: web.Request) -> web.Response:
            return web.json_response(self.ads.status())

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/debug/xds", debug)
        return app


async def serve(args: argparse.Namespace) -> None:
    await XdsApp(args).run(signalled_stop())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        asyncio.run(serve(args))
    except KubeConfigError as exc:
        print(f"matrixinfer-xds: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("matrixinfer-xds cannot start: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
