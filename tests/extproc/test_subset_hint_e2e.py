"""The subset hint through the real Envoy: a ``set_metadata`` filter plays the proxy that knows
the subset (as an Inference Extension gateway would) and the ext_proc filter forwards the
``envoy.lb.subset_hint`` namespace (``metadata_options.forwarding_namespaces``) to the real
extproc servicer. The route answers directly, echoing the endpoint the extproc picked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from random import Random
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.datastore import Datastore
from extproc.gateway import Gateway
from extproc.metrics import GatewayMetrics
from extproc.transport.grpc_servicer import SUBSET_KEY, SUBSET_NAMESPACE, ExtProcServicer
from matrixinfer.process import envoy_child, free_port
from tests.extproc.helpers import config, server_yaml
from tests.extproc.test_servicer_replies import ROUTES

pytestmark = pytest.mark.timeout(120)

CASES: dict[str, list[str] | None] = {
    "none": None,  # no hint: the least busy pod (10.0.0.2)
    "two": ["10.0.0.0:8000", "10.0.0.1:8000"],
    "foreign": ["10.9.9.9:8000"],
}


def _listener(name: str, port: int, subset: list[str] | None) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if subset is not None:
        filters.append(
            {
                "name": "envoy.filters.http.set_metadata",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3."
                    "Config",
                    "metadata": [
                        {"metadata_namespace": SUBSET_NAMESPACE, "value": {SUBSET_KEY: subset}}
                    ],
                },
            }
        )
    filters.append(
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3."
                "ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "extproc"}, "timeout": "5s"},
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "BUFFERED",
                    "response_body_mode": "NONE",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
                "message_timeout": "5s",
                "mutation_rules": {"allow_all_routing": True},
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": [SUBSET_NAMESPACE]},
                    "receiving_namespaces": {"untyped": ["envoy.lb"]},
                },
            },
        }
    )
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }
    )
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "picked"}},
        "response_headers_to_add": [
            {"header": {"key": "x-picked", "value": "%REQ(x-gateway-destination-endpoint)%"}}
        ],
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": filters,
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}
        ],
    }  # fmt: skip


def _bootstrap(admin: int, extproc: int, ports: dict[str, int]) -> dict[str, Any]:
    cluster = {
        "name": "extproc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "extproc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": extproc,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [_listener(n, ports[n], CASES[n]) for n in CASES],
            "clusters": [cluster],
        },
    }


@pytest.fixture
async def envoy_ports(tmp_path: Path) -> AsyncIterator[dict[str, int]]:
    """Three pods whose in-flight counts rank them p2, p1, p0; the extproc on a grpc.aio
    server in this loop; Envoy with one listener per case."""
    ds = Datastore()
    pods = [(f"p{i}", f"10.0.0.{i}:8000", {"app": "chat"}) for i in range(3)]
    ds.apply(config(server_yaml("pool", {"app": "chat"}) + "---\n" + ROUTES, pods))
    for name, extra in (("p0", 2), ("p1", 1)):
        for _ in range(extra):
            ds.begin(ds.snapshot.pods[name])
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(
        ExtProcServicer(Gateway(ds, GatewayMetrics(), rng=Random(3))), server
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    admin = free_port()
    ports = {name: free_port() for name in CASES}
    bootstrap = tmp_path / "envoy.json"
    bootstrap.write_text(json.dumps(_bootstrap(admin, grpc_port, ports)))
    envoy = envoy_child("subset-envoy", bootstrap, admin, tmp_path / "envoy.log", concurrency=1)
    try:
        await asyncio.to_thread(envoy.start)
        yield ports
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(None)


async def test_envoy_forwards_the_hint_and_the_pick_stays_within_it(
    envoy_ports: dict[str, int],
) -> None:
    body = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    headers = {"content-type": "application/json"}
    picked: dict[str, tuple[int, str]] = {}
    async with aiohttp.ClientSession() as session:
        for name, port in envoy_ports.items():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            async with session.post(url, data=body, headers=headers) as r:
                text = await r.text()
                picked[name] = (r.status, r.headers.get("x-picked") or text)
    assert picked["none"] == (200, "10.0.0.2:8000")
    assert picked["two"] == (200, "10.0.0.1:8000")  # the least busy pod within the subset
    status, text = picked["foreign"]
    assert status == 503, text
    assert "x-gateway-destination-endpoint-subset" in text
