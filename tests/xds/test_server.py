"""The ADS protocol logic without Envoy: versions, nonces, ACK/NACK, order, debounce."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controllers.xds.generate import (
    CLUSTER,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    GatewaySettings,
    XdsInputs,
    generate,
)
from controllers.xds.server import AdsServer, _Stream


def resources(
    pods: list[str] | None = None, port: int = 8080, extproc: str = "127.0.0.1:9002"
) -> Any:
    return generate(
        GatewaySettings(listen_port=port),
        XdsInputs(pod_addresses=pods or ["10.0.0.1:8000"], extproc_endpoints=[extproc]),
    )


def request(
    type_url: str,
    version: str = "",
    nonce: str = "",
    names: tuple[str, ...] = (),
    error: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce, resource_names=names
    )
    req.node.id = "n1"
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def exchange(ads: AdsServer, stream: _Stream, *reqs: Any) -> list[Any]:
    for r in reqs:
        ads._on_request(stream, r)
    return ads._responses(stream)


def nacks(ads: AdsServer) -> float:
    return sum(
        s.value
        for fam in ads.metrics.nacks.collect()
        for s in fam.samples
        if s.name.endswith("_total")
    )


def test_ack_nack_stale_and_order() -> None:
    ads = AdsServer()
    ads.publish_now(resources())
    stream = _Stream(node="", cluster="")
    ads.streams.append(stream)
    (cds,) = exchange(ads, stream, request(CLUSTER))
    assert cds.type_url == CLUSTER and len(cds.resources) == 3 and stream.node == "n1"
    # ACK of CDS + subscription to EDS and LDS
    out = exchange(
        ads,
        stream,
        request(CLUSTER, cds.version_info, cds.nonce),
        request(ENDPOINT_TYPE, names=("matrixinfer_pods",)),
        request(LISTENER_TYPE),
    )
    assert [r.type_url for r in out] == [ENDPOINT_TYPE, LISTENER_TYPE]
    eds, lds = out
    (rds,) = exchange(
        ads,
        stream,
        request(ENDPOINT_TYPE, eds.version_info, eds.nonce, ("matrixinfer_pods",)),
        request(LISTENER_TYPE, lds.version_info, lds.nonce),
        request(ROUTE_TYPE, names=("openai",)),
    )
    assert rds.type_url == ROUTE_TYPE
    assert (
        exchange(ads, stream, request(ROUTE_TYPE, rds.version_info, rds.nonce, ("openai",))) == []
    )
    assert ads.acked(ROUTE_TYPE) == [rds.version_info]

    # a change of clusters, endpoints and listeners is pushed in that order; routes follow the
    # listener (a warming listener waits for them) although they did not change
    ads.publish_now(resources(["10.0.0.2:8000"], port=9090, extproc="127.0.0.1:9003"))
    out = ads._responses(stream)
    assert [r.type_url for r in out] == [CLUSTER, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
    cds2 = out[0]
    # a NACK: counted, logged, nothing re-sent, the acked version stays
    before = stream.types[CLUSTER].acked_version
    assert exchange(ads, stream, request(CLUSTER, before, cds2.nonce, error="bad cluster")) == []
    assert nacks(ads) == 1 and stream.types[CLUSTER].last_error == "bad cluster"
    assert stream.types[CLUSTER].acked_version == before
    # an answer to an old nonce is ignored
    assert exchange(ads, stream, request(CLUSTER, before, cds.nonce, error="old")) == []
    assert nacks(ads) == 1
    # an unchanged republish sends nothing
    ads.publish_now(resources(["10.0.0.2:8000"], port=9090, extproc="127.0.0.1:9003"))
    assert ads._responses(stream) == []


@pytest.mark.looptime
async def test_publish_is_debounced() -> None:
    """In fake loop time (looptime): five publishes within the debounce are sent as one, the
    last, and only once the debounce has passed."""
    ads = AdsServer(debounce=0.05)
    for i in range(5):
        ads.publish(resources([f"10.0.0.{i + 1}:8000"]))
    await asyncio.sleep(0.04)
    assert ads.published == 0
    await asyncio.sleep(0.02)
    assert ads.published == 1
    eds = ads.cache.get(ENDPOINT_TYPE)
    assert eds is not None
    assert b"10.0.0.5" in eds.resources["matrixinfer_pods"].value


def test_a_set_that_does_not_fit_the_schema_is_refused() -> None:
    ads = AdsServer()
    ads.publish_now(resources())
    version = ads.cache.versions()["CDS"]
    bad = resources()
    bad[CLUSTER]["matrixinfer_pods"]["no_such_field"] = 1
    assert ads.publish_now(bad) == []
    assert "no_such_field" in ads.last_error
    assert ads.cache.versions()["CDS"] == version
