"""PROTOTYPE: serve an unchanged ``ExtProcServicer`` over a hand-written HTTP/2 layer.

Not product code. It measures how cheap the Python side of ext_proc gets when grpc.aio's
per-call and per-message machinery is replaced by an ``asyncio.Protocol`` that speaks just the
HTTP/2 + gRPC framing Envoy's ext_proc client uses. The servicer's ``Process(request_iterator,
context)`` coroutine runs as is: each stream gets a task and a small context object whose
``read()``/``write()`` feed it parsed ``ProcessingRequest``s and turn its ``ProcessingResponse``s
into DATA frames. So the decision code, its error handling and the reply builders are the
product's own.

What the framing layer does: connection preface; SETTINGS (+ACK; the peer's INITIAL_WINDOW_SIZE
and MAX_FRAME_SIZE are honoured); PING (+ACK); HPACK decoding of request headers (``hpack``
package, one decoder per connection, HEADERS+CONTINUATION); method dispatch on ``:path``
(ext_proc ``Process``, ``grpc.health.v1.Health/Check`` answers SERVING, anything else
UNIMPLEMENTED); gRPC length-prefixed message reassembly across DATA frames; outgoing flow control
(connection and stream windows, DATA split at the peer's max frame size, blocked data resumed on
WINDOW_UPDATE); a 2 GiB receive window announced once (connection WINDOW_UPDATEs every GiB);
RST_STREAM and connection loss cancel the stream's task; an exception in the servicer ends the
stream with grpc-status 13. All frames produced in one loop iteration go out in one write.

Gaps (why this is not landed): no GOAWAY/graceful drain on shutdown, no compressed messages
(Envoy does not compress unless asked), no grpc-timeout, no h2 protocol-error reporting (a
malformed connection is closed), SETTINGS_MAX_CONCURRENT_STREAMS not enforced, and it has only
been exercised by Envoy 1.40 and grpcio clients.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import struct
from typing import Any

import grpc
from hpack import Decoder

log = logging.getLogger("bench.h2_extproc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH, PING, GOAWAY, WINDOW_UPDATE, CONT = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
BIG_WINDOW = 2**31 - 1
PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_PATH = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
_u32 = struct.Struct(">I")

# HPACK, no dynamic table use on our side: ":status: 200" (static 8), "content-type:
# application/grpc" (literal without indexing, static name 31)
RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"


def _trailers(status: int) -> bytes:
    code = str(status).encode()
    return b"\x00\x0bgrpc-status" + bytes([len(code)]) + code


TRAILERS_OK = _trailers(0)


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    n = len(payload)
    head = bytes((n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, kind, flags))
    return head + _u32.pack(stream) + payload


class StreamContext:
    """What ``ExtProcServicer.Process`` uses of a grpc.aio context: ``read()`` and ``write()``."""

    __slots__ = ("conn", "driver", "ended", "queue", "sid", "waiter")

    def __init__(self, conn: H2ExtProc, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.queue: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.driver: InlineDriver | None = None

    async def read(self) -> Any:
        queue = self.queue
        while not queue:
            if self.ended:
                return grpc.aio.EOF
            self.waiter = self.conn.loop.create_future()
            await self.waiter
        return queue.popleft()

    async def write(self, message: Any) -> None:
        self.conn.send_message(self.sid, message.SerializeToString())

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
            d = self.driver
            if d is not None and d.on_read:
                d.step()


class InlineDriver:
    """EXPERIMENT (``inline=True``): step ``Process`` directly instead of in an ``asyncio.Task``.

    While the coroutine waits for its own ``read()``, the frame parser resumes it synchronously
    (no loop round trip per message); any other awaited future is waited on like a Task would.
    Not a drop-in Task: ``asyncio.current_task()`` is None inside (``asyncio.timeout`` fails).
    """

    __slots__ = ("conn", "coro", "ctx", "on_read", "sid", "waiting")

    def __init__(self, conn: H2ExtProc, sid: int, ctx: StreamContext, coro: Any) -> None:
        self.conn, self.sid, self.ctx, self.coro = conn, sid, ctx, coro
        self.on_read = False
        self.waiting: Any = None

    def step(self, exc: BaseException | None = None) -> None:
        self.on_read = False
        try:
            fut = self.coro.send(None) if exc is None else self.coro.throw(exc)
        except StopIteration:
            self.conn._finish(self.sid, TRAILERS_OK)
            return
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("ext_proc stream %d failed", self.sid)
            self.conn._finish(self.sid, _trailers(13))
            return
        if fut is not None and fut is self.ctx.waiter:
            self.on_read = True
        elif fut is None:
            self.conn.loop.call_soon(self.step)
        else:
            fut._asyncio_future_blocking = False
            self.waiting = fut
            fut.add_done_callback(self._wakeup)

    def _wakeup(self, fut: Any) -> None:
        self.waiting = None
        self.step()

    def cancel(self) -> None:
        if self.waiting is not None:
            self.waiting.remove_done_callback(self._wakeup)
            self.waiting.cancel()
            self.waiting = None
        self.step(asyncio.CancelledError())


class Stream:
    __slots__ = (
        "block",
        "buf",
        "closing",
        "ctx",
        "headers_sent",
        "path",
        "pending",
        "task",
        "window",
    )

    def __init__(self, window: int) -> None:
        self.buf = b""
        self.block = b""  # header block being assembled (HEADERS + CONTINUATION)
        self.path = ""
        self.headers_sent = False
        self.ctx: StreamContext | None = None
        self.task: asyncio.Task[Any] | None = None
        self.pending = b""  # DATA waiting for flow-control window
        self.closing: bytes | None = None  # trailers to send once pending is flushed
        self.window = window


class H2ExtProc(asyncio.Protocol):
    def __init__(self, servicer: Any, deserialize: Any, inline: bool = False) -> None:
        self.servicer = servicer
        self.inline = inline
        self.deserialize = deserialize
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.buf = b""
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.decoder = Decoder()
        self.consumed = 0
        self.send_window = 65535
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.blocked: set[int] = set()
        self.closed = False
        self.last_sid = 0

    # ---- output ----------------------------------------------------------------------------
    def _emit(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.out and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def send_message(self, sid: int, payload: bytes) -> None:
        s = self.streams.get(sid)
        if s is None:
            return  # reset by the peer meanwhile
        if not s.headers_sent:
            s.headers_sent = True
            self._emit(frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
        data = b"\x00" + _u32.pack(len(payload)) + payload
        s.pending = s.pending + data if s.pending else data
        self._pump(sid, s)

    def _pump(self, sid: int, s: Stream) -> None:
        while s.pending:
            n = min(len(s.pending), self.send_window, s.window, self.peer_max_frame)
            if n <= 0:
                self.blocked.add(sid)
                return
            chunk, s.pending = s.pending[:n], s.pending[n:]
            self.send_window -= n
            s.window -= n
            self._emit(frame(DATA, 0, sid, chunk))
        self.blocked.discard(sid)
        if s.closing is not None:
            self._emit(frame(HEADERS, END_HEADERS | END_STREAM, sid, s.closing))
            del self.streams[sid]

    def _finish(self, sid: int, trailers: bytes) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        if not s.headers_sent:
            s.headers_sent = True
            self._emit(frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
        s.closing = trailers
        self._pump(sid, s)

    # ---- connection --------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        settings = struct.pack(">HI", 0x3, 1 << 20) + struct.pack(">HI", 0x4, BIG_WINDOW)
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _u32.pack(BIG_WINDOW - 65535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for s in list(self.streams.values()):
            if s.task is not None:
                s.task.cancel()
            elif s.ctx is not None and s.ctx.driver is not None:
                s.ctx.driver.cancel()
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.preface:
            if len(buf) < 24:
                self.buf = buf
                return
            if buf[:24] != PREFACE:
                self.transport.close()
                return
            self.preface = True
            buf = buf[24:]
        i, n = 0, len(buf)
        streams = self.streams
        try:
            while n - i >= 9:
                length = buf[i] << 16 | buf[i + 1] << 8 | buf[i + 2]
                if n - i - 9 < length:
                    break
                kind, flags = buf[i + 3], buf[i + 4]
                sid = _u32.unpack_from(buf, i + 5)[0] & 0x7FFFFFFF
                payload = buf[i + 9 : i + 9 + length]
                i += 9 + length
                if kind == DATA:
                    self.consumed += length
                    s = streams.get(sid)
                    if s is None:
                        continue
                    if flags & PADDED:
                        payload = payload[1 : length - payload[0]]
                    if payload:
                        self._messages(sid, s, payload)
                    if flags & END_STREAM:
                        self._remote_end(sid, s)
                elif kind in (HEADERS, CONT):
                    self._headers(sid, kind, flags, payload)
                elif kind == SETTINGS:
                    if not flags & ACK:
                        self._settings(payload)
                        self._emit(frame(SETTINGS, ACK, 0, b""))
                elif kind == PING:
                    if not flags & ACK:
                        self._emit(frame(PING, ACK, 0, payload))
                elif kind == WINDOW_UPDATE:
                    inc = _u32.unpack_from(payload)[0] & 0x7FFFFFFF
                    if sid == 0:
                        self.send_window += inc
                        for bsid in list(self.blocked):
                            bs = streams.get(bsid)
                            if bs is not None:
                                self._pump(bsid, bs)
                    else:
                        s = streams.get(sid)
                        if s is not None:
                            s.window += inc
                            self._pump(sid, s)
                elif kind == RST_STREAM:
                    s = streams.pop(sid, None)
                    self.blocked.discard(sid)
                    if s is not None and s.task is not None:
                        s.task.cancel()
                    elif s is not None and s.ctx is not None and s.ctx.driver is not None:
                        s.ctx.driver.cancel()
                elif kind == GOAWAY:
                    pass  # Envoy opens a new connection; streams here finish normally
        except Exception:  # a malformed connection is closed, the process goes on
            log.exception("HTTP/2 connection closed after a framing error")
            self.transport.close()
            return
        self.buf = buf[i:] if i < n else b""
        if self.consumed > 1 << 30:
            self._emit(frame(WINDOW_UPDATE, 0, 0, _u32.pack(self.consumed)))
            self.consumed = 0
        if self.out:
            self._flush()

    def _settings(self, payload: bytes) -> None:
        for j in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from(">HI", payload, j)
            if ident == 0x4:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.window += delta
            elif ident == 0x5:
                self.peer_max_frame = value

    def _headers(self, sid: int, kind: int, flags: int, payload: bytes) -> None:
        s = self.streams.get(sid)
        if kind == HEADERS:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if flags & PRIO_FLAG:
                payload = payload[5:]
            if s is None:
                if sid <= self.last_sid:  # trailers of a stream already answered: decode only
                    if flags & END_HEADERS:
                        self.decoder.decode(payload)
                    return
                self.last_sid = sid
                s = self.streams[sid] = Stream(self.peer_initial_window)
        if s is None:
            return
        s.block += payload
        if not flags & END_HEADERS:
            return
        block, s.block = s.block, b""
        # always decoded, even when unused: keeps the HPACK table in step with Envoy's
        headers: Any = self.decoder.decode(block)
        if s.ctx is None and not s.path:
            for name, value in headers:
                if name == ":path":
                    s.path = value
                    break
            if s.path == PROCESS_PATH:
                ctx = s.ctx = StreamContext(self, sid)
                if self.inline:
                    ctx.driver = InlineDriver(self, sid, ctx, self.servicer.Process(None, ctx))
                    ctx.driver.step()
                else:
                    s.task = self.loop.create_task(self.servicer.Process(None, ctx))
                    s.task.add_done_callback(functools.partial(self._done, sid))
            elif s.path != HEALTH_PATH:
                self._finish(sid, _trailers(12))  # UNIMPLEMENTED
        if flags & END_STREAM:
            self._remote_end(sid, s)

    def _messages(self, sid: int, s: Stream, payload: bytes) -> None:
        buf = s.buf + payload if s.buf else payload
        j, n = 0, len(buf)
        while n - j >= 5:
            mlen = _u32.unpack_from(buf, j + 1)[0]
            if n - j - 5 < mlen:
                break
            raw = buf[j + 5 : j + 5 + mlen]
            j += 5 + mlen
            if s.ctx is not None:
                s.ctx.queue.append(self.deserialize(raw))
                s.ctx.wake()
            elif s.path == HEALTH_PATH:
                self.send_message(sid, HEALTH_SERVING)
                self._finish(sid, TRAILERS_OK)
        s.buf = buf[j:] if j < n else b""

    def _remote_end(self, sid: int, s: Stream) -> None:
        if s.ctx is not None:
            s.ctx.ended = True
            s.ctx.wake()

    def _done(self, sid: int, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("ext_proc stream %d failed", sid, exc_info=exc)
            self._finish(sid, _trailers(13))
        else:
            self._finish(sid, TRAILERS_OK)


async def start_h2(servicer: Any, host: str, port: int, inline: bool = False) -> asyncio.Server:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    loop = asyncio.get_running_loop()
    deserialize = pb.ProcessingRequest.FromString
    return await loop.create_server(lambda: H2ExtProc(servicer, deserialize, inline), host, port)


def serve_h2(port: int, servicer: Any, inline: bool = False) -> None:
    async def run() -> None:
        server = await start_h2(servicer, "127.0.0.1", port, inline)
        async with server:
            await server.serve_forever()

    asyncio.run(run())
