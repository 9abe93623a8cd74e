"""PROTOTYPE: the real MatrixInfer extproc (config, datastore, scheduler, scraper, HTTP side) with
its ext_proc served by ``bench.experiments.h2_extproc`` instead of grpc.aio (not product code).

Same command line as ``matrixinfer-extproc`` (BUFFERED only); the run driver starts it for the
``real-h2`` variant. The per-message logic mirrors ``extproc.servicer.ExtProcServicer.Process``
and reuses its reply builders, so the CPU difference is the transport.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.experiments.h2_extproc import H2ExtProc
from extproc.gateway import Gateway, Immediate, RequestState
from extproc.http_side import build_app
from extproc.main import ExtProcApp, parse_args
from extproc.servicer import _CONTINUE_HEADERS, _headers_of, from_decision, immediate_response

CONTINUE = _CONTINUE_HEADERS.SerializeToString()


class Slot:
    __slots__ = ("done", "state")

    def __init__(self) -> None:
        self.state: RequestState | None = None
        self.done = False


class GatewayHandler:
    def __init__(self, gateway: Gateway, body_limit: int) -> None:
        self.gateway = gateway
        self.body_limit = body_limit

    def begin(self, sid: int) -> Slot:
        return Slot()

    def message(self, slot: Slot, raw: bytes) -> list[bytes]:
        if slot.done:
            return []
        req = pb.ProcessingRequest.FromString(raw)
        kind = req.WhichOneof("request")
        gw = self.gateway
        if kind == "request_headers":
            state, answer = gw.start(
                _headers_of(req.request_headers), req.request_headers.end_of_stream
            )
            slot.state = state
            if answer is not None:
                slot.done = True
                return [immediate_response(answer).SerializeToString()]
            return [CONTINUE]
        if kind == "request_body" and slot.state is not None:
            body = req.request_body.body
            if len(body) > self.body_limit:
                slot.done = True
                return [immediate_response(gw.too_large(slot.state, len(body))).SerializeToString()]
            decision = gw.decide(slot.state, body)
            slot.done = True
            if isinstance(decision, Immediate):
                return [immediate_response(decision).SerializeToString()]
            out = from_decision(decision, body, False).SerializeToString()
            gw.routed(slot.state)
            return [out]
        return []

    def end(self, slot: Slot) -> None:
        if slot.state is not None:
            self.gateway.finish(slot.state)


async def run(argv: list[str]) -> None:
    args = parse_args(argv)
    app = ExtProcApp(args)
    app.watcher.load_now()
    loop = asyncio.get_running_loop()
    handler = GatewayHandler(app.gateway, args.body_limit)
    server = await loop.create_server(lambda: H2ExtProc(handler), args.host, args.grpc_port)
    runner = web.AppRunner(build_app(app.metrics.registry, app.state, app.ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.http_port).start()
    app.watcher.start()
    app._start_scraper()
    if app.scraper is not None:
        await app.scraper.start()
    async with server:
        await server.serve_forever()


def main() -> None:
    import uvloop

    uvloop.install()
    asyncio.run(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
    _ = Any
