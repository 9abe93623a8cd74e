"""The endpoint-picker protocol's subset hint: a proxy (e.g. an Inference Extension gateway) may
send the only pods to pick from in the request's ``metadata_context``
(``envoy.lb.subset_hint`` / ``x-gateway-destination-endpoint-subset``); the extproc then picks
the primary and every fallback among them, and answers 503 when none of them is a pod of the
ModelServer."""

from __future__ import annotations

from random import Random

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.datastore import Datastore
from extproc.gateway import Gateway
from extproc.metrics import GatewayMetrics
from extproc.transport.grpc_servicer import ExtProcServicer, subset_hint
from tests.extproc.helpers import config, server_yaml
from tests.extproc.test_servicer_replies import (
    CONTEXTS,
    ROUTES,
    _AioLikeContext,
    _body_msgs,
    _headers_msg,
)

BODY = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})


def with_hint(req: pb.ProcessingRequest, value: list[str] | str) -> pb.ProcessingRequest:
    hint = struct_pb2.Struct()
    if isinstance(value, str):
        hint.fields["x-gateway-destination-endpoint-subset"].string_value = value
    else:
        hint.fields["x-gateway-destination-endpoint-subset"].list_value.extend(value)
    req.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return req


def test_subset_hint_is_read_from_the_metadata_context() -> None:
    assert subset_hint(_headers_msg()) is None
    listed = with_hint(_headers_msg(), ["10.0.0.1:8000", "10.0.0.2:8000"])
    assert subset_hint(listed) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    joined = with_hint(_headers_msg(), "10.0.0.1:8000, 10.0.0.2:8000")
    assert subset_hint(joined) == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert subset_hint(with_hint(_headers_msg(), [])) == frozenset()
    other = _headers_msg()
    other.metadata_context.filter_metadata["envoy.lb"].fields["x"].string_value = "y"
    assert subset_hint(other) is None


def _gateway() -> tuple[Gateway, Datastore]:
    """Three pods whose in-flight counts rank them p2, p1, p0 (least busy first)."""
    ds = Datastore()
    pods = [(f"p{i}", f"10.0.0.{i}:8000", {"app": "chat"}) for i in range(3)]
    ds.apply(config(server_yaml("pool", {"app": "chat"}) + "---\n" + ROUTES, pods))
    for name, extra in (("p0", 2), ("p1", 1)):
        for _ in range(extra):
            ds.begin(ds.snapshot.pods[name])
    return Gateway(ds, GatewayMetrics(), rng=Random(3)), ds


async def _decide(ctx_cls: type[_AioLikeContext], hint: list[str] | None) -> pb.ProcessingResponse:
    gw, _ = _gateway()
    headers = _headers_msg() if hint is None else with_hint(_headers_msg(), hint)
    ctx = ctx_cls([headers, *_body_msgs(BODY, 1)])
    await ExtProcServicer(gw).Process(None, ctx)
    return pb.ProcessingResponse.FromString(ctx.sent[-1])


def _endpoints(reply: pb.ProcessingResponse) -> tuple[str, list[str]]:
    common = reply.request_body.response
    header = next(
        h.header.raw_value.decode()
        for h in common.header_mutation.set_headers
        if h.header.key == "x-gateway-destination-endpoint"
    )
    lb = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    return header, lb["x-gateway-destination-endpoint"].string_value.split(",")


@pytest.mark.parametrize("ctx_cls", CONTEXTS)
async def test_the_pick_and_its_fallbacks_stay_within_the_subset(
    ctx_cls: type[_AioLikeContext],
) -> None:
    # without a hint the least busy pod wins
    primary, endpoints = _endpoints(await _decide(ctx_cls, None))
    assert primary == "10.0.0.2:8000"
    assert endpoints[0] == primary and len(endpoints) == 3
    # the hint leaves it out: the best pod within the subset, and only subset fallbacks
    subset = ["10.0.0.0:8000", "10.0.0.1:8000", "10.9.9.9:8000"]
    primary, endpoints = _endpoints(await _decide(ctx_cls, subset))
    assert primary == "10.0.0.1:8000"
    assert endpoints[0] == primary
    assert set(endpoints) <= set(subset), endpoints
    primary, endpoints = _endpoints(await _decide(ctx_cls, ["10.0.0.0:8000"]))
    assert (primary, endpoints) == ("10.0.0.0:8000", ["10.0.0.0:8000"])


@pytest.mark.parametrize("hint", [[], ["10.9.9.9:8000"]])
@pytest.mark.parametrize("ctx_cls", CONTEXTS)
async def test_a_subset_without_a_pod_of_the_server_is_503(
    ctx_cls: type[_AioLikeContext], hint: list[str]
) -> None:
    reply = await _decide(ctx_cls, hint)
    assert reply.WhichOneof("response") == "immediate_response"
    immediate = reply.immediate_response
    assert immediate.status.code == 503
    message = orjson.loads(immediate.body)["error"]["message"]
    assert "x-gateway-destination-endpoint-subset" in message
    assert "ModelServer 'pool'" in message
