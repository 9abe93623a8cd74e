"""The extproc HTTP side port: /metrics, /healthz, /readyz, and /debug/state (the datastore) when
asked for (``--debug-state``: it shows every pod's address and the configuration's errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["build_app"]


def build_app(
    registry: CollectorRegistry,
    state: Callable[[], dict[str, Any]],
    ready: Callable[[], tuple[bool, str]],
    *,
    debug_state: bool = False,
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = ready()
        return web.Response(text=reason + "\n", status=200 if ok else 503)

    async def debug_state_handler(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(state(), option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if debug_state:
        app.router.add_get("/debug/state", debug_state_handler)
    return app
