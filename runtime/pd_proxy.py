"""``matrixinfer-pd-proxy``: the PD proxy beside a decode engine (prefill/decode serving).

Envoy sends a PD ModelServer's request to the chosen decode pod's proxy with the chosen prefill
pods in ``x-matrixinfer-prefill-endpoint`` (``fleet.pd``; set by the extproc, never by a
client). The proxy runs the prefill step on the first of them, then the decode step on its own
engine, and streams the engine's answer back unchanged — so Envoy, usage accounting, rate limits,
the queue and the access log see one request. How the KV cache travels depends on the connector
(``ModelServer.spec.kvConnector.type``; docs/pd.md):

- ``nixl``, ``mooncake``, ``lmcache`` (vLLM KV connectors): the prefill request carries
  ``kv_transfer_params: {do_remote_decode: true, ...}``, ``max_tokens: 1`` and no streaming; the
  prefill engine's answer carries ``kv_transfer_params`` (remote engine id, block ids, host,
  port), which the decode request carries as is. ``nixl`` and ``mooncake`` require them;
  ``lmcache`` passes them on when present (its own sender moves the KV cache).
- ``sglang``: both requests get the same ``bootstrap_host`` (the prefill pod), ``bootstrap_port``
  and a random ``bootstrap_room`` and are sent at once; the decode answer is streamed once the
  prefill answered.
- ``http``: a plain two-step handoff: the prompt is prefilled (``max_tokens: 1``), then the decode
  engine gets the unchanged request (it takes the prompt again, e.g. from a shared KV store).

A prefill pod that fails (connection, non-200, no transfer parameters) or times out is retried
once on the next prefill pod of the header; when that fails too, or the header names none, the
decode engine serves the request alone (aggregated) and ``matrixinfer_pd_fallbacks_total``
counts it. A client that goes away cancels both sides (the handler is cancelled and closes both
upstream connections).

Everything else (``/metrics``, ``/health``, ``/v1/models``, ...) is passed to the engine;
``/metrics`` adds the proxy's own ``matrixinfer_pd_*`` series to the engine's, and
``/debug/state`` lists the recent handoffs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fleet.pd import PREFILL_HEADER, parse_prefill
from fleet.service import (
    HelpFormatter,
    add_service_args,
    configure_logging,
    duration,
    signalled_stop,
)

__all__ = ["CONNECTORS", "PDProxy", "ProxySettings", "decode_request", "main", "prefill_request"]

log = logging.getLogger("matrixinfer.pd_proxy")

Connector = Literal["nixl", "mooncake", "lmcache", "sglang", "http"]
CONNECTORS: tuple[Connector, ...] = ("nixl", "mooncake", "lmcache", "sglang", "http")
VLLM_CONNECTORS = frozenset({"nixl", "mooncake", "lmcache"})
# connectors whose decode step cannot start without the prefill answer's kv_transfer_params
# (LMCache moves the KV cache through its own store/sender, keyed by the prompt: the parameters
# are passed on when the prefill engine returns some, but a missing set is no failure)
TRANSFER_REQUIRED = frozenset({"nixl", "mooncake"})
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
ATTEMPTS = 2  # the pick and one retry on the next prefill pod
RECENT = 200  # handoffs kept for /debug/state

# request headers not passed to an engine (hop-by-hop, recomputed, or the gateway's own)
_DROP_REQUEST = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect",
     PREFILL_HEADER}
)  # fmt: skip
_DROP_RESPONSE = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)


# ---- the connectors' request bodies (pure) --------------------------------------------------
def prefill_request(
    connector: Connector, body: dict[str, Any], bootstrap: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The prefill step's body: one token, no streaming, plus the connector's fields."""
    out = dict(body)
    out["stream"] = False
    out.pop("stream_options", None)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    if connector in VLLM_CONNECTORS:
        out["kv_transfer_params"] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        }
    elif connector == "sglang" and bootstrap is not None:
        out.update(bootstrap)
    return out


def decode_request(
    connector: Connector,
    body: dict[str, Any],
    transfer: dict[str, Any] | None = None,
    bootstrap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The decode step's body: the client's request plus what the prefill step handed over."""
    out = dict(body)
    if connector in VLLM_CONNECTORS and transfer is not None:
        out["kv_transfer_params"] = transfer
    elif connector == "sglang" and bootstrap is not None:
        out.update(bootstrap)
    return out


def bootstrap_fields(prefill: str, port: int, rng: random.Random) -> dict[str, Any]:
    """SGLang's bootstrap fields for a handoff from the prefill pod at ``prefill`` (ip:port)."""
    return {
        "bootstrap_host": prefill.rsplit(":", 1)[0],
        "bootstrap_port": port,
        "bootstrap_room": rng.getrandbits(63),
    }


class PrefillFailed(Exception):
    """The prefill step did not hand over (its message says why)."""


# ---- the proxy ---------------------------------------------------------------------------------
@dataclass(slots=True)
class ProxySettings:
    engine: str  # the decode engine's base URL, e.g. http://127.0.0.1:8000
    connector: Connector = "nixl"
    pod_name: str = ""
    prefill_timeout: float = 30.0
    bootstrap_port: int = 8998  # SGLang's --disaggregation-bootstrap-port on prefill pods


@dataclass(slots=True)
class Handoff:
    """One request's prefill/decode pair, for logs and /debug/state."""

    requestId: str
    decode: str
    prefill: str | None = None
    outcome: str = "paired"  # paired | fallback
    attempts: list[str] = field(default_factory=list)  # "ip:port: error" of failed prefills
    handoffSeconds: float | None = None


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "matrixinfer_pd_requests", "Requests by outcome: paired (prefill handed over) or"
            " fallback (decoded without remote prefill).", ["connector", "outcome"], registry=r,
        )  # fmt: skip
        self.handoff = Histogram(
            "matrixinfer_pd_handoff_seconds",
            "From the request's arrival to the decode step's start (the prefill step and the KV"
            " handover parameters).", ["connector"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.fallbacks = Counter(
            "matrixinfer_pd_fallbacks", "Requests decoded without remote prefill, by reason:"
            " no_prefill_endpoint (the header named none) or prefill_failed (every attempt"
            " failed).", ["reason"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "matrixinfer_pd_prefill_retries",
            "Prefill steps retried on the next prefill pod after a failure.",
            registry=r,
        )


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "code": status}}
    return web.json_response(body, status=status)


class PDProxy:
    def __init__(self, settings: ProxySettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.metrics = ProxyMetrics()
        self.recent: deque[Handoff] = deque(maxlen=RECENT)
        self.rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None

    # ---- the app ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in GENERATE_PATHS:
            app.router.add_post(path, self.generate)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/debug/state", self.state_handler)
        app.router.add_route("*", "/{tail:.*}", self.passthrough)
        app.on_cleanup.append(self._close)
        return app

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=5),
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,
            )
        return self._session

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    # ---- generate: prefill there, decode here -------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        began = time.monotonic()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return _error(400, f"the request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        try:
            prefills = parse_prefill(request.headers.get(PREFILL_HEADER))
        except ValueError as exc:
            return _error(400, str(exc))
        s = self.settings
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        handoff = Handoff(rid, s.pod_name)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        path = request.path
        try:
            if s.connector == "sglang":
                upstream = await self._sglang(path, body, prefills, headers, handoff)
            else:
                decode = await self._two_step(path, body, prefills, headers, handoff)
                upstream = await self._open(f"{s.engine}{path}", decode, headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("request %s: the decode engine failed: %s", rid, exc,
                        extra={"request_id": rid})  # fmt: skip
            return _error(502, f"the decode engine at {s.engine} failed: {exc}")
        self._record(handoff, time.monotonic() - began, len(prefills))
        return await self._relay(request, upstream)

    async def _two_step(
        self,
        path: str,
        body: dict[str, Any],
        prefills: list[str],
        headers: dict[str, str],
        handoff: Handoff,
    ) -> dict[str, Any]:
        """nixl / mooncake / lmcache / http: prefill (retried once), then the decode body."""
        connector = self.settings.connector
        for i, address in enumerate(prefills[:ATTEMPTS]):
            if i:
                self.metrics.retries.inc()
            try:
                answer = await self._prefill(address, path, prefill_request(connector, body),
                                             headers)  # fmt: skip
                transfer = answer.get("kv_transfer_params")
                if connector in TRANSFER_REQUIRED and not isinstance(transfer, dict):
                    raise PrefillFailed("its answer carries no kv_transfer_params")
            except (PrefillFailed, aiohttp.ClientError, TimeoutError) as exc:
                self._failed_attempt(handoff, address, exc)
                continue
            handoff.prefill = address
            return decode_request(connector, body, transfer if isinstance(transfer, dict) else None)
        return body

    async def _sglang(
        self,
        path: str,
        body: dict[str, Any],
        prefills: list[str],
        headers: dict[str, str],
        handoff: Handoff,
    ) -> aiohttp.ClientResponse:
        """sglang: prefill and decode at once with the same bootstrap room; on a failed prefill
        the decode request is cancelled and the next prefill pod tried."""
        s = self.settings
        for i, address in enumerate(prefills[:ATTEMPTS]):
            if i:
                self.metrics.retries.inc()
            boot = bootstrap_fields(address, s.bootstrap_port, self.rng)
            url = f"{s.engine}{path}"
            decode = asyncio.ensure_future(
                self._open(url, decode_request("sglang", body, bootstrap=boot), headers)
            )
            try:
                await self._prefill(address, path, prefill_request("sglang", body, boot), headers)
            except (PrefillFailed, aiohttp.ClientError, TimeoutError) as exc:
                self._failed_attempt(handoff, address, exc)
                await _discard(decode)
                continue
            except BaseException:
                await _discard(decode)
                raise
            handoff.prefill = address
            return await decode
        return await self._open(f"{s.engine}{path}", body, headers)

    async def _prefill(
        self, address: str, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.settings.prefill_timeout)
        try:
            async with self.session.post(
                f"http://{address}{path}", json=body, headers=headers, timeout=timeout
            ) as resp:
                text = await resp.read()
                if resp.status != 200:
                    raise PrefillFailed(
                        f"answered {resp.status}: {text[:200].decode(errors='replace')}"
                    )
        except TimeoutError:
            raise PrefillFailed(f"no answer within {self.settings.prefill_timeout:g}s") from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise PrefillFailed("its answer is not JSON") from None
        if not isinstance(answer, dict):
            raise PrefillFailed("its answer is not a JSON object")
        return answer

    def _failed_attempt(self, handoff: Handoff, address: str, exc: BaseException) -> None:
        why = str(exc) or type(exc).__name__
        handoff.attempts.append(f"{address}: {why}")
        log.warning("request %s: prefill on %s failed: %s", handoff.requestId, address, why,
                    extra={"request_id": handoff.requestId})  # fmt: skip

    async def _open(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        return await self.session.post(url, json=body, headers=headers)

    def _record(self, handoff: Handoff, seconds: float, offered: int) -> None:
        m, connector = self.metrics, self.settings.connector
        if handoff.prefill is None:
            handoff.outcome = "fallback"
            reason = "no_prefill_endpoint" if offered == 0 else "prefill_failed"
            m.fallbacks.labels(reason).inc()
            log.warning(
                "request %s: decoded on %s without remote prefill (%s)%s",
                handoff.requestId, handoff.decode, reason,
                f": {'; '.join(handoff.attempts)}" if handoff.attempts else "",
                extra={"request_id": handoff.requestId, "pod": handoff.decode},
            )  # fmt: skip
        else:
            handoff.handoffSeconds = round(seconds, 6)
            m.handoff.labels(connector).observe(seconds)
            log.info(
                "request %s: prefill %s -> decode %s (%s), handoff %.3fs",
                handoff.requestId, handoff.prefill, handoff.decode, connector, seconds,
                extra={"request_id": handoff.requestId, "pod": handoff.decode,
                       "prefill": handoff.prefill},
            )  # fmt: skip
        m.requests.labels(connector, handoff.outcome).inc()
        self.recent.append(handoff)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream ``upstream`` back unchanged; closing it (also on cancel) aborts the engine's
        request."""
        try:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in _DROP_RESPONSE:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        finally:
            upstream.close()

    # ---- everything else -----------------------------------------------------------------------
    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        data = await request.read()
        try:
            upstream = await self.session.request(
                request.method, f"{self.settings.engine}{request.path_qs}", data=data or None,
                headers=headers,
            )  # fmt: skip
        except aiohttp.ClientError as exc:
            return _error(502, f"the decode engine at {self.settings.engine} failed: {exc}")
        return await self._relay(request, upstream)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """The engine's metrics, then the proxy's (the gateway scrapes the decode pod here)."""
        own = generate_latest(self.metrics.registry)
        engine = b""
        status = 200
        try:
            async with self.session.get(
                f"{self.settings.engine}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                engine = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 503
        if status != 200:
            return web.Response(status=503, body=own, content_type="text/plain")
        if engine and not engine.endswith(b"\n"):
            engine += b"\n"
        return web.Response(body=engine + own, content_type="text/plain", charset="utf-8")

    async def state_handler(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response(
            {
                "pod": s.pod_name,
                "engine": s.engine,
                "connector": s.connector,
                "recent": [asdict(h) for h in self.recent],
            }
        )


async def _discard(task: asyncio.Future[aiohttp.ClientResponse]) -> None:
    """Cancel an opened (or opening) decode request and close its response."""
    task.cancel()
    with contextlib.suppress(BaseException):
        resp = await task
        resp.close()


# ---- command line --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matrixinfer-pd-proxy",
        description="The PD proxy beside a decode engine: prefill on the pod the gateway chose,"
        " decode here, stream the answer back (docs/pd.md).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--engine", required=True,
                   help="the decode engine's base URL, e.g. http://127.0.0.1:8000")  # fmt: skip
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=int, default=8100, help="port to listen on")
    p.add_argument("--connector", choices=CONNECTORS, default="nixl",
                   help="the ModelServer's kvConnector.type")  # fmt: skip
    p.add_argument("--pod-name", default="", help="this pod's name, for logs (default: $POD_NAME)")
    p.add_argument("--prefill-timeout", type=duration, default="30s",
                   help="longest wait for one prefill step before the next pod")  # fmt: skip
    p.add_argument("--bootstrap-port", type=int, default=8998,
                   help="sglang: the prefill pods' disaggregation bootstrap port")  # fmt: skip
    add_service_args(p)
    return p


async def serve(settings: ProxySettings, host: str, port: int) -> None:
    proxy = PDProxy(settings)
    runner = web.AppRunner(proxy.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("PD proxy for %s (%s) on http://%s:%d", settings.engine, settings.connector, host,
             port)  # fmt: skip
    stop = signalled_stop()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    import os

    ns = build_parser().parse_args(argv)
    configure_logging(ns.log_level, ns.log_format)
    settings = ProxySettings(
        engine=ns.engine.rstrip("/"),
        connector=ns.connector,
        pod_name=ns.pod_name or os.environ.get("POD_NAME", ""),
        prefill_timeout=ns.prefill_timeout,
        bootstrap_port=ns.bootstrap_port,
    )
    asyncio.run(serve(settings, ns.host, ns.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
