"""Throwaway do-nothing ext_proc servers, one per transport/handler style (not product code).

Every variant answers the same protocol as the gateway in BUFFERED mode: the request headers get
an empty ``HeadersResponse``, the request body gets a ``BodyResponse`` that sets
``x-gateway-destination-endpoint`` plus the ``envoy.lb`` dynamic metadata. So Envoy routes every
request to ``DEST`` and the difference between variants is the Python-side transport cost only.

``python -m bench.experiments.servers VARIANT PORT DEST [--no-uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Iterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bench.gateway_overhead import routing_replies

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
# ProcessingRequest oneof field numbers
REQUEST_HEADERS, REQUEST_BODY, REQUEST_TRAILERS = 2, 4, 6

# the first run also had max_concurrent_streams 4096, enable_retries 0 and
# keepalive_permit_without_calls 1 (no effect expected on a server); these two are what landed
OPTIONS_TUNED = [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.optimization_target", "throughput"),
]


def kind_of(raw: bytes) -> int:
    """The ProcessingRequest oneof field number, from the wire bytes (skips other fields)."""
    i, n = 0, len(raw)
    while i < n:
        tag, i = _varint(raw, i)
        field, wire = tag >> 3, tag & 7
        if 2 <= field <= 7:
            return field
        if wire == 0:
            _, i = _varint(raw, i)
        elif wire == 2:
            length, i = _varint(raw, i)
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            return 0
    return 0


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    b = raw[i]
    if b < 0x80:
        return b, i + 1
    result, shift = 0, 0
    while True:
        b = raw[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


# ------------------------------------------------------------------------------ grpc.aio


def aio_pb(dest: str) -> grpc.GenericRpcHandler:
    headers_reply, body_reply = routing_replies(dest)

    class Servicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, request_iterator: object, context: Any) -> None:
            read, write = context.read, context.write
            while True:
                req = await read()
                if req is grpc.aio.EOF:
                    return
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    await write(headers_reply)
                elif kind == "request_body":
                    await write(body_reply)

    return Servicer()


def aio_pbgen(dest: str) -> Any:
    headers_reply, body_reply = routing_replies(dest)

    class Servicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, request_iterator: Any, context: Any) -> Any:
            async for req in request_iterator:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    yield headers_reply
                elif kind == "request_body":
                    yield body_reply

    return Servicer()


def raw_handler(dest: str, fn: Any) -> grpc.GenericRpcHandler:
    """A generic handler with bytes in and bytes out (no (de)serialisation by grpc)."""
    handler = grpc.stream_stream_rpc_method_handler(fn)
    return grpc.method_handlers_generic_handler(
        "envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}
    )


def aio_raw(dest: str) -> grpc.GenericRpcHandler:
    h, b = (m.SerializeToString() for m in routing_replies(dest))

    async def process(request_iterator: object, context: Any) -> None:
        read, write = context.read, context.write
        while True:
            raw = await read()
            if raw is grpc.aio.EOF:
                return
            kind = kind_of(raw)
            if kind == REQUEST_HEADERS:
                await write(h)
            elif kind == REQUEST_BODY:
                await write(b)

    return raw_handler(dest, process)


def sync_raw(dest: str) -> grpc.GenericRpcHandler:
    h, b = (m.SerializeToString() for m in routing_replies(dest))

    def process(request_iterator: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for raw in request_iterator:
            kind = kind_of(raw)
            if kind == REQUEST_HEADERS:
                yield h
            elif kind == REQUEST_BODY:
                yield b

    return raw_handler(dest, process)


def serve_grpc(variant: str, port: int, dest: str, options: list[tuple[str, Any]]) -> None:
    if variant == "sync-raw":
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(max_workers=128), options=options)
        server.add_generic_rpc_handlers((sync_raw(dest),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return

    async def run() -> None:
        server = grpc.aio.server(options=options)
        if variant == "aio-pb":
            pb_grpc.add_ExternalProcessorServicer_to_server(aio_pb(dest), server)
        elif variant == "aio-pbgen":
            pb_grpc.add_ExternalProcessorServicer_to_server(aio_pbgen(dest), server)
        elif variant == "aio-raw":
            server.add_generic_rpc_handlers((aio_raw(dest),))
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def serve_h2lib(port: int, servicer: Any) -> None:

    from extproc.transport_h2 import PROCESS_PATH, GrpcMethod, H2Server

    async def run() -> None:
        server = H2Server(
            {PROCESS_PATH: GrpcMethod(servicer.Process, pb.ProcessingRequest.FromString)}
        )
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(run())


VARIANTS = ("aio-pb", "aio-pbgen", "aio-raw", "sync-raw", "h2", "h2lib")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.servers")
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("port", type=int)
    p.add_argument("dest")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--tuned", action="store_true", help="grpc server options OPTIONS_TUNED")
    p.add_argument("--gc-freeze", action="store_true")
    p.add_argument("--inline", action="store_true", help="h2: InlineDriver instead of a Task")
    args = p.parse_args(argv)
    if not args.no_uvloop:
        import uvloop

        uvloop.install()
    if args.gc_freeze:
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
    if args.variant == "h2lib":  # the product's extproc.transport_h2 (h2 library)
        serve_h2lib(args.port, aio_pb(args.dest))
        return 0
    if args.variant == "h2":
        from bench.experiments.h2_extproc import serve_h2

        serve_h2(args.port, aio_pb(args.dest), inline=args.inline)
        return 0
    serve_grpc(args.variant, args.port, args.dest, OPTIONS_TUNED if args.tuned else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
