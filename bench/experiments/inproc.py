"""Per-request CPU of the servicer + gateway without gRPC (not product code).

``python -m bench.experiments.inproc [--n 20000]``: the bench's configuration (4 pods, one
ModelServer/ModelRoute), the real ``ExtProcServicer.Process`` driven by a fake context that hands
it a request-headers and a request-body message and swallows the replies: once like grpc.aio
(messages written and serialised), once like ``extproc.transport_h2`` (``write_raw`` bytes).
Best of 5 rounds, CPU time (``time.process_time``) per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.gateway_overhead import UPSTREAM_HOSTS, gateway_config, request_body
from extproc.datastore import Datastore
from extproc.gateway import Gateway
from extproc.metrics import GatewayMetrics
from extproc.transport.grpc_servicer import ExtProcServicer
from fleet.config import GatewayConfig
from fleet.files import ConfigWatcher


def messages(body: bytes, extra: Sequence[tuple[str, str]] = ()) -> list[pb.ProcessingRequest]:
    """The request-headers and request-body messages Envoy sends for a chat request (``extra``
    headers appended)."""
    hdrs = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gw"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("user-agent", "wrk"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "b1c4e3a0-1111-2222-3333-444455556666"),
        *extra,
    ]
    h = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hdrs]
            )
        )
    )
    b = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    return [h, b]  # fmt: skip


class FakeContext:
    def __init__(self, wire: list[bytes]) -> None:
        self.wire = wire
        self.i = 0
        self.out = 0

    async def read(self) -> Any:
        if self.i == len(self.wire):
            return grpc.aio.EOF
        self.i += 1
        return pb.ProcessingRequest.FromString(self.wire[self.i - 1])

    async def write(self, msg: Any) -> None:
        self.out += len(msg.SerializeToString())


class RawFakeContext(FakeContext):
    """Also takes serialised replies (``write_raw``), as ``extproc.transport_h2`` does."""

    def write_raw(self, payload: bytes) -> None:
        self.out += len(payload)


async def rounds(
    servicer: ExtProcServicer, wire: list[bytes], n: int, context: type[FakeContext]
) -> list[float]:
    best = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            await servicer.Process(None, context(wire))  # type: ignore[arg-type, unused-ignore]
        best.append((time.process_time() - t0) / n * 1e6)
    return best


def bench_servicer(tmp: Path) -> ExtProcServicer:
    """The real servicer + gateway on the overhead benchmark's configuration (4 pods)."""
    config = gateway_config(tmp, 8080)
    ds = Datastore()

    def apply(c: GatewayConfig) -> None:
        ds.apply(c)

    watcher = ConfigWatcher(config, apply)
    assert watcher.load_now()
    return ExtProcServicer(Gateway(ds, GatewayMetrics()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.inproc")
    p.add_argument("--n", type=int, default=20000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        servicer = bench_servicer(Path(tmp))
        wire = [m.SerializeToString() for m in messages(request_body())]
        for label, context in (
            ("grpc.aio-like context", FakeContext),
            ("h2-transport-like context (write_raw)", RawFakeContext),
        ):
            us = asyncio.run(rounds(servicer, wire, args.n, context))
            print(f"servicer+gateway (incl. protobuf parse/serialise), {len(UPSTREAM_HOSTS)} pods,"
                  f" {label}: best {min(us):.1f} us/request,"
                  f" rounds {', '.join(f'{x:.1f}' for x in us)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
