"""Pins the exact replies the ext_proc servicer sends Envoy, byte for byte.

The servicer builds its hot replies without protobuf objects (pre-encoded pieces); these golden
bytes were produced by the protobuf-object builder that came before (``SerializeToString(
deterministic=True)``), so a change in how replies are built cannot change what Envoy receives.
Both context kinds are driven: a grpc.aio-like one (``read``/``write`` of messages) and an
h2-transport-like one that also takes pre-serialised bytes (``write_raw``).
"""

from __future__ import annotations

from random import Random
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.datastore import Datastore
from extproc.gateway import Gateway, Immediate, RequestState, Routed
from extproc.metrics import GatewayMetrics
from extproc.transport.grpc_servicer import (
    ExtProcServicer,
    decision_bytes,
    from_decision,
    immediate_response,
    timeout_override,
)
from fleet.pods import Pod
from fleet.usage_envoy import USAGE_KEY
from tests.extproc.helpers import config, server_yaml

POD = Pod("p0", "10.0.0.1:8000")
BASE_HEADERS = {
    "x-gateway-model-server": "pool",
    "x-envoy-max-retries": "2",
    "x-envoy-retry-on": "connect-failure,reset",
    "x-envoy-retriable-status-codes": "",  # "" = remove the client's copy
}
RAW = b'{"model":"m"}'


def _routed(name: str) -> Routed:
    if name == "buffered":
        return Routed(
            ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"], POD, None, {**BASE_HEADERS}
        )
    if name == "buffered_rewrite_policies":
        headers = {**BASE_HEADERS, "authorization": ""}
        return Routed(
            ["10.0.0.1:8000"], POD, b'{"model":"up"}', headers, {"matrixinfer_rid": "r-1"}
        )
    if name == "duplex":
        return Routed(["10.0.0.1:8000", "10.0.0.2:8000"], POD, None, {**BASE_HEADERS})
    assert name == "duplex_rewrite"
    return Routed(["10.0.0.1:8000"], POD, b'{"model":"up"}', {**BASE_HEADERS})


# produced by the protobuf-object builder (commit 6fa2861; the envoy.lb usage mark added since),
# SerializeToString(deterministic=True)
GOLDEN = {
    "buffered": (
        "1acc010ac90112c6010a330a2f0a1e782d676174657761792d64657374696e6174696f6e2d656e64706f69"
        "6e741a0d31302e302e302e313a3830303018020a220a1e0a16782d676174657761792d6d6f64656c2d7365"
        "727665721a04706f6f6c18020a1c0a180a13782d656e766f792d6d61782d726574726965731a013218020a"
        "2d0a290a10782d656e766f792d72657472792d6f6e1a15636f6e6e6563742d6661696c7572652c72657365"
        "741802121e782d656e766f792d726574726961626c652d7374617475732d636f64657342780a760a08656e"
        "766f792e6c62126a2a680a170a116d6174726978696e6665725f7573616765120220010a4d0a1e782d6761"
        "74657761792d64657374696e6174696f6e2d656e64706f696e74122b1a2931302e302e302e313a38303030"
        "2c31302e302e302e323a383030302c31302e302e302e333a38303030"
    ),
    "buffered_rewrite_policies": (
        "1a87020a840212ef010a330a2f0a1e782d676174657761792d64657374696e6174696f6e2d656e64706f69"
        "6e741a0d31302e302e302e313a3830303018020a220a1e0a16782d676174657761792d6d6f64656c2d7365"
        "727665721a04706f6f6c18020a1c0a180a13782d656e766f792d6d61782d726574726965731a013218020a"
        "2d0a290a10782d656e766f792d72657472792d6f6e1a15636f6e6e6563742d6661696c7572652c72657365"
        "7418020a180a140a0e636f6e74656e742d6c656e6774681a0231341802121e782d656e766f792d72657472"
        "6961626c652d7374617475732d636f646573120d617574686f72697a6174696f6e1a100a0e7b226d6f6465"
        "6c223a227570227d42760a740a08656e766f792e6c6212682a660a180a0f6d6174726978696e6665725f72"
        "696412051a03722d310a170a116d6174726978696e6665725f7573616765120220010a310a1e782d676174"
        "657761792d64657374696e6174696f6e2d656e64706f696e74120f1a0d31302e302e302e313a38303030"
    ),
    "duplex": (
        "0acc010ac90112c6010a330a2f0a1e782d676174657761792d64657374696e6174696f6e2d656e64706f69"
        "6e741a0d31302e302e302e313a3830303018020a220a1e0a16782d676174657761792d6d6f64656c2d7365"
        "727665721a04706f6f6c18020a1c0a180a13782d656e766f792d6d61782d726574726965731a013218020a"
        "2d0a290a10782d656e766f792d72657472792d6f6e1a15636f6e6e6563742d6661696c7572652c72657365"
        "741802121e782d656e766f792d726574726961626c652d7374617475732d636f646573426a0a680a08656e"
        "766f792e6c62125c2a5a0a170a116d6174726978696e6665725f7573616765120220010a3f0a1e782d6761"
        "74657761792d64657374696e6174696f6e2d656e64706f696e74121d1a1b31302e302e302e313a38303030"
        "2c31302e302e302e323a38303030"
    ),
    "duplex_rewrite": (
        "0ae6010ae30112e0010a330a2f0a1e782d676174657761792d64657374696e6174696f6e2d656e64706f69"
        "6e741a0d31302e302e302e313a3830303018020a220a1e0a16782d676174657761792d6d6f64656c2d7365"
        "727665721a04706f6f6c18020a1c0a180a13782d656e766f792d6d61782d726574726965731a013218020a"
        "2d0a290a10782d656e766f792d72657472792d6f6e1a15636f6e6e6563742d6661696c7572652c72657365"
        "7418020a180a140a0e636f6e74656e742d6c656e6774681a0231341802121e782d656e766f792d72657472"
        "6961626c652d7374617475732d636f646573425c0a5a0a08656e766f792e6c62124e2a4c0a170a116d6174"
        "726978696e6665725f7573616765120220010a310a1e782d676174657761792d64657374696e6174696f6e"
        "2d656e64706f696e74120f1a0d31302e302e302e313a38303030"
    ),
}
GOLDEN_DUPLEX_BODY = {
    "duplex": "1a170a151a131a110a0d7b226d6f64656c223a226d227d1001",
    "duplex_rewrite": "1a180a161a141a120a0e7b226d6f64656c223a227570227d1001",
}
GOLDEN_CONTINUE = "0a00"
GOLDEN_IMMEDIATE_429 = (
    "3a6a0a0308ad03123c0a240a200a0c636f6e74656e742d747970651a106170706c69636174696f6e2f6a"
    "736f6e18020a140a100a0b72657472792d61667465721a013118021a0c7b226572726f72223a7b7d7d2a"
    "176d6174726978696e6665725f676174657761795f343239"
)
GOLDEN_TIMEOUT_2500MS = "520808021080cab5ee01"
GOLDEN_TRAILERS = "2a00"


# ---------------------------------------------------------------- the builders, message level


@pytest.mark.parametrize("name", list(GOLDEN))
def test_decision_reply_bytes_are_pinned(name: str) -> None:
    duplex = name.startswith("duplex")
    reply = from_decision(_routed(name), RAW, duplex)
    assert isinstance(reply, pb.ProcessingResponse)
    assert reply.SerializeToString(deterministic=True).hex() == GOLDEN[name]


def test_other_replies_are_pinned() -> None:
    imm = immediate_response(Immediate(429, b'{"error":{}}', headers={"retry-after": "1"}))
    assert imm.SerializeToString().hex() == GOLDEN_IMMEDIATE_429
    assert timeout_override(2.5).SerializeToString().hex() == GOLDEN_TIMEOUT_2500MS


def _reference(routed: Routed, raw: bytes, duplex: bool) -> bytes:
    """The reply as the protobuf-object builder made it (kept here as the specification)."""
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

    def opt(k: str, v: str) -> base_pb2.HeaderValueOption:
        hv = base_pb2.HeaderValue(key=k, raw_value=v.encode())
        return base_pb2.HeaderValueOption(header=hv, append_action=overwrite)

    headers = [opt("x-gateway-destination-endpoint", routed.endpoints[0])]
    headers.extend(opt(k, v) for k, v in routed.headers.items() if v)
    if routed.body is not None:
        headers.append(opt("content-length", str(len(routed.body))))
    removed = [k for k, v in routed.headers.items() if not v]
    common = pb.CommonResponse(
        header_mutation=pb.HeaderMutation(set_headers=headers, remove_headers=removed)
    )
    md = struct_pb2.Struct()
    lb: dict[str, Any] = {
        "x-gateway-destination-endpoint": ",".join(routed.endpoints),
        USAGE_KEY: True,  # every routed reply: Envoy's usage filters read the answer
    }
    lb.update(routed.metadata or {})
    md.update({"envoy.lb": lb})
    if duplex:
        msg = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=common), dynamic_metadata=md
        )
    else:
        if routed.body is not None:
            common.body_mutation.body = routed.body
        msg = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=common), dynamic_metadata=md
        )
    out: bytes = msg.SerializeToString(deterministic=True)
    return out


@pytest.mark.parametrize("duplex", [False, True])
def test_decision_replies_match_the_reference_builder(duplex: bool) -> None:
    """Randomised shapes: endpoints, header sets (set and removed), bodies (empty too),
    non-ASCII header values, long values (multi-byte length varints), metadata."""
    rnd = Random(7)
    for _ in range(300):
        endpoints = [
            f"10.{rnd.randint(0, 255)}.0.{i}:{rnd.randint(1, 65535)}"
            for i in range(rnd.randint(1, 9))
        ]
        headers = {}
        for j in range(rnd.randint(0, 6)):
            value = rnd.choice(["", "x", "ümlaut", "v" * rnd.randint(1, 300), str(j)])
            headers[f"x-h{j}"] = value
        body = rnd.choice([None, b"", b"{}", b"b" * rnd.randint(1, 70000)])
        metadata = rnd.choice(
            [
                None,
                {"matrixinfer_rid": f"rid-{rnd.random()}"},
                {"a": "1", "zz": "é"},
                {
                    "matrixinfer_rid": "r",
                    "matrixinfer_charge": "c" * 200,
                    "matrixinfer_strip": True,
                },
                {"n": 1.5, "l": ["x", 2], "d": {"k": None}},
            ]
        )
        routed = Routed(endpoints, POD, body, headers, metadata)
        want = _reference(routed, RAW, duplex)
        assert decision_bytes(routed, duplex) == want  # the raw bytes written on h2
        got = from_decision(routed, RAW, duplex).SerializeToString(deterministic=True)
        assert got == want


# ---------------------------------------------------------------- through Process


class _FakeGateway:
    """Answers every request with one fixed decision (the servicer's job is only the replies)."""

    tracing = None

    def __init__(self, decision: Routed | Immediate) -> None:
        self.decision = decision
        self.calls: list[str] = []

    def start(
        self,
        headers: dict[str, str],
        end_of_stream: bool,
        subset: frozenset[str] | None = None,
        metadata: Any = (),
    ) -> tuple[RequestState, None]:
        self.calls.append("start")
        return RequestState("r1", 0.0, dict(headers)), None

    async def decide(self, state: RequestState, raw: bytes) -> Routed | Immediate:
        self.calls.append(f"decide:{len(raw)}")
        return self.decision

    def too_large(self, state: RequestState, size: int) -> Immediate:
        return Immediate(413, b'{"error":"big"}')

    def routed(self, state: RequestState) -> None:
        self.calls.append("routed")

    def finish(self, state: RequestState) -> None:
        self.calls.append("finish")


class _AioLikeContext:
    """read()/write() of messages, as grpc.aio gives the handler."""

    def __init__(self, requests: list[pb.ProcessingRequest]) -> None:
        self.requests = list(requests)
        self.sent: list[bytes] = []

    async def read(self) -> Any:
        return self.requests.pop(0) if self.requests else grpc.aio.EOF

    async def write(self, message: pb.ProcessingResponse) -> None:
        assert isinstance(message, pb.ProcessingResponse)
        self.sent.append(message.SerializeToString(deterministic=True))


class _H2LikeContext(_AioLikeContext):
    """Also takes pre-serialised replies, as extproc.transport_h2's StreamContext does."""

    def write_raw(self, payload: bytes) -> None:
        assert isinstance(payload, bytes)
        self.sent.append(payload)


def _headers_msg(end_of_stream: bool = False) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest()
    for k, v in ((":method", "POST"), (":path", "/v1/chat/completions"), ("x-request-id", "r1")):
        req.request_headers.headers.headers.add(key=k, raw_value=v.encode())
    req.request_headers.end_of_stream = end_of_stream
    return req


def _body_msgs(raw: bytes, chunks: int) -> list[pb.ProcessingRequest]:
    step = max(1, len(raw) // chunks)
    parts = [raw[i : i + step] for i in range(0, len(raw), step)]
    out = []
    for i, part in enumerate(parts):
        out.append(
            pb.ProcessingRequest(
                request_body=pb.HttpBody(body=part, end_of_stream=i == len(parts) - 1)
            )
        )
    return out


async def _run(
    ctx_cls: type[_AioLikeContext],
    decision: Routed | Immediate,
    body_mode: str,
    requests: list[pb.ProcessingRequest],
    body_limit: int = 1 << 20,
) -> tuple[list[str], list[str]]:
    gw = _FakeGateway(decision)
    servicer = ExtProcServicer(gw, body_mode=body_mode, body_limit=body_limit)  # type: ignore[arg-type]
    ctx = ctx_cls(requests)
    await servicer.Process(None, ctx)
    return [s.hex() for s in ctx.sent], gw.calls


CONTEXTS = [_AioLikeContext, _H2LikeContext]


@pytest.mark.parametrize("ctx_cls", CONTEXTS)
@pytest.mark.parametrize("name", ["buffered", "buffered_rewrite_policies"])
async def test_process_buffered_sends_continue_then_the_pinned_decision(
    ctx_cls: type[_AioLikeContext], name: str
) -> None:
    sent, calls = await _run(
        ctx_cls, _routed(name), "BUFFERED", [_headers_msg(), *_body_msgs(RAW, 1)]
    )
    assert sent == [GOLDEN_CONTINUE, GOLDEN[name]]
    assert calls == ["start", f"decide:{len(RAW)}", "routed", "finish"]


@pytest.mark.parametrize("ctx_cls", CONTEXTS)
@pytest.mark.parametrize("name", ["duplex", "duplex_rewrite"])
async def test_process_duplex_sends_headers_and_body_after_the_last_chunk(
    ctx_cls: type[_AioLikeContext], name: str
) -> None:
    sent, calls = await _run(
        ctx_cls, _routed(name), "FULL_DUPLEX_STREAMED", [_headers_msg(), *_body_msgs(RAW, 3)]
    )
    assert sent == [GOLDEN[name], GOLDEN_DUPLEX_BODY[name]]
    assert calls == ["start", f"decide:{len(RAW)}", "routed", "finish"]


@pytest.mark.parametrize("ctx_cls", CONTEXTS)
async def test_process_immediate_and_trailers_and_too_large(ctx_cls: type[_AioLikeContext]) -> None:
    imm = Immediate(429, b'{"error":{}}', headers={"retry-after": "1"})
    sent, calls = await _run(ctx_cls, imm, "BUFFERED", [_headers_msg(), *_body_msgs(RAW, 1)])
    assert sent == [GOLDEN_CONTINUE, GOLDEN_IMMEDIATE_429]
    assert calls == ["start", f"decide:{len(RAW)}", "finish"]

    trailers = pb.ProcessingRequest(request_trailers=pb.HttpTrailers())
    sent, _ = await _run(
        ctx_cls, _routed("buffered"), "BUFFERED", [_headers_msg(), *_body_msgs(RAW, 1), trailers]
    )
    assert sent == [GOLDEN_CONTINUE, GOLDEN["buffered"], GOLDEN_TRAILERS]

    sent, calls = await _run(
        ctx_cls,
        _routed("buffered"),
        "BUFFERED",
        [_headers_msg(), *_body_msgs(RAW, 1)],
        body_limit=4,
    )
    expected = immediate_response(Immediate(413, b'{"error":"big"}')).SerializeToString().hex()
    assert sent == [GOLDEN_CONTINUE, expected]
    assert "routed" not in calls


# ---------------------------------------------------------------- real gateway, end to end


ROUTES = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  modelName: chat
  rules: [{targets: [{modelServerName: pool}]}]
"""


@pytest.mark.parametrize("ctx_cls", CONTEXTS)
async def test_real_gateway_reply_fields(ctx_cls: type[_AioLikeContext]) -> None:
    """Pods with different in-flight counts make the ranking deterministic: p2, p1, p0."""
    ds = Datastore()
    pods = [(f"p{i}", f"10.0.0.{i}:8000", {"app": "chat"}) for i in range(3)]
    ds.apply(config(server_yaml("pool", {"app": "chat"}, model="up/chat") + "---\n" + ROUTES, pods))
    for name, extra in (("p0", 2), ("p1", 1)):
        for _ in range(extra):
            ds.begin(ds.snapshot.pods[name])
    gw = Gateway(ds, GatewayMetrics(), rng=Random(3))
    servicer = ExtProcServicer(gw)
    body = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    ctx = ctx_cls([_headers_msg(), *_body_msgs(body, 1)])
    await servicer.Process(None, ctx)
    assert ctx.sent[0].hex() == GOLDEN_CONTINUE
    reply = pb.ProcessingResponse.FromString(ctx.sent[1])
    common = reply.request_body.response
    set_headers = [
        (h.header.key, h.header.raw_value.decode(), h.append_action)
        for h in common.header_mutation.set_headers
    ]
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    rewritten = orjson.dumps({"model": "up/chat", "messages": [{"role": "user", "content": "hi"}]})
    assert set_headers[0] == ("x-gateway-destination-endpoint", "10.0.0.2:8000", overwrite)
    assert ("x-gateway-model-server", "pool", overwrite) in set_headers
    assert set_headers[-1] == ("content-length", str(len(rewritten)), overwrite)
    assert list(common.header_mutation.remove_headers) == [
        "x-gateway-lora",  # no adapter: a client's copy is removed
        "x-envoy-retriable-status-codes",
        "x-matrixinfer-prefill-endpoint",  # no PD pairing: a client's copy is removed
    ]
    assert common.body_mutation.body == rewritten
    lb = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert (
        lb["x-gateway-destination-endpoint"].string_value
        == "10.0.0.2:8000,10.0.0.1:8000,10.0.0.0:8000"
    )
    assert ds.in_flight_total() == 3  # the stream ended: back to the two + one set up above


@pytest.mark.parametrize("duplex", [False, True])
def test_kept_replies_follow_endpoints_and_headers(duplex: bool) -> None:
    """Replies without a body or metadata are kept by (endpoints, headers): every change of
    either gives the reference bytes again, a repeat gives the same bytes."""
    rnd = Random(3)
    for _ in range(400):
        endpoints = [f"10.0.0.{i}:80" for i in rnd.sample(range(5), rnd.randint(1, 3))]
        headers = {k: rnd.choice(["", "1", "2"]) for k in rnd.sample(["x-a", "x-b", "x-c"], 2)}
        routed = Routed(endpoints, POD, None, headers)
        assert decision_bytes(routed, duplex) == _reference(routed, RAW, duplex)
