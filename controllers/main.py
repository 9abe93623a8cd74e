"""`matrixinfer-controllers`: the Kopf operator process (ModelInfer and Model controllers,
the autoscaler).

    matrixinfer-controllers [--namespace NS ...] [--metrics-port 9090] [--liveness-port 8080]
                            [--resync 30s] [--kubeconfig PATH] [--context NAME] [--server URL]
                            [--peering NAME [--priority N]]
                            [--webhook-port N [--webhook-host NAME] [--webhook-cert-dir DIR]]

Several replicas: ``--peering NAME`` makes them Kopf peers through the (Cluster)KopfPeering object
NAME (the chart installs the peering CRDs and object); each replica takes a random priority
unless ``--priority`` is given, so exactly one (the highest) reconciles and the others pause until
its keep-alive expires. Without it the operator runs standalone (one replica only).

Credentials (:mod:`fleet.kubeconfig`): ``--kubeconfig`` / ``$KUBECONFIG`` / ``~/.kube/config``
(with ``--context``), else the in-cluster service account, or ``--server URL`` (plain, no auth;
the emulated API server in tests and demos). They are loaded once before Kopf starts (none or a
broken one: one line on stderr, exit code 2); Kopf's login handler hands them to Kopf and to the
controllers' own client, and reloads them each time Kopf logs in again after a 401.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from controllers.autoscaling import handlers as autoscaling_handlers
from controllers.kube import connection_info
from controllers.metrics import ControllerMetrics
from controllers.model import handlers as model_handlers
from controllers.model.pod import DEFAULT_RUNTIME_IMAGE
from controllers.model.reconciler import ModelController
from controllers.modelinfer import handlers as modelinfer_handlers
from controllers.modelinfer.reconciler import ModelInferController
from controllers.status import handlers as status_handlers
from controllers.webhooks import handlers as webhook_handlers
from fleet.kubeconfig import KubeAccess, KubeConfigError, KubeCredentials, add_kube_args
from fleet.service import (
    DeprecatedAlias,
    HelpFormatter,
    add_service_args,
    configure_logging,
    duration,
    format_duration,
)

FINALIZER = "workload.matrixinfer.ai/finalizer"
ANNOTATION_PREFIX = "kopf.matrixinfer.ai"


@dataclass
class ControllerConfig:
    namespaces: list[str] = field(default_factory=list)  # empty: cluster-wide
    server: str | None = None  # talk to this API server without credentials (emulators)
    kubeconfig: str | None = None  # else this kubeconfig (default: $KUBECONFIG, ~/.kube/config)
    context: str | None = None  # its context (default: current-context)
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    liveness_endpoint: str | None = None
    resync_seconds: float = 30.0
    consistency_timeout: float = 0.0
    queue_exit_timeout: float = 2.0  # how long event workers may drain the queue on exit
    # the ADS server (controllers/xds) fed from the same API: None = off
    xds_port: int | None = None
    xds_host: str = "0.0.0.0"
    xds_args: list[str] = field(default_factory=list)  # extra matrixinfer-xds flags
    debounce_seconds: float = 0.05  # a reconcile waits this long after a wake-up for more events
    status_interval_seconds: float = (
        1.0  # status patches that only move counters, at most this often
    )
    peering: str | None = None  # Kopf peering object name; None = standalone (one replica)
    priority: int = 0  # this replica's peering priority: the highest live one reconciles
    # the autoscaler: seconds between two syncs of a policy; extproc /metrics URLs (gateway source)
    autoscale_interval: float = autoscaling_handlers.DEFAULT_INTERVAL
    gateway_metrics_urls: list[str] = field(default_factory=list)
    autoscale_stable_window: float | None = None  # None: the planner's default (60 s)
    autoscale_panic_window: float | None = None  # None: the planner's default (6 s)
    # admission webhooks (controllers/webhooks): None = off
    webhooks: webhook_handlers.WebhookConfig | None = None
    # the image of the downloader, runtime sidecar and PD proxy in the pods a Model generates
    runtime_image: str = DEFAULT_RUNTIME_IMAGE


def make_settings(config: ControllerConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.consistency_timeout = config.consistency_timeout
    settings.posting.level = logging.WARNING  # only warnings and explicit kopf.event()s
    settings.scanning.disabled = True  # our CRDs are installed by the chart, not discovered live
    # with --peering, kopf.operator() (below) also sets the name, mandatory (a missing peering
    # object stops the operator instead of running a second leader) and clusterwide
    settings.peering.standalone = config.peering is None
    settings.peering.priority = config.priority
    settings.queueing.exit_timeout = config.queue_exit_timeout
    settings.queueing.idle_timeout = min(settings.queueing.idle_timeout, 5.0)
    if config.webhooks is not None:
        webhook_handlers.configure(settings, config.webhooks)
    return settings


def access(config: ControllerConfig) -> KubeAccess:
    return KubeAccess(config.server, config.kubeconfig, config.context)


def build(
    config: ControllerConfig, credentials: KubeCredentials | None = None
) -> tuple[kopf.OperatorRegistry, ModelInferController]:
    """A registry with every controller's handlers, and the ModelInfer controller behind them.

    ``credentials``: loaded by the caller (else at Kopf's first login)."""
    registry = kopf.OperatorRegistry()
    metrics = ControllerMetrics()
    controller = ModelInferController(
        metrics=metrics,
        resync=config.resync_seconds,
        debounce=config.debounce_seconds,
        status_interval=config.status_interval_seconds,
    )
    autoscaler = autoscaling_handlers.Autoscaler(
        metrics,
        config.gateway_metrics_urls,
        stable_window=config.autoscale_stable_window,
        panic_window=config.autoscale_panic_window,
    )
    models = ModelController(metrics=metrics, runtime_image=config.runtime_image)
    reader = webhook_handlers.Reader(config.namespaces)
    # ModelRoute conditions and ModelServer readyEndpoints (the only status writer)
    status = status_handlers.register(registry)

    logins = 0

    @kopf.on.login(id="matrixinfer-login", registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        nonlocal credentials, logins
        if credentials is None:
            credentials = await access(config).load()
        elif logins:  # Kopf logs in again when the API server answered 401: re-read the token
            await credentials.refresh()
        logins += 1
        info = await connection_info(credentials)
        client = controller.client
        if client is None or client.credentials is not credentials:
            # else their clients already send the reloaded token
            controller.connect(info)
            autoscaler.connect(info)
            models.connect(info)
            reader.connect(info)
            status.connect(info)
        return info

    @kopf.on.cleanup(id="matrixinfer-cleanup", registry=registry)
    async def close(**_: Any) -> None:
        await controller.close()
        await autoscaler.close()
        await models.close()
        await reader.close()

    modelinfer_handlers.register(registry, controller)
    model_handlers.register(registry, models, resync=config.resync_seconds)
    autoscaling_handlers.register(registry, autoscaler, config.autoscale_interval)
    if config.webhooks is not None:
        webhook_handlers.register(registry, reader, metrics)
    return registry, controller


async def run_operator(
    config: ControllerConfig,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> ModelInferController:
    # no or a broken configuration: KubeConfigError here, before Kopf starts (and retries forever)
    credentials = await access(config).load()
    registry, controller = build(config, credentials)
    if config.metrics_port is not None:
        controller.metrics.serve(config.metrics_port, config.metrics_host)
    xds_task = _start_xds(config, credentials)
    try:
        await _run_kopf(config, registry, stop_flag, ready_flag)
    finally:
        if xds_task is not None:
            xds_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await xds_task
    return controller


def _start_xds(config: ControllerConfig, credentials: KubeCredentials) -> asyncio.Task[None] | None:
    """The ADS server in this process (``--xds-port``), watching the same API server with the
    same credentials."""
    if config.xds_port is None:
        return None
    from controllers.xds.main import XdsApp
    from controllers.xds.main import parse_args as xds_args

    argv = ["--source", "kubernetes", "--host", config.xds_host, "--port", str(config.xds_port)]
    if len(config.namespaces) == 1:
        argv += ["--namespace", config.namespaces[0]]
    app = XdsApp(xds_args([*argv, *config.xds_args]), credentials)
    return asyncio.create_task(app.run(asyncio.Event()), name="xds-server")


async def _run_kopf(
    config: ControllerConfig,
    registry: kopf.OperatorRegistry,
    stop_flag: asyncio.Event | threading.Event | None,
    ready_flag: asyncio.Event | threading.Event | None,
) -> None:
    await kopf.operator(
        registry=registry,
        settings=make_settings(config),
        standalone=config.peering is None,
        priority=config.priority,
        peering_name=config.peering,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``matrixinfer-controllers``."""
    ap = argparse.ArgumentParser(
        prog="matrixinfer-controllers",
        description="MatrixInfer Kopf operator. Durations: 500ms, 2s, 1m30s (a bare number is "
        "seconds).",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--namespace", "-n", action="append", default=[], help="watch only these")
    ap.add_argument("--metrics-port", type=int, default=9090, help="/metrics port (0: off)")
    ap.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics port")
    ap.add_argument("--liveness-port", type=int, default=8080, help="Kopf /healthz port (0: off)")
    ap.add_argument("--resync", type=duration, default="30s",
                    help="reconcile every ModelInfer at least this often")  # fmt: skip
    ap.add_argument("--resync-seconds", type=duration, dest="resync", action=DeprecatedAlias,
                    replacement="--resync")  # fmt: skip
    ap.add_argument("--xds-port", type=int, default=0, help="serve ADS on this port (0: off)")
    ap.add_argument(
        "--xds-arg",
        action="append",
        default=[],
        help="extra matrixinfer-xds flag, e.g. --xds-arg=--listen-port=8080 (repeatable)",
    )
    ap.add_argument(
        "--peering",
        default="",
        help="Kopf peering object for several replicas (one reconciles); empty: standalone",
    )
    ap.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority (default: random per process, so the replicas never tie)",
    )
    ap.add_argument(
        "--autoscale-interval",
        type=duration,
        default=format_duration(autoscaling_handlers.DEFAULT_INTERVAL),
        help="time between two autoscaler syncs of an AutoscalingPolicy",
    )
    ap.add_argument(
        "--gateway-metrics-url",
        action="append",
        default=[],
        help="an extproc replica's /metrics URL, for gateway metric sources (repeatable)",
    )
    ap.add_argument("--webhook-port", type=int, default=0,
                    help="serve the admission webhooks (HTTPS) on this port (0: off)")  # fmt: skip
    ap.add_argument("--webhook-addr", default="0.0.0.0", help="address the webhooks listen on")
    ap.add_argument(
        "--webhook-host",
        default="",
        help="host name the API server reaches the webhooks by, e.g. the Service's "
        "NAME.NAMESPACE.svc (default: the listening address, 127.0.0.1 for 0.0.0.0)",
    )
    ap.add_argument(
        "--webhook-cert-dir",
        default="",
        help="directory with tls.crt and tls.key for the webhooks (default: a self-signed "
        "certificate made at start)",
    )
    ap.add_argument(
        "--webhook-configuration",
        default=webhook_handlers.MANAGED,
        help="name of the Validating/MutatingWebhookConfiguration the operator keeps up to "
        "date (empty: made by someone else)",
    )
    ap.add_argument(
        "--runtime-image",
        default=os.environ.get("MATRIXINFER_IMAGE") or DEFAULT_RUNTIME_IMAGE,
        help="image of the downloader, runtime sidecar and PD proxy in the pods a Model"
        f" generates (env MATRIXINFER_IMAGE; default {DEFAULT_RUNTIME_IMAGE})",
    )
    ap.add_argument("--verbose", "-v", action="store_true", help="same as --log-level debug")
    add_kube_args(ap)
    add_service_args(ap)
    return ap


def parse_args(argv: Sequence[str] | None) -> ControllerConfig:
    args = build_parser().parse_args(argv)
    configure_logging("debug" if args.verbose else args.log_level, args.log_format)
    return ControllerConfig(
        namespaces=list(args.namespace),
        server=args.server,
        kubeconfig=args.kubeconfig,
        context=args.context,
        metrics_port=args.metrics_port if args.metrics_port > 0 else None,
        metrics_host=args.metrics_host,
        liveness_endpoint=(
            f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port > 0 else None
        ),
        resync_seconds=args.resync,
        consistency_timeout=5.0,
        xds_port=args.xds_port or None,
        xds_args=list(args.xds_arg),
        peering=args.peering or None,
        priority=args.priority if args.priority is not None else random.randrange(1, 2**31),
        autoscale_interval=args.autoscale_interval,
        gateway_metrics_urls=list(args.gateway_metrics_url),
        webhooks=webhook_handlers.WebhookConfig(
            port=args.webhook_port,
            addr=args.webhook_addr,
            host=args.webhook_host or None,
            cert_dir=args.webhook_cert_dir or None,
            managed=args.webhook_configuration or None,
        )
        if args.webhook_port > 0
        else None,
        runtime_image=args.runtime_image,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        asyncio.run(run_operator(config))
    except KeyboardInterrupt:
        return 0
    except KubeConfigError as exc:
        print(f"matrixinfer-controllers: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a clear line, not a traceback, for the person running it
        print(f"matrixinfer-controllers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
