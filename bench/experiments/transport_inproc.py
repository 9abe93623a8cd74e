"""CPU per request of the h2 transport + servicer + gateway, in one process (not product code).

``python -m bench.experiments.transport_inproc [--streams 16] [--batches 400]``: the bench's
configuration (4 pods, one ModelServer/ModelRoute, as ``bench.experiments.inproc``), the real
``extproc.transport.h2`` connection on a fake socket, fed by python-hyper's ``h2`` client the way
Envoy feeds it: ``--streams`` streams at a time each send their request-headers message, then
their request-body message, then a RST_STREAM (``--end end-stream`` half-closes instead). Only the
server side's CPU is counted (``time.thread_time`` around its callbacks and the event-loop turns
that run the handlers); the first quarter of the batches is warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.experiments.inproc import bench_servicer, messages
from bench.gateway_overhead import request_body
from extproc.transport import h2 as transport


class FakeSocket:
    """What the connection writes; the peer's address."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        pass


def framed(message: Any) -> bytes:
    raw: bytes = message.SerializeToString()
    return b"\x00" + len(raw).to_bytes(4, "big") + raw


async def measure(streams: int, batches: int, end: str) -> tuple[float, float]:
    """(server CPU µs per request, replies per request)."""
    servicer = bench_servicer(Path(tempfile.mkdtemp(prefix="transport-inproc-")))
    methods = {
        transport.PROCESS_PATH: transport.GrpcMethod(
            servicer.Process, pb.ProcessingRequest.FromString
        )
    }
    server = transport.H2Server(methods)
    conn = transport._Connection(server)
    sock = FakeSocket()
    conn.connection_made(sock)  # type: ignore[arg-type]
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    headers_msg, body_msg = (framed(m) for m in messages(request_body()))
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", transport.PROCESS_PATH.encode()),
        (b":authority", b"extproc"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    cpu = 0.0
    replies = 0

    async def to_server() -> None:
        nonlocal cpu
        data = client.data_to_send()
        t0 = time.thread_time()
        conn.data_received(data)
        for _ in range(6):  # the handlers' steps, the done callbacks, the flush
            await asyncio.sleep(0)
        cpu += time.thread_time() - t0

    def to_client() -> None:
        nonlocal replies
        data = b"".join(sock.out)
        sock.out.clear()
        for ev in client.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None
                client.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                replies += 1

    await to_server()
    to_client()
    sid, requests = 1, 0
    for batch in range(batches):
        if batch == batches // 4:
            cpu, replies, requests = 0.0, 0, 0
        sids = list(range(sid, sid + 2 * streams, 2))
        sid += 2 * streams
        for s in sids:
            client.send_headers(s, headers)
            client.send_data(s, headers_msg)
        await to_server()
        to_client()
        for s in sids:
            client.send_data(s, body_msg)
        await to_server()
        to_client()
        for s in sids:
            if end == "rst":
                client.reset_stream(s, 8)
            else:
                client.end_stream(s)
        await to_server()
        to_client()
        requests += streams
    return cpu / requests * 1e6, replies / requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.transport_inproc")
    p.add_argument("--streams", type=int, default=16, help="streams at a time (default 16)")
    p.add_argument("--batches", type=int, default=400, help="batches of streams (default 400)")
    p.add_argument("--end", choices=("rst", "end-stream"), default="rst", help="default rst")
    p.add_argument("--repeat", type=int, default=3, help="runs; each is printed (default 3)")
    args = p.parse_args(argv)
    uvloop.install()
    for _ in range(args.repeat):
        us, replies = asyncio.run(measure(args.streams, args.batches, args.end))
        print(
            f"h2 transport + servicer + gateway, {args.streams} streams at a time: "
            f"{us:.1f} us CPU per request ({replies:.2f} replies per request)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
