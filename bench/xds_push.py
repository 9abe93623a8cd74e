"""xDS push latency and datastore cost.

``python -m bench.xds_push [--pushes 30]`` writes bench/reports/xds_push.md with:

1. Push latency with 1, 100 and 1,000 ModelRoutes (each with its own ModelServer, so the route
   configuration has one route per server): a real Envoy bootstrapped against the ADS server
   (in this process); one ModelServer's ``trafficPolicy`` changes; measured from the change
   handed to the server (generate + convert + send) to Envoy's ACK of the new route
   configuration version. Also the generation and protobuf conversion time alone.
2. Datastore with 5,000 pods (50 ModelServers x 100 pods): memory of the built snapshot
   (tracemalloc), the cost of ``Datastore.apply`` (a full rebuild, what any change costs today),
   and of the Kubernetes source turning 5,000 pods into a ``GatewayConfig``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

import crds
from controllers.xds.generate import ROUTE_TYPE, GatewaySettings, XdsInputs, generate
from controllers.xds.protos import to_any
from controllers.xds.server import AdsServer
from extproc.datastore import Datastore
from fleet.config import GatewayConfig, StaticEndpoint
from matrixinfer.envoy_config import AdsBootstrap, render_ads_bootstrap
from matrixinfer.process import envoy_child, free_port

REPORT = Path(__file__).parent / "reports" / "xds_push.md"


def objects(n_routes: int, attempts: int = 1) -> tuple[list[Any], list[Any]]:
    docs = []
    for i in range(n_routes):
        docs.append(
            "apiVersion: networking.matrixinfer.ai/v1alpha1\nkind: ModelServer\n"
            f"metadata: {{name: s{i}, namespace: ns}}\nspec:\n  inferenceEngine: vLLM\n"
            f"  workloadSelector: {{matchLabels: {{app: s{i}}}}}\n  workloadPort: {{port: 8000}}\n"
            f"  trafficPolicy: {{retry: {{attempts: {attempts}, retryOn: [connect-failure]}}}}\n"
        )
        docs.append(
            "apiVersion: networking.matrixinfer.ai/v1alpha1\nkind: ModelRoute\n"
            f"metadata: {{name: r{i}, namespace: ns}}\nspec:\n  modelName: m{i}\n"
            f"  rules: [{{targets: [{{modelServerName: s{i}}}]}}]\n"
        )
    objs = crds.load_documents("---\n".join(docs), "bench")
    return [o for o in objs if o.kind == "ModelRoute"], [o for o in objs if o.kind == "ModelServer"]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def push_latency(n_routes: int, pushes: int, settings: GatewaySettings) -> dict[str, Any]:
    routes, servers = objects(n_routes)
    pods = [f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(n_routes)]
    ads = AdsServer(debounce=0)
    acks: dict[str, asyncio.Event] = {}

    def on_ack(node: str, type_url: str, version: str) -> None:
        if type_url == ROUTE_TYPE and version in acks:
            acks[version].set()

    ads.on_ack.append(on_ack)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    inputs = XdsInputs(routes, servers, pods, ["127.0.0.1:1"])
    ads.publish_now(generate(settings, inputs))
    tmp = Path(tempfile.mkdtemp(prefix="xds-bench-"))
    admin = free_port()
    (tmp / "envoy.yaml").write_text(render_ads_bootstrap(AdsBootstrap(admin, port)))
    envoy = envoy_child(
        "envoy",
        tmp / "envoy.yaml",
        admin,
        tmp / "envoy.log",
        concurrency=1,
        log_level="error",
    )
    latencies: list[float] = []
    gen_times: list[float] = []
    try:
        await asyncio.to_thread(envoy.start)
        # alternate between two versions of the ModelServers (retry attempts 2 / 1)
        variants = [objects(n_routes, attempts=2)[1], servers]
        for i in range(pushes):
            t0 = time.perf_counter()
            resources = generate(
                settings, XdsInputs(routes, variants[i % 2], pods, ["127.0.0.1:1"])
            )
            t1 = time.perf_counter()
            changed = ads.publish_now(resources)
            assert ROUTE_TYPE in changed, changed
            version = ads.cache.versions()["RDS"]
            event = acks.setdefault(version, asyncio.Event())
            await asyncio.wait_for(event.wait(), 30)
            t2 = time.perf_counter()
            gen_times.append(t1 - t0)
            latencies.append(t2 - t0)
        assert not ads.metrics.nacks.labels("RDS")._value.get()
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(0)
    convert = time_it(lambda: [to_any(r) for t in resources.values() for r in t.values()], 3)
    return {
        "routes": n_routes,
        "p50": statistics.median(latencies),
        "p99": pct(latencies, 0.99),
        "max": max(latencies),
        "generate": statistics.median(gen_times),
        "convert": convert,
    }


def time_it(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def datastore_cost(n_pods: int = 5000, n_servers: int = 50) -> dict[str, Any]:
    _, servers = objects(n_servers)
    per = n_pods // n_servers
    endpoints = [
        StaticEndpoint(
            f"pod-{i}", f"10.{i // 65000}.{(i // 250) % 250}.{i % 250 + 1}", {"app": f"s{i // per}"}
        )
        for i in range(n_pods)
    ]
    config = GatewayConfig(routes=[], servers=servers, endpoints=endpoints)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    ds = Datastore()
    ds.apply(config)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    snapshot_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tracemalloc.start()
    b2 = tracemalloc.take_snapshot()
    again = [StaticEndpoint(e.name, e.address, dict(e.labels), e.ready) for e in endpoints]
    a2 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    endpoint_bytes = sum(s.size_diff for s in a2.compare_to(b2, "filename"))
    del again

    def one_pod_not_ready() -> None:
        eps = list(endpoints)
        eps[17] = StaticEndpoint(eps[17].name, eps[17].address, eps[17].labels, False)
        ds.apply(GatewayConfig(routes=[], servers=servers, endpoints=eps))

    apply_time = time_it(one_pod_not_ready, 5)

    from fleet.kube import KubeSource, pod_info

    source = KubeSource("http://127.0.0.1:1", lambda c: None)
    for _i, e in enumerate(endpoints):
        raw = {
            "metadata": {"name": e.name, "namespace": "ns", "labels": dict(e.labels)},
            "status": {
                "phase": "Running",
                "podIP": e.address,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        source.pods[("ns", e.name)] = pod_info(raw)
    for s in servers:
        source.servers[("ns", s.metadata.name)] = crds.to_dict(s)
    build_time = time_it(source.build, 5)
    return {
        "pods": n_pods,
        "servers": n_servers,
        "snapshot_mb": snapshot_bytes / 1e6,
        "endpoints_mb": endpoint_bytes / 1e6,
        "apply_ms": apply_time * 1000,
        "kube_build_ms": build_time * 1000,
    }


FINDINGS = """## Findings

- **Where a 1,000-route push goes.** Before caching, converting the RouteConfiguration
  (`json_format.ParseDict`, ~0.5 ms per route) was ~0.7 s of every push; routes are now converted
  once and cached by their JSON (`controllers/xds/protos.py`), so a change converts the changed
  route only, and versions are hashed with orjson. What remains is generating and hashing the
  dicts, sending 1,000 routes and Envoy applying them (state of the world re-sends the whole
  RouteConfiguration; delta xDS is not implemented).
- **Datastore rebuild is O(pods).** `Datastore._build` indexes endpoints by (label, value) and
  tests each ModelServer's selector only against the endpoints carrying its rarest pair
  (`extproc.datastore.selected`); it used to test every endpoint against every selector
  (250,000 `selects()` calls here, 453 ms per rebuild, now ~12 ms). A pod readiness change still
  rebuilds the whole snapshot, on the extproc's event loop.
- Memory is small: ~0.5 KB per pod in the snapshot, ~0.26 KB per endpoint handed over.
"""


def report(rows: list[dict[str, Any]], ds: dict[str, Any], pushes: int) -> str:
    load = os.getloadavg()
    lines = [
        "# xDS push latency and datastore cost",
        "",
        f"`python -m bench.xds_push --pushes {pushes}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"2-core machine shared with other work (load average {load[0]:.1f}), Envoy 1.40, "
        "one Envoy node, ADS server in the benchmark process, debounce off (the measured time is "
        "generation + conversion + send + Envoy applying + ACK).",
        "",
        "## Push latency: one ModelServer's trafficPolicy changes → Envoy ACKs the new routes",
        "",
        "| ModelRoutes | p50 | p99 | max | of which generate() | protobuf conversion (all types) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['routes']:,} | {r['p50'] * 1000:.1f} ms | {r['p99'] * 1000:.1f} ms | "
            f"{r['max'] * 1000:.1f} ms | {r['generate'] * 1000:.1f} ms | "
            f"{r['convert'] * 1000:.1f} ms |"
        )
    lines += [
        "",
        "Every push re-generates and re-hashes all types (only changed types are converted and "
        "sent: here only RDS). With the 50 ms default debounce add up to 50 ms.",
        "",
        f"## Datastore with {ds['pods']:,} pods ({ds['servers']} ModelServers x "
        f"{ds['pods'] // ds['servers']} pods)",
        "",
        "| measure | value |",
        "|---|---|",
        "| datastore snapshot memory (pods, server views, route table) | "
        f"{ds['snapshot_mb']:.1f} MB |",
        f"| the 5,000 endpoints the sources hand over | {ds['endpoints_mb']:.1f} MB |",
        "| `Datastore.apply` after one pod turned not ready (full rebuild) | "
        f"{ds['apply_ms']:.1f} ms |",
        "| Kubernetes source: 5,000 pods + 50 ModelServers → GatewayConfig | "
        f"{ds['kube_build_ms']:.1f} ms |",
        "",
        "A pod change costs a full rebuild (apply + build ≈ the two lines above) on the extproc's "
        "event loop; with the 50 ms debounce a burst of pod changes costs one rebuild. Incremental "
        "updates (only the changed ModelServer's view) are not implemented.",
        "",
        FINDINGS,
    ]
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> None:
    settings = GatewaySettings(listen_port=free_port())
    rows = []
    for n in args.routes:
        print(f"push latency with {n} routes ...", file=sys.stderr)
        rows.append(await push_latency(n, args.pushes, settings))
        print(rows[-1], file=sys.stderr)
    print("datastore cost ...", file=sys.stderr)
    ds = datastore_cost()
    print(ds, file=sys.stderr)
    text = report(rows, ds, args.pushes)
    REPORT.write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pushes", type=int, default=30)
    ap.add_argument("--routes", type=int, nargs="+", default=[1, 100, 1000])
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    from matrixinfer.process import unwind_on_sigterm

    unwind_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the children started are stopped
    main()
