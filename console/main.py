"""``matrixinfer console``: serve the REST API and the web UI with uvicorn."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import uvicorn

from console.app import ConsoleConfig, create_app
from console.catalog import InvalidDataFile
from fleet.kubeconfig import KubeAccess, add_kube_args

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_kube_args(p)
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=8090, help="listen port")
    p.add_argument("--namespace", default="default", help="namespace of the deployments")
    p.add_argument("--gateway", default=None, help="gateway URL (OpenAI API) for the chat")
    p.add_argument("--gateway-metrics", default=None,
                   help="the gateway's Prometheus /metrics URL, for a deployment's figures "
                   "(default empty)")  # fmt: skip
    p.add_argument("--prometheus", default=None, metavar="URL",
                   help="a Prometheus server's URL: a deployment's figures from instant "
                   "queries over every gateway replica (instead of --gateway-metrics) "
                   "(default empty)")  # fmt: skip
    p.add_argument("--local-token", action="store_true",
                   help="generate one token at start (printed with the URL) instead of "
                   "Kubernetes TokenReview/SubjectAccessReview: the local stack")  # fmt: skip
    p.add_argument("--local-token-file", type=Path, default=None, metavar="FILE",
                   help="as --local-token, with the token read from FILE (the local stack "
                   "writes it there to print the URL itself) (default empty)")  # fmt: skip
    p.add_argument("--auth-cache-seconds", type=float, default=10.0,
                   help="how long a TokenReview / SubjectAccessReview answer is reused "
                   "(0: ask on every request)")  # fmt: skip
    p.add_argument("--catalog", type=Path, default=None, help="model catalog YAML (replaces)")
    p.add_argument("--rules", type=Path, default=None, help="engine rule file YAML (replaces)")
    p.add_argument("--prices", type=Path, default=None, help="GPU price table YAML (replaces)")


def run(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(24) if args.local_token else None
    if args.local_token_file is not None:
        try:
            token = args.local_token_file.read_text().strip()
        except OSError as exc:
            print(f"matrixinfer console: --local-token-file: {exc}", file=sys.stderr)
            return 2
        if not token:
            print(
                f"matrixinfer console: --local-token-file {args.local_token_file} is empty",
                file=sys.stderr,
            )
            return 2
    cfg = ConsoleConfig(
        kube=KubeAccess.from_args(args),
        namespace=args.namespace,
        token=token,
        auth_cache_seconds=args.auth_cache_seconds,
        gateway_url=args.gateway,
        gateway_metrics_url=args.gateway_metrics,
        prometheus_url=args.prometheus,
        catalog_file=args.catalog,
        rules_file=args.rules,
        prices_file=args.prices,
    )
    try:
        app = create_app(cfg)
    except InvalidDataFile as exc:
        print(f"matrixinfer console: {exc}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}/"
    if token:
        print(f"console: {url}ui/index.html#token={token}", flush=True)
        print(f"API token: {token}", flush=True)
    else:
        print(f"console: {url} (sign in with a Kubernetes bearer token)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
