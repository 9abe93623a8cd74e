"""A lean gRPC transport for Envoy's ext_proc on the ``h2`` HTTP/2 library (``--transport h2``).

grpc.aio costs ~0.6 ms CPU per ext_proc request even for a do-nothing servicer
(bench/reports/extproc_cost.md). Envoy's ext_proc client needs very little of gRPC: one
bidirectional stream per HTTP request, identity-encoded messages, ``grpc-status`` trailers. This
module serves exactly that on an :class:`asyncio.Protocol` driving ``h2.connection.H2Connection``
(python-hyper's sans-IO HTTP/2 state machine: framing, HPACK, stream states, flow-control
windows, SETTINGS and PING are the library's). What is ours is the gRPC layer on top: the 5-byte
length prefix, ``grpc-status``/``grpc-message`` trailers, method dispatch, and the adapter that
gives a handler the same ``(request_iterator, context)`` interface grpc.aio gives it, so
``ExtProcServicer.Process`` (``context.read()``/``write()``) and ``AccessLogServicer``
(``async for`` over the request iterator, one reply) run unchanged.

Served: the methods passed in (:class:`GrpcMethod`), ``/grpc.health.v1.Health/Check``
(SERVING, NOT_SERVING once :meth:`H2Server.stop` began, NOT_FOUND for an unknown service name);
anything else is ``UNIMPLEMENTED``. Compressed messages are refused with ``UNIMPLEMENTED``,
messages over ``max_message`` with ``RESOURCE_EXHAUSTED``. A RST_STREAM from the peer (or the
connection going away) cancels the handler's task. Shutdown: GOAWAY in two steps (the last
stream id once the peer has acknowledged a PING), in-flight streams finish until the grace
deadline, then are cancelled. A protocol error is answered by h2's GOAWAY, logged in one line,
and the connection closed; the process goes on.

Known limit: h2 moves the whole connection to CLOSED when a GOAWAY is sent or received
(python-hyper/h2 issue #1181, open), so our own GOAWAYs are written past it with ``hyperframe``;
after the *peer* sends one, h2 refuses to send anything more, so streams still in flight on that
connection are cancelled (Envoy sends GOAWAY to an ext_proc cluster only when it drains the
connection, e.g. cluster removal or its own shutdown).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from grpc_health.v1 import health_pb2
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

__all__ = ["PROCESS_PATH", "GrpcMethod", "H2Server"]

log = logging.getLogger("matrixinfer.extproc.h2")

PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"

# gRPC status codes used here
OK, CANCELLED, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = (
    0,
    1,
    5,
    8,
    12,
    13,
    14,
)

MAX_STREAM_ID = 2**31 - 1
STREAM_WINDOW = 8 * 1024 * 1024  # per-stream receive window we announce
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024  # the largest frame we accept (Envoy sends up to this)
DRAIN_PING = b"mi-drain"

_RESPONSE_HEADERS = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity"),
]
_TRAILERS_OK = [(b"grpc-status", b"0")]
# grpc-message is percent-encoded; printable ASCII except "%" passes as is
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


@dataclass(frozen=True, slots=True)
class GrpcMethod:
    """One served method: ``handler(request_iterator, context)`` as grpc.aio would call it.

    ``unary_response=False`` (bidirectional): the handler answers through ``context.write()``
    and returns None. ``unary_response=True`` (client streaming): its return value is the reply.
    """

    handler: Callable[[Any, Any], Coroutine[Any, Any, Any]]
    deserialize: Callable[[bytes], Any]
    unary_response: bool = False


def _trailers(status: int, message: str = "") -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", str(status).encode())]
    if message:
        out.append((b"grpc-message", quote(message, safe=_MESSAGE_SAFE).encode()))
    return out


class StreamContext:
    """The part of a grpc.aio servicer context (and request iterator) our handlers use."""

    __slots__ = ("_conn", "_queue", "_waiter", "ended", "metadata", "sid")

    def __init__(
        self, conn: _Connection, sid: int, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._conn = conn
        self.sid = sid
        self.metadata = metadata  # the stream's trace-context headers (extproc.tracing)
        self._queue: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False

    async def read(self) -> Any:
        """The next request message, or ``grpc.aio.EOF`` once the peer half-closed."""
        queue = self._queue
        while not queue:
            if self.ended:
                return grpc.aio.EOF
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        return queue.popleft()

    async def write(self, message: Any) -> None:
        self._conn.send_message(self.sid, message.SerializeToString())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request headers of this stream a handler reads (W3C trace context only)."""
        return self.metadata

    def write_raw(self, payload: bytes) -> None:
        """Send an already serialised message (no await: nothing here waits)."""
        self._conn.send_message(self.sid, payload)

    def __aiter__(self) -> StreamContext:
        return self

    async def __anext__(self) -> Any:
        message = await self.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    def _push(self, message: Any) -> None:
        self._queue.append(message)
        self._wake()

    def _end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Stream:
    __slots__ = (
        "buf",
        "closing",
        "ctx",
        "headers_sent",
        "method",
        "offset",
        "pending",
        "remote_ended",
        "sid",
        "task",
    )

    def __init__(self, sid: int, method: GrpcMethod | None) -> None:
        self.sid = sid
        self.method = method
        self.buf = b""  # partial gRPC message
        self.ctx: StreamContext | None = None
        self.task: asyncio.Task[Any] | None = None
        self.headers_sent = False
        self.pending: collections.deque[bytes] = collections.deque()  # waiting for window
        self.offset = 0  # bytes of pending[0] already sent
        self.closing: list[tuple[bytes, bytes]] | None = None  # trailers after pending
        self.remote_ended = False


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # the peer is our own Envoy on loopback and only :path and content-type are
                # read; h2's per-header character checks cost ~10 % of the transport
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,  # our own constant headers
                normalize_outbound_headers=False,
            )
        )
        self.transport: Any = None  # asyncio.Transport or uvloop's
        self.streams: dict[int, _Stream] = {}
        self.blocked: set[int] = set()
        self.flush_scheduled = False
        self.closed = False
        self.draining = False
        self.goaway_last: int | None = None  # final GOAWAY sent: streams above are refused
        self.peer = "?"

    # ---- connection life ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        conn = self.conn
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        conn.initiate_connection()
        # a larger frame size takes effect only once the peer acknowledges it: h2 applies it
        # on the ACK of this second SETTINGS frame (not if it were an initial value above)
        conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE})
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        transport.write(conn.data_to_send())  # type: ignore[attr-defined]
        self.server._connections.add(self)
        if self.server.stopping:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        for s in list(self.streams.values()):
            self._forget(s)
            if s.task is not None:
                s.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the error code; send it and close
            log.warning("HTTP/2 protocol error from %s, closing the connection: %s", self.peer, exc)
            self._close()
            return
        dispatch = _DISPATCH
        for ev in events:
            handler = dispatch.get(type(ev))
            if handler is not None:
                handler(self, ev)
        self._flush()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()
        self.closed = True

    # ---- output --------------------------------------------------------------------------------
    def _flush_soon(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        data = self.conn.data_to_send()
        if data and not self.closed and self.transport is not None:
            self.transport.write(data)

    def send_message(self, sid: int, payload: bytes) -> None:
        s = self.streams.get(sid)
        if s is None or s.closing is not None:
            return  # reset by the peer meanwhile, or already finished
        if not s.headers_sent:
            s.headers_sent = True
            try:
                self.conn.send_headers(sid, _RESPONSE_HEADERS)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
                log.debug("HTTP/2 stream %d of %s cannot send: %s", sid, self.peer, exc)
                self._forget(s)
                if s.task is not None:
                    s.task.cancel()
                return
        s.pending.append(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        self._pump(s)
        self._flush_soon()

    def _finish(self, s: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        """End the stream with these trailers once its pending data is out."""
        if s.closing is not None or self.streams.get(s.sid) is not s:
            return
        s.closing = trailers
        self._pump(s)
        self._flush_soon()

    def _pump(self, s: _Stream) -> None:
        conn, sid = self.conn, s.sid
        try:
            while s.pending:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    self.blocked.add(sid)
                    return
                chunk = s.pending[0]
                n = min(len(chunk) - s.offset, window, conn.max_outbound_frame_size)
                if s.offset == 0 and n == len(chunk):
                    conn.send_data(sid, chunk)
                    s.pending.popleft()
                    continue
                conn.send_data(sid, memoryview(chunk)[s.offset : s.offset + n])
                s.offset += n
                if s.offset == len(chunk):
                    s.pending.popleft()
                    s.offset = 0
            self.blocked.discard(sid)
            if s.closing is not None:
                if s.headers_sent:
                    conn.send_headers(sid, s.closing, end_stream=True)
                else:  # trailers-only response
                    conn.send_headers(sid, _RESPONSE_HEADERS + s.closing, end_stream=True)
                self._forget(s)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            # the stream was reset, or the peer sent GOAWAY (h2 then sends nothing more)
            log.debug("HTTP/2 stream %d of %s cannot send: %s", sid, self.peer, exc)
            self._forget(s)
            if s.task is not None:
                s.task.cancel()

    def _forget(self, s: _Stream) -> None:
        if self.streams.pop(s.sid, None) is not None:
            self.blocked.discard(s.sid)
            self.server._stream_closed()
            if self.draining and not self.streams and self.goaway_last is not None:
                self._close()

    # ---- events ----------------------------------------------------------------------------------
    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        assert sid is not None
        if self.goaway_last is not None and sid > self.goaway_last:
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        path: Any = b""
        ctype: Any = b""
        trace: tuple[tuple[str, str], ...] = ()
        for key, value in ev.headers or ():
            if key == b":path":
                path = value
            elif key == b"content-type":
                ctype = value
            elif key == b"traceparent" or key == b"tracestate":
                trace += ((key.decode(), value.decode("latin-1")),)
        if not ctype.startswith(b"application/grpc"):
            self.conn.send_headers(sid, [(b":status", b"415")], end_stream=True)
            return
        name: str = path.decode("latin-1")
        method = self.server.methods.get(name)
        s = self.streams[sid] = _Stream(sid, method)
        self.server._stream_opened()
        if method is not None:
            ctx = s.ctx = StreamContext(self, sid, trace)
            s.task = self.loop.create_task(method.handler(ctx, ctx))
            s.task.add_done_callback(functools.partial(self._done, s))
        elif name != HEALTH_CHECK_PATH:
            self._finish(s, _trailers(UNIMPLEMENTED, f"method {name} is not served here"))

    def _on_data(self, ev: h2.events.DataReceived) -> None:
        sid = ev.stream_id
        assert sid is not None
        self.conn.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
        s = self.streams.get(sid)
        if s is None or s.closing is not None:
            return
        data = ev.data or b""
        buf = s.buf + data if s.buf else data
        j, n = 0, len(buf)
        limit = self.server.max_message
        while n - j >= 5:
            flag = buf[j]
            mlen = int.from_bytes(buf[j + 1 : j + 5], "big")
            if flag != 0:
                self._abort(s, UNIMPLEMENTED, "compressed gRPC messages are not supported")
                return
            if mlen > limit:
                self._abort(
                    s, RESOURCE_EXHAUSTED, f"message of {mlen} bytes is over the {limit} limit"
                )
                return
            if n - j - 5 < mlen:
                break
            raw = buf[j + 5 : j + 5 + mlen]
            j += 5 + mlen
            if s.method is not None:
                try:
                    message = s.method.deserialize(raw)
                except Exception as exc:
                    self._abort(s, INTERNAL, f"cannot parse the request message: {exc}")
                    return
                assert s.ctx is not None
                s.ctx._push(message)
            else:
                self._health_check(s, raw)
                return
        s.buf = buf[j:] if j < n else b""

    def _on_end(self, ev: h2.events.StreamEnded) -> None:
        s = self.streams.get(ev.stream_id or 0)
        if s is None:
            return
        s.remote_ended = True
        if s.ctx is not None:
            s.ctx._end()
        elif s.closing is None:  # a health check without a request message
            self._health_check(s, b"")

    def _on_reset(self, ev: h2.events.StreamReset) -> None:
        s = self.streams.get(ev.stream_id or 0)
        if s is not None:
            self._forget(s)
            if s.task is not None:
                s.task.cancel()

    def _on_window(self, ev: h2.events.WindowUpdated) -> None:
        if ev.stream_id:
            s = self.streams.get(ev.stream_id)
            if s is not None and s.pending:
                self._pump(s)
        else:
            self._pump_blocked()

    def _on_settings(self, ev: h2.events.RemoteSettingsChanged) -> None:
        self._pump_blocked()

    def _pump_blocked(self) -> None:
        for sid in list(self.blocked):
            s = self.streams.get(sid)
            if s is None:
                self.blocked.discard(sid)
            else:
                self._pump(s)

    def _on_terminated(self, ev: h2.events.ConnectionTerminated) -> None:
        if ev.error_code != ErrorCodes.NO_ERROR:
            log.warning("HTTP/2 peer %s closed the connection: %s", self.peer, ev.error_code)
        for s in list(self.streams.values()):
            self._forget(s)
            if s.task is not None:
                s.task.cancel()
        self._close()

    def _on_ping_ack(self, ev: h2.events.PingAckReceived) -> None:
        if self.draining and ev.ping_data == DRAIN_PING and self.goaway_last is None:
            self._goaway(self.conn.highest_inbound_stream_id)

    # ---- handlers ------------------------------------------------------------------------------
    def _done(self, s: _Stream, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            if self.streams.get(s.sid) is s:
                self._abort(s, CANCELLED, "the handler was cancelled")
            return
        exc = task.exception()
        if exc is not None:
            log.error("gRPC stream %d failed", s.sid, exc_info=exc)
            self._finish(s, _trailers(INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        assert s.method is not None
        if s.method.unary_response:
            self.send_message(s.sid, task.result().SerializeToString())
        self._finish(s, _TRAILERS_OK)

    def _abort(self, s: _Stream, status: int, message: str) -> None:
        """End the stream now with an error status; its handler is cancelled."""
        if s.task is not None and not s.task.done():
            s.task.cancel()
        s.pending.clear()
        s.offset = 0
        remote_open = not s.remote_ended
        self._finish(s, _trailers(status, message))
        if remote_open and self.streams.get(s.sid) is None:
            # stop the peer from sending the rest of a request nobody reads
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.reset_stream(s.sid, ErrorCodes.NO_ERROR)

    def _health_check(self, s: _Stream, raw: bytes) -> None:
        try:
            service = health_pb2.HealthCheckRequest.FromString(raw).service
        except Exception:
            self._finish(s, _trailers(INTERNAL, "cannot parse HealthCheckRequest"))
            return
        if service not in self.server.health_services:
            self._finish(s, _trailers(NOT_FOUND, f"unknown service {service!r}"))
            return
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.server.stopping
            else health_pb2.HealthCheckResponse.SERVING
        )
        self.send_message(s.sid, health_pb2.HealthCheckResponse(status=status).SerializeToString())
        self._finish(s, _TRAILERS_OK)

    # ---- shutdown -----------------------------------------------------------------------------
    def drain(self) -> None:
        """First GOAWAY (no new streams please) and a PING; the final GOAWAY follows its ACK."""
        if self.draining or self.closed or self.transport is None:
            return
        self.draining = True
        self._flush()
        self.transport.write(GoAwayFrame(0, last_stream_id=MAX_STREAM_ID).serialize())
        try:
            self.conn.ping(DRAIN_PING)
        except h2.exceptions.ProtocolError:  # the peer already said GOAWAY
            self._goaway(self.conn.highest_inbound_stream_id)
            return
        self._flush()

    def _goaway(self, last: int) -> None:
        """The final GOAWAY, written past h2 (whose own would stop in-flight streams too)."""
        self.goaway_last = last
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.write(GoAwayFrame(0, last_stream_id=last).serialize())
        if not self.streams:
            self._close()

    def abort_all(self) -> None:
        """Grace is over: cancel what is still running and close."""
        for s in list(self.streams.values()):
            self._forget(s)
            if s.task is not None:
                s.task.cancel()
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.reset_stream(s.sid, ErrorCodes.CANCEL)
        self._close()


_DISPATCH: dict[type, Callable[[_Connection, Any], None]] = {
    h2.events.DataReceived: _Connection._on_data,
    h2.events.RequestReceived: _Connection._on_request,
    h2.events.StreamEnded: _Connection._on_end,
    h2.events.WindowUpdated: _Connection._on_window,
    h2.events.StreamReset: _Connection._on_reset,
    h2.events.RemoteSettingsChanged: _Connection._on_settings,
    h2.events.ConnectionTerminated: _Connection._on_terminated,
    h2.events.PingAckReceived: _Connection._on_ping_ack,
}


class H2Server:
    """gRPC over ``h2`` for a few methods. ``await start(host, port)``, ``await stop(grace)``."""

    def __init__(
        self,
        methods: dict[str, GrpcMethod],
        *,
        health_services: Iterable[str] = ("",),
        max_concurrent_streams: int = 1000,
        max_message: int = 16 * 1024 * 1024,
    ) -> None:
        if max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be >= 1, not {max_concurrent_streams}")
        if max_message < 1:
            raise ValueError(f"max_message must be >= 1, not {max_message}")
        for path in methods:
            if not path.startswith("/") or path.count("/") != 2:
                raise ValueError(f"method path must look like /package.Service/Method: {path!r}")
        self.methods = dict(methods)
        self.health_services = frozenset(health_services)
        self.max_concurrent_streams = max_concurrent_streams
        self.max_message = max_message
        self.stopping = False
        self.active_streams = 0
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._drained: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _stream_opened(self) -> None:
        self.active_streams += 1

    def _stream_closed(self) -> None:
        self.active_streams -= 1
        if self.stopping and self.active_streams == 0 and self._drained is not None:
            self._drained.set()

    async def stop(self, grace: float) -> None:
        """Refuse new connections and streams, let in-flight ones finish for ``grace`` s."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for c in list(self._connections):
            c.drain()
        if self.active_streams and self._drained is not None:
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                log.warning(
                    "%d gRPC streams still open after %.1f s; cancelling them",
                    self.active_streams,
                    grace,
                )
        for c in list(self._connections):
            c.abort_all()
        if self._server is not None:
            await self._server.wait_closed()
