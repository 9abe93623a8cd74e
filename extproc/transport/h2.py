"""A lean gRPC transport for Envoy's ext_proc over a hand-written HTTP/2 server
(``--transport h2``).

grpc.aio costs ~0.6 ms CPU per ext_proc request even for a do-nothing servicer
(bench/reports/extproc_cost.md), and python-hyper's ``h2`` state machine, which this transport
used first, spent ~0.15 ms per request of its own (frame objects, per-stream state machines,
events, HPACK encoding of constant headers). Envoy's ext_proc client needs very little of HTTP/2
and gRPC: one bidirectional stream per HTTP request, identity-encoded messages, ``grpc-status``
trailers. This module serves exactly that on an :class:`asyncio.Protocol`:

- **HTTP/2 (RFC 9113), server side**: the frame layer (DATA, HEADERS + CONTINUATION, RST_STREAM,
  SETTINGS, PING, GOAWAY, WINDOW_UPDATE; PRIORITY checked and ignored, unknown types ignored;
  padding), flow control both ways (received DATA is counted against the windows we announced,
  which are given back as the handlers read their messages), the stream id rules (a frame other
  than HEADERS/PRIORITY on a stream never opened is a connection error), stream limits, and
  connection errors answered with GOAWAY. Header blocks are decoded with the ``hpack`` library
  (python-hyper's HPACK, Huffman included); the replies' header blocks are constant or
  literal-without-indexing, so no HPACK encoder state is kept.
- **gRPC on top**: the 5-byte length prefix, ``grpc-status``/``grpc-message`` trailers, method
  dispatch, and the adapter that gives a handler the same ``(request_iterator, context)``
  interface grpc.aio gives it, so ``ExtProcServicer.Process`` (``context.read()``/``write()``)
  and ``AccessLogServicer`` (``async for`` over the request iterator, one reply) run unchanged.

Served: the methods passed in (:class:`GrpcMethod`), ``/grpc.health.v1.Health/Check``
(SERVING, NOT_SERVING once :meth:`H2Server.stop` began, NOT_FOUND for an unknown service name);
anything else is ``UNIMPLEMENTED``. Compressed messages are refused with ``UNIMPLEMENTED``,
messages over ``max_message`` with ``RESOURCE_EXHAUSTED``. A RST_STREAM from the peer (or the
connection going away) cancels the handler's task. Shutdown: GOAWAY in two steps (the last
stream id once the peer has acknowledged a PING), in-flight streams finish until the grace
deadline, then are cancelled. A protocol error is answered with GOAWAY and the error code,
logged in one line, and the connection closed (after reading on until the peer closes, at most
LINGER s, so the GOAWAY is not lost to a TCP reset); the process goes on. A GOAWAY from the peer
(Envoy sends one when it drains the connection, e.g. cluster removal or its own shutdown) lets
the streams in flight finish and closes the connection after the last one; one with an error
code cancels them and closes it at once.

The library implementation of the same protocol is one flag away: ``--transport grpc``
(grpc.aio); bench/reports/gateway_overhead.md compares the two against a do-nothing grpc.aio
servicer.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import struct
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import grpc
import hpack
from grpc_health.v1 import health_pb2

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

# HTTP/2 frame types, flags, settings and error codes (RFC 9113 sections 6, 7)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384
STREAM_WINDOW = 8 * 1024 * 1024  # per-stream receive window we announce
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024  # the largest frame we accept (Envoy sends up to this)
MAX_HEADER_LIST = 64 * 1024
MAX_CONTINUATIONS = 64  # CONTINUATION frames in one header block (empty ones cost memory too)
DRAIN_PING = b"mi-drain"
LINGER = 2.0  # seconds a connection closed for a protocol error reads on (see _fail)

_frame_header = struct.Struct(">I B I")  # (length << 8 | type) packed as 4 bytes, flags, stream id


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first``'s high bits in its first byte."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as a literal without indexing, new name (RFC 7541 6.2.2): it leaves the
    peer's dynamic table alone, so no encoder state has to be kept here."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# the reply headers: ":status: 200" (static index 8), then literals
_RESPONSE_BLOCK = (
    b"\x88"
    + _literal(b"content-type", b"application/grpc")
    + _literal(b"grpc-accept-encoding", b"identity")
)
_STATUS_415_BLOCK = b"\x08" + _hpack_int(3, 7) + b"415"  # literal, indexed name :status
# grpc-message is percent-encoded; printable ASCII except "%" passes as is
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


def _trailers(status: int, message: str = "") -> bytes:
    """The trailers' header block: ``grpc-status`` and, when given, ``grpc-message``."""
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", quote(message, safe=_MESSAGE_SAFE).encode())
    return block


_TRAILERS_OK = _trailers(OK)


class ConnectionFault(Exception):
    """A connection error (RFC 9113 5.4.1): answered with GOAWAY and this code, then closed."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _frame_header.pack(len(payload) << 8 | kind, flags, sid) + payload


def _rst_stream(sid: int, code: int) -> bytes:
    return _frame(RST_STREAM, 0, sid, code.to_bytes(4, "big"))


def _goaway(last_sid: int, code: int) -> bytes:
    return _frame(GOAWAY, 0, 0, struct.pack(">II", last_sid, code))


def _window_update(sid: int, increment: int) -> bytes:
    return _frame(WINDOW_UPDATE, 0, sid, increment.to_bytes(4, "big"))


@dataclass(frozen=True, slots=True)
class GrpcMethod:
    """One served method: ``handler(request_iterator, context)`` as grpc.aio would call it.

    ``unary_response=False`` (bidirectional): the handler answers through ``context.write()``
    and returns None. ``unary_response=True`` (client streaming): its return value is the reply.
    """

    handler: Callable[[Any, Any], Coroutine[Any, Any, Any]]
    deserialize: Callable[[bytes], Any]
    unary_response: bool = False


class StreamContext:
    """The part of a grpc.aio servicer context (and request iterator) our handlers use."""

    __slots__ = ("_conn", "_queue", "_waiter", "ended", "metadata", "sid")

    def __init__(
        self, conn: _Connection, sid: int, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._conn = conn
        self.sid = sid  # not the _Stream: a stream <-> context cycle would leave every
        # finished stream to the cyclic garbage collector (measured: +20 us per request)
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
        message = queue.popleft()
        if not queue:  # caught up: what the peer sent so far is consumed
            self._conn._read_all(self.sid)
        return message

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
        "held",
        "method",
        "pending",
        "recv_window",
        "remote_ended",
        "send_window",
        "sid",
        "task",
    )

    def __init__(self, sid: int, method: GrpcMethod | None, send_window: int) -> None:
        self.sid = sid
        self.method = method
        self.buf = b""  # partial gRPC message
        self.ctx: StreamContext | None = None
        self.task: asyncio.Task[Any] | None = None
        self.headers_sent = False
        self.pending: collections.deque[memoryview] = collections.deque()  # waiting for window
        self.closing: bytes | None = None  # the trailers' block, sent after pending
        self.remote_ended = False
        self.send_window = send_window  # what the peer lets us send on this stream
        self.recv_window = STREAM_WINDOW  # what the peer may still send: announced, not used
        self.held = 0  # DATA bytes received since the handler last read all it was given


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_LIST
        self.transport: Any = None  # asyncio.Transport or uvloop's
        self.streams: dict[int, _Stream] = {}
        self.blocked: set[int] = set()  # streams with pending data and no window
        self.out: list[bytes | memoryview] = []  # written at the next flush
        self.inbuf = b""  # the start of a frame not yet complete
        self.preface_seen = False
        self.continuation: tuple[int, int, list[bytes]] | None = None  # sid, flags, fragments
        self.highest_sid = 0  # the highest stream id the peer opened
        self.peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame_size = DEFAULT_FRAME_SIZE  # the peer's SETTINGS_MAX_FRAME_SIZE
        self.send_window = DEFAULT_WINDOW  # the connection's window towards the peer
        self.recv_window = CONNECTION_WINDOW  # what the peer may still send on the connection
        self.consumed = 0  # DATA bytes consumed and not yet given back with WINDOW_UPDATE
        self.flush_scheduled = False
        self.closed = False
        self.draining = False
        self.goaway_last: int | None = None  # final GOAWAY sent: streams above are refused
        self.close_when_idle = False  # after our final GOAWAY or the peer's: no new streams
        self.peer = "?"

    # ---- connection life ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        settings = b"".join(
            struct.pack(">HI", key, value)
            for key, value in (
                (S_MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams),
                (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
                (S_ENABLE_PUSH, 0),
                (S_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
            )
        )
        self.out.append(_frame(SETTINGS, 0, 0, settings))
        self.out.append(_window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))
        self._flush()
        self.server._connections.add(self)
        if self.server.stopping:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        self._cancel_streams()

    def _cancel_streams(self) -> None:
        """Forget every stream and cancel its handler (the connection is going away)."""
        for s in list(self.streams.values()):
            self._forget(s)
            if s.task is not None:
                s.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # after a connection error: discarded until the peer closes (see _fail)
        try:
            self._receive(data)
        except ConnectionFault as exc:
            self._fail(exc)
            return
        if self.out:
            self._flush()

    def _fail(self, exc: ConnectionFault) -> None:
        """A connection error: GOAWAY with its code, then our end of the connection is shut.
        Input is read and discarded until the peer closes (LINGER s at most): closing a socket
        with unread input makes the kernel answer with a TCP reset, which can destroy the
        GOAWAY before the peer reads it."""
        log.warning("HTTP/2 protocol error from %s, closing the connection: %s", self.peer, exc)
        self.out.append(_goaway(self.highest_sid, exc.code))
        self._flush()
        self.closed = True
        self._cancel_streams()
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def _close(self) -> None:
        if not self.closed:
            self._flush()
            self.closed = True
        if self.transport is not None:
            self.transport.close()  # a no-op when already closing

    # ---- input ---------------------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        buf = self.inbuf + data if self.inbuf else data
        i, n = 0, len(buf)
        if not self.preface_seen:
            if n < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise ConnectionFault(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self.inbuf = buf
                return
            if not buf.startswith(PREFACE):
                raise ConnectionFault(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self.preface_seen = True
            i = len(PREFACE)
        unpack = _frame_header.unpack_from
        while n - i >= 9 and not self.closed:
            lt, flags, sid = unpack(buf, i)
            length = lt >> 8
            if length > MAX_FRAME_SIZE:
                raise ConnectionFault(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = i + 9 + length
            if end > n:
                break
            kind = lt & 0xFF
            payload = buf[i + 9 : end]
            i = end
            sid &= MAX_STREAM_ID
            if self.continuation is not None and kind != CONTINUATION:
                raise ConnectionFault(PROTOCOL_ERROR, "header block interrupted")
            if kind == DATA:
                self._on_data_frame(sid, flags, payload, length)
            elif kind == HEADERS:
                self._on_headers_frame(sid, flags, payload)
            elif kind == CONTINUATION:
                self._on_continuation(sid, flags, payload)
            elif kind == RST_STREAM:
                self._on_reset(sid, payload)
            elif kind == SETTINGS:
                self._on_settings(sid, flags, payload)
            elif kind == PING:
                self._on_ping(sid, flags, payload)
            elif kind == GOAWAY:
                self._on_goaway(sid, payload)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(sid, payload)
            elif kind == PRIORITY:
                self._on_priority(sid, payload)
            elif kind == PUSH_PROMISE:
                raise ConnectionFault(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # unknown frame types are ignored (RFC 9113 5.5)
        self.inbuf = buf[i:] if i < n else b""

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if flags & PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionFault(PROTOCOL_ERROR, "padding longer than the frame")
            return payload[1 : len(payload) - payload[0]]
        return payload

    def _on_data_frame(self, sid: int, flags: int, payload: bytes, length: int) -> None:
        """DATA, counted against the windows we announced (RFC 9113 6.9; padding counts too)."""
        if sid == 0:
            raise ConnectionFault(PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_window -= length
        if self.recv_window < 0:
            raise ConnectionFault(
                FLOW_CONTROL_ERROR, f"DATA {-self.recv_window} bytes past the connection window"
            )
        data = self._unpad(flags, payload)
        s = self.streams.get(sid)
        if s is None:
            self._check_not_idle(sid, "DATA")
            self._consume(length)  # a stream we already answered or reset: the rest is dropped
            return
        if s.remote_ended:
            self._consume(length)
            self._reset(s, STREAM_CLOSED)
            return
        s.recv_window -= length
        if s.recv_window < 0:
            log.warning(
                "HTTP/2 peer %s sent DATA past stream %d's window; resetting it", self.peer, sid
            )
            self._consume(length)
            self._reset(s, FLOW_CONTROL_ERROR)
            return
        s.held += length
        if data and s.closing is None:
            self._on_message_bytes(s, data)
        if flags & END_STREAM and self.streams.get(sid) is s:
            self._on_end(s)
        if s.ctx is None or not s.ctx._queue:
            self._caught_up(s)

    def _read_all(self, sid: int) -> None:
        """Stream ``sid``'s handler has emptied its queue (StreamContext.read)."""
        s = self.streams.get(sid)
        if s is not None:
            self._caught_up(s)

    def _caught_up(self, s: _Stream) -> None:
        """The handler has read every message of ``s`` it was given: the bytes received so far
        are consumed. The stream's window is given back once half of it is consumed, so a
        handler that stops reading stops the peer's DATA on its stream (and, through the
        connection window, bounds what a connection buffers)."""
        if s.held:
            self._consume(s.held)
            s.held = 0
        if s.recv_window <= STREAM_WINDOW // 2 and not s.remote_ended and s.sid in self.streams:
            self.out.append(_window_update(s.sid, STREAM_WINDOW - s.recv_window))
            s.recv_window = STREAM_WINDOW
            self._flush_soon()

    def _consume(self, n: int) -> None:
        """``n`` received DATA bytes are consumed: the connection window is given back once half
        of it is."""
        self.consumed += n
        if self.consumed >= CONNECTION_WINDOW // 2:
            self.out.append(_window_update(0, self.consumed))
            self.recv_window += self.consumed
            self.consumed = 0
            self._flush_soon()

    def _check_not_idle(self, sid: int, kind: str) -> None:
        """A frame for a stream that is not open: dropped if the stream was opened once (it is
        closed), a connection error if it never was (idle, RFC 9113 5.1; the client opens odd
        ids only, in increasing order)."""
        if sid > self.highest_sid or not sid & 1:
            raise ConnectionFault(PROTOCOL_ERROR, f"{kind} on idle stream {sid}")

    def _on_headers_frame(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0 or sid % 2 == 0:
            raise ConnectionFault(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            self._check_priority(sid, block[:5])
            block = block[5:]
        if flags & END_HEADERS:
            self._on_header_block(sid, flags, block)
        else:
            self.continuation = (sid, flags, [block])

    def _on_continuation(self, sid: int, flags: int, payload: bytes) -> None:
        if self.continuation is None or self.continuation[0] != sid:
            raise ConnectionFault(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        fragments = self.continuation[2]
        fragments.append(payload)
        if len(fragments) > MAX_CONTINUATIONS or sum(map(len, fragments)) > MAX_HEADER_LIST * 2:
            raise ConnectionFault(PROTOCOL_ERROR, "header block over the size limit")
        if flags & END_HEADERS:
            first_flags = self.continuation[1]
            self.continuation = None
            self._on_header_block(sid, first_flags, b"".join(fragments))

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise ConnectionFault(COMPRESSION_ERROR, f"header block: {exc}") from None
        end = bool(flags & END_STREAM)
        s = self.streams.get(sid)
        if s is not None:  # trailers from the peer end its half of the stream
            if not end:
                raise ConnectionFault(PROTOCOL_ERROR, f"trailers without END_STREAM on {sid}")
            if s.remote_ended:
                self._reset(s, STREAM_CLOSED)
            else:
                self._on_end(s)
            return
        if sid <= self.highest_sid:
            return  # trailers of a stream we already answered or reset
        self.highest_sid = sid
        self._on_request(sid, headers, end)

    def _on_request(self, sid: int, headers: Iterable[Any], end: bool) -> None:
        after_goaway = self.goaway_last is not None and sid > self.goaway_last
        if after_goaway or len(self.streams) >= self.server.max_concurrent_streams:
            self.out.append(_rst_stream(sid, REFUSED_STREAM))
            return
        path: bytes = b""
        ctype: bytes = b""
        trace: tuple[tuple[str, str], ...] = ()
        for key, value in headers:
            if key == b":path":
                path = value
            elif key == b"content-type":
                ctype = value
            elif key == b"traceparent" or key == b"tracestate":
                trace += ((key.decode(), value.decode("latin-1")),)
        if not ctype.startswith(b"application/grpc"):
            self._header_frames(sid, _STATUS_415_BLOCK, True)
            return
        name = path.decode("latin-1")
        method = self.server.methods.get(name)
        s = self.streams[sid] = _Stream(sid, method, self.peer_window)
        self.server._stream_opened()
        if method is not None:
            ctx = s.ctx = StreamContext(self, sid, trace)
            s.task = self.loop.create_task(method.handler(ctx, ctx))
            s.task.add_done_callback(functools.partial(self._done, s))
        elif name != HEALTH_CHECK_PATH:
            self._finish(s, _trailers(UNIMPLEMENTED, f"method {name} is not served here"))
            return
        if end:
            self._on_end(s)

    def _on_message_bytes(self, s: _Stream, data: bytes) -> None:
        """Cut the stream's bytes into gRPC messages (5-byte prefix: flag, length)."""
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

    def _on_end(self, s: _Stream) -> None:
        s.remote_ended = True
        if s.ctx is not None:
            s.ctx._end()
        elif s.closing is None:  # a health check without a request message
            self._health_check(s, b"")

    def _on_reset(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionFault(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionFault(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
        s = self.streams.get(sid)
        if s is None:
            self._check_not_idle(sid, "RST_STREAM")
            return
        self._forget(s)
        if s.task is not None:
            s.task.cancel()

    def _on_priority(self, sid: int, payload: bytes) -> None:
        """PRIORITY (deprecated by RFC 9113 5.3.2) is checked and ignored, on any stream."""
        if sid == 0:
            raise ConnectionFault(PROTOCOL_ERROR, "PRIORITY on stream 0")
        self._check_priority(sid, payload)

    @staticmethod
    def _check_priority(sid: int, field: bytes) -> None:
        """The 5-byte priority field of PRIORITY or HEADERS: the right size, not on itself.
        Both are stream errors in RFC 9113 (5.3.1, 6.3), answered here as connection errors."""
        if len(field) != 5:
            raise ConnectionFault(FRAME_SIZE_ERROR, f"priority field of {len(field)} bytes")
        if int.from_bytes(field[:4], "big") & MAX_STREAM_ID == sid:
            raise ConnectionFault(PROTOCOL_ERROR, f"stream {sid} depends on itself")

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionFault(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionFault(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for k in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, k)
            if key == S_ENABLE_PUSH and value > 1:
                raise ConnectionFault(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionFault(FLOW_CONTROL_ERROR, f"initial window {value}")
                delta = value - self.peer_window
                self.peer_window = value
                for s in self.streams.values():
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:  # RFC 9113 6.9.2
                        message = f"initial window {value} takes stream {s.sid} past 2^31-1"
                        raise ConnectionFault(FLOW_CONTROL_ERROR, message)
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    raise ConnectionFault(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_frame_size = value
        self.out.append(_frame(SETTINGS, ACK, 0))
        self._pump_blocked()

    def _on_ping(self, sid: int, flags: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionFault(FRAME_SIZE_ERROR, "PING of the wrong size")
        if not flags & ACK:
            self.out.append(_frame(PING, ACK, 0, payload))
        elif self.draining and payload == DRAIN_PING and self.goaway_last is None:
            self._goaway(self.highest_sid)

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionFault(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionFault(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        code = int.from_bytes(payload[4:8], "big")
        if code == NO_ERROR:
            # the peer opens no more streams; the ones in flight finish (RFC 9113 6.8), as
            # when Envoy drains the connection
            self._close_when_idle()
            return
        log.warning("HTTP/2 peer %s closed the connection: error code %d", self.peer, code)
        self._cancel_streams()
        self._close()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFault(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if sid == 0:
            if increment == 0:
                raise ConnectionFault(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionFault(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            self._pump_blocked()
            return
        s = self.streams.get(sid)
        if s is None:
            self._check_not_idle(sid, "WINDOW_UPDATE")
            return
        if increment == 0:
            self._reset(s, PROTOCOL_ERROR)
            return
        s.send_window += increment
        if s.send_window > MAX_WINDOW:
            self._reset(s, FLOW_CONTROL_ERROR)
        elif s.pending or (s.closing is not None and s.sid in self.blocked):
            self._pump(s)

    def _pump_blocked(self) -> None:
        for sid in list(self.blocked):
            s = self.streams.get(sid)
            if s is None:
                self.blocked.discard(sid)
            else:
                self._pump(s)

    # ---- output --------------------------------------------------------------------------------
    def _flush_soon(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if out:
            data = b"".join(out)
            out.clear()
            if not self.closed and self.transport is not None:
                self.transport.write(data)

    def _header_frames(self, sid: int, block: bytes, end_stream: bool) -> None:
        """A header block as HEADERS (+ CONTINUATION frames when over the peer's frame size)."""
        size = self.peer_frame_size
        first = END_STREAM if end_stream else 0
        if len(block) <= size:
            self.out.append(_frame(HEADERS, first | END_HEADERS, sid, block))
            return
        pieces = [block[k : k + size] for k in range(0, len(block), size)]
        self.out.append(_frame(HEADERS, first, sid, pieces[0]))
        for k, piece in enumerate(pieces[1:], 2):
            self.out.append(
                _frame(CONTINUATION, END_HEADERS if k == len(pieces) else 0, sid, piece)
            )

    def send_message(self, sid: int, payload: bytes) -> None:
        s = self.streams.get(sid)
        if s is None or s.closing is not None:
            return  # reset by the peer meanwhile, or already finished
        if not s.headers_sent:
            s.headers_sent = True
            self._header_frames(sid, _RESPONSE_BLOCK, False)
        size = len(payload) + 5
        if not s.pending and size <= min(s.send_window, self.send_window, self.peer_frame_size):
            # the common case: one DATA frame, header and gRPC prefix in one piece
            self.out.append(_frame_header.pack(size << 8 | DATA, 0, sid) + _grpc_prefix(payload))
            self.out.append(payload)
            s.send_window -= size
            self.send_window -= size
        else:
            s.pending.append(memoryview(_grpc_prefix(payload) + payload))
            self._pump(s)
        self._flush_soon()

    def _finish(self, s: _Stream, trailers: bytes) -> None:
        """End the stream with these trailers once its pending data is out."""
        if s.closing is not None or self.streams.get(s.sid) is not s:
            return
        s.closing = trailers
        self._pump(s)
        self._flush_soon()

    def _pump(self, s: _Stream) -> None:
        sid = s.sid
        while s.pending:
            window = min(s.send_window, self.send_window)
            if window <= 0:
                self.blocked.add(sid)
                return
            chunk = s.pending[0]
            n = min(len(chunk), window, self.peer_frame_size)
            self.out.append(_frame_header.pack(n << 8 | DATA, 0, sid))
            self.out.append(chunk[:n])
            s.send_window -= n
            self.send_window -= n
            if n == len(chunk):
                s.pending.popleft()
            else:
                s.pending[0] = chunk[n:]
        self.blocked.discard(sid)
        if s.closing is not None:
            block = s.closing if s.headers_sent else _RESPONSE_BLOCK + s.closing
            self._header_frames(sid, block, True)  # trailers, or a trailers-only response
            self._forget(s)

    def _reset(self, s: _Stream, code: int) -> None:
        """A stream error: RST_STREAM with ``code``; the handler is cancelled."""
        self.out.append(_rst_stream(s.sid, code))
        self._forget(s)
        if s.task is not None:
            s.task.cancel()

    def _forget(self, s: _Stream) -> None:
        if self.streams.pop(s.sid, None) is not None:
            if s.held:  # received, never read: consumed now for the connection window
                self._consume(s.held)
                s.held = 0
            self.blocked.discard(s.sid)
            self.server._stream_closed()
            if self.close_when_idle and not self.streams and not self.closed:
                self._close()  # (closed already: _fail or connection_lost own the transport)

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
        remote_open = not s.remote_ended
        self._finish(s, _trailers(status, message))
        if remote_open and self.streams.get(s.sid) is None:
            # stop the peer from sending the rest of a request nobody reads
            self.out.append(_rst_stream(s.sid, NO_ERROR))

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
        self.out.append(_goaway(MAX_STREAM_ID, NO_ERROR))
        self.out.append(_frame(PING, 0, 0, DRAIN_PING))
        self._flush()

    def _goaway(self, last: int) -> None:
        """The final GOAWAY: streams above ``last`` are refused, those below finish."""
        self.goaway_last = last
        self.out.append(_goaway(last, NO_ERROR))
        self._flush()
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        self.close_when_idle = True
        if not self.streams:
            self._close()

    def abort_all(self) -> None:
        """Grace is over: cancel what is still running and close."""
        for s in list(self.streams.values()):
            self._reset(s, CANCEL)
        self._close()


def _grpc_prefix(payload: bytes) -> bytes:
    """The gRPC message prefix: not compressed, then the length."""
    return b"\x00" + len(payload).to_bytes(4, "big")


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
