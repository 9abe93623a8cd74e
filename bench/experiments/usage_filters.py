"""What Envoy's side of usage accounting costs, filter by filter (``python -m
bench.experiments.usage_filters``). Not a test.

Standalone Envoys (no ext_proc) in front of bench.gateway_overhead's nginx (a small JSON chat
answer with ``usage``), all running at once and measured in interleaved rounds with `hey`:

- **plain**: set_metadata (marks the request as the extproc would: envoy.lb/matrixinfer_usage) →
  router;
- **lua-idle** / **new-idle**: + the usage filters on an unmarked request (what the data path
  pays for them): ``lua`` is usage.lua reading every JSON answer (session 4's design,
  ``envoy_http_filters(small_json_digits=0)``), ``new`` is json_to_metadata for answers under
  1 MB plus usage.lua for streams and longer answers (``envoy_http_filters()``);
- **lua** / **new**: the same on a marked request (the usage read into matrixinfer.*);
- **lua+als** / **new+als**: + the gRPC access log of the marked request to a sink.

Prints Envoy CPU per request and p50 per variant (medians over rounds) and the sink's count of
entries carrying the usage (so a variant that does not extract it shows up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gateway_overhead import (
    UPSTREAM_HOSTS,
    nginx_child,
    request_body,
)
from bench.policy_overhead import Window, hey, paired_median, rotation
from fleet.usage_envoy import (
    LOG_NAME,
    RID_KEY,
    RID_NAMESPACE,
    USAGE_KEY,
    envoy_access_logs,
    envoy_http_filters,
)
from matrixinfer.process import Child, envoy_child, free_port, unwind_on_sigterm

VARIANTS = ("plain", "lua-idle", "new-idle", "lua", "new", "lua+als", "new+als")


def set_metadata(namespace: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [
                {"metadata_namespace": namespace, "value": {RID_KEY: "r-1", USAGE_KEY: True}}
            ],
        },
    }


def bootstrap(variant: str, listen: int, admin: int, upstream: int, sink: int) -> dict[str, Any]:
    filters = [set_metadata("other" if variant.endswith("-idle") else RID_NAMESPACE)]
    if variant.startswith("lua"):
        filters += envoy_http_filters(small_json_digits=0)
    elif variant.startswith("new"):
        filters += envoy_http_filters()
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                "suppress_envoy_headers": True,
            },
        }
    )
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "openai",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "0s"}}
                    ],
                }
            ]
        },
        "http_filters": filters,
    }
    if variant.endswith("+als"):
        hcm["access_log"] = envoy_access_logs("sink")

    def cluster(name: str, hosts: list[str], port: int, h2: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": h, "port_value": port}
                                    }
                                }
                            }
                            for h in hosts
                        ]
                    }
                ],
            },
        }
        if h2:
            c["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                    "HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            }
        return c

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "openai",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster("up", list(UPSTREAM_HOSTS), upstream, False),
                cluster("sink", ["127.0.0.1"], sink, True),
            ],
        },
    }


# ------------------------------------------------------------------------------ access-log sink


def run_sink(port: int, out: Path) -> None:
    """A gRPC access-log service counting entries and those carrying prompt == 250."""
    import grpc
    from envoy.service.accesslog.v3 import als_pb2_grpc

    counts = {"entries": 0, "with_usage": 0, "messages": 0}

    class Sink(als_pb2_grpc.AccessLogServiceServicer):
        async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
            async for msg in request_iterator:
                if msg.identifier.log_name and msg.identifier.log_name != LOG_NAME:
                    continue
                counts["messages"] += 1
                for e in msg.http_logs.log_entry:
                    counts["entries"] += 1
                    md = e.common_properties.metadata.filter_metadata.get("matrixinfer")
                    if md is not None and md.fields["prompt"].number_value == 250:
                        counts["with_usage"] += 1
            return None

    async def serve() -> None:
        server = grpc.aio.server()
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(Sink(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        while True:
            await asyncio.to_thread(out.write_text, json.dumps(counts))
            await asyncio.sleep(0.5)

    asyncio.run(serve())


# ------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sink-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sink:
        run_sink(args.sink, args.sink_out)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        body = run / "body.json"
        body.write_bytes(request_body())
        upstream = free_port(UPSTREAM_HOSTS[0])
        sink_port, sink_out = free_port(), run / "sink.json"
        children: list[Child] = []
        urls: dict[str, tuple[str, int | None]] = {}
        try:
            children.append(nginx_child(run, upstream).start())
            argv_sink = [sys.executable, "-m", "bench.experiments.usage_filters",
                         "--sink", str(sink_port), "--sink-out", str(sink_out)]  # fmt: skip
            children.append(
                Child("sink", argv_sink, log_path=run / "sink.log", ready=sink_out.exists).start()
            )
            for v in variants:
                listen, admin = free_port(), free_port()
                cfg = run / f"{v}.json"
                cfg.write_text(json.dumps(bootstrap(v, listen, admin, upstream, sink_port)))
                env = envoy_child(v, cfg, admin, run / f"{v}.log").start()
                children.append(env)
                urls[v] = (f"http://127.0.0.1:{listen}/v1/chat/completions", env.pid)
            rows: dict[str, list[Window]] = {v: [] for v in variants}
            for r in range(args.rounds):
                for v in rotation(variants, r):
                    url, pid = urls[v]
                    rows[v].append(hey(v, url, body, args.rate, args.seconds, (pid,)))
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            time.sleep(1.0)
            print(f"sink: {sink_out.read_text()}")
            base = rows[variants[0]]
            print(f"{'variant':10} {'p50 ms':>8} {'Δp50':>7} {'CPU/req ms':>11} {'ΔCPU':>7} errors")
            for v, ws in rows.items():
                p50 = statistics.median(w.p50 for w in ws)
                cpu = statistics.median(w.cpu_envoy_ms for w in ws)
                dp = paired_median(ws, base, lambda w: w.p50)
                dc = paired_median(ws, base, lambda w: w.cpu_envoy_ms)
                errs = sum(w.errors for w in ws)
                print(f"{v:10} {p50:8.3f} {dp:+7.3f} {cpu:11.4f} {dc:+7.4f} {errs}")
        finally:
            for c in reversed(children):
                c.stop()
    return 0


if __name__ == "__main__":
    unwind_on_sigterm()
    raise SystemExit(main())
