"""PROTOTYPE: the real MatrixInfer extproc (config, datastore, gateway, unchanged
``ExtProcServicer``, scraper, HTTP side) with its ext_proc served by
``bench.experiments.h2_extproc`` instead of grpc.aio (not product code).

Same command line as ``matrixinfer-extproc``; the run driver starts it for the ``real-h2``
variant. Only the transport differs from ``extproc.main``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from bench.experiments.h2_extproc import start_h2
from extproc.http_side import build_app
from extproc.main import ExtProcApp, parse_args
from extproc.servicer import ExtProcServicer


async def run(argv: list[str]) -> None:
    inline = "--inline" in argv  # experiment: InlineDriver instead of a Task per stream
    args = parse_args([a for a in argv if a != "--inline"])
    app = ExtProcApp(args)
    app.watcher.load_now()
    servicer = ExtProcServicer(app.gateway, body_mode=args.body_mode, body_limit=args.body_limit)
    server = await start_h2(servicer, args.host, args.grpc_port, inline)
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
