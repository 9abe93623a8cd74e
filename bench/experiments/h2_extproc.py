"""PROTOTYPE: an ext_proc server on a hand-written HTTP/2 framing layer (asyncio Protocol).

Not product code and not safe to deploy: it is the measurement of how cheap the Python side of
ext_proc can be when gRPC's per-message machinery is bypassed. Known gaps, all deliberate:

- request HEADERS (and CONTINUATION) blocks are not HPACK-decoded: every stream is treated as
  ``ExternalProcessor/Process`` (no health service, no grpc-timeout, no method check);
- replies must fit one DATA frame (< 16 KiB, Envoy's default max frame size) and the peer's flow
  control windows are not tracked (Envoy opens 256 MiB windows by default);
- no GOAWAY on shutdown, no PRIORITY handling beyond ignoring it.

What it does do: the connection preface, SETTINGS (+ACK), PING (+ACK), a very large receive window
(announced once; connection WINDOW_UPDATEs every GiB), gRPC length-prefixed message reassembly
across DATA frames, per-stream state, RST_STREAM, and one ``transport.write`` per
``data_received`` (all replies of a read batched).

``handler`` protocol: ``begin(stream_id) -> state``, ``message(state, raw) -> list[bytes]``
(serialized ProcessingResponses), ``end(state)`` when the stream closes (either way).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH, PING, GOAWAY, WINDOW_UPDATE, CONT = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
BIG_WINDOW = 2**31 - 1
_hdr = struct.Struct(">I")

# HPACK, no dynamic table use on our side: ":status: 200" (static 8), "content-type:
# application/grpc" (literal without indexing, static name 31)
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + bytes([16]) + b"application/grpc"
TRAILERS_OK = b"\x00" + bytes([11]) + b"grpc-status" + bytes([1]) + b"0"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    n = len(payload)
    return (
        bytes((n >> 16 & 0xFF, n >> 8 & 0xFF, n & 0xFF, kind, flags)) + _hdr.pack(stream) + payload
    )


class Stream:
    __slots__ = ("buf", "headers_sent", "state")

    def __init__(self, state: Any) -> None:
        self.buf = b""
        self.headers_sent = False
        self.state = state


class H2ExtProc(asyncio.Protocol):
    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.buf = b""
        self.preface = False
        self.streams: dict[int, Stream] = {}
        self.consumed = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        settings = struct.pack(">HI", 0x3, 1 << 20) + struct.pack(">HI", 0x4, BIG_WINDOW)
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _hdr.pack(BIG_WINDOW - 65535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        for s in self.streams.values():
            self.handler.end(s.state)
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.preface:
            if len(buf) < 24:
                self.buf = buf
                return
            if buf[:24] != PREFACE:
                assert self.transport is not None
                self.transport.close()
                return
            self.preface = True
            buf = buf[24:]
        out: list[bytes] = []
        i, n = 0, len(buf)
        streams = self.streams
        while n - i >= 9:
            length = buf[i] << 16 | buf[i + 1] << 8 | buf[i + 2]
            if n - i - 9 < length:
                break
            kind, flags = buf[i + 3], buf[i + 4]
            sid = _hdr.unpack_from(buf, i + 5)[0] & 0x7FFFFFFF
            payload = buf[i + 9 : i + 9 + length]
            i += 9 + length
            if kind == DATA:
                self.consumed += length
                s = streams.get(sid)
                if s is not None:
                    if flags & PADDED:
                        payload = payload[1 : length - payload[0]]
                    if payload:
                        self._messages(sid, s, payload, out)
                    if flags & END_STREAM:
                        self._close(sid, s, out)
            elif kind == HEADERS:
                s = streams.get(sid)
                if s is None:
                    s = streams[sid] = Stream(self.handler.begin(sid))
                if flags & END_STREAM:  # trailers or a header-only request
                    self._close(sid, s, out)
            elif kind == SETTINGS:
                if not flags & ACK:
                    out.append(frame(SETTINGS, ACK, 0, b""))
            elif kind == PING:
                if not flags & ACK:
                    out.append(frame(PING, ACK, 0, payload))
            elif kind == RST_STREAM:
                s = streams.pop(sid, None)
                if s is not None:
                    self.handler.end(s.state)
            elif kind == GOAWAY:
                pass
            # WINDOW_UPDATE, PRIORITY, CONTINUATION: nothing to do here
        self.buf = buf[i:] if i < n else b""
        if self.consumed > 1 << 30:
            out.append(frame(WINDOW_UPDATE, 0, 0, _hdr.pack(self.consumed)))
            self.consumed = 0
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))

    def _messages(self, sid: int, s: Stream, payload: bytes, out: list[bytes]) -> None:
        buf = s.buf + payload if s.buf else payload
        j, n = 0, len(buf)
        while n - j >= 5:
            mlen = _hdr.unpack_from(buf, j + 1)[0]
            if n - j - 5 < mlen:
                break
            replies = self.handler.message(s.state, buf[j + 5 : j + 5 + mlen])
            j += 5 + mlen
            for reply in replies:
                if not s.headers_sent:
                    out.append(frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
                    s.headers_sent = True
                out.append(frame(DATA, 0, sid, b"\x00" + _hdr.pack(len(reply)) + reply))
        s.buf = buf[j:] if j < n else b""

    def _close(self, sid: int, s: Stream, out: list[bytes]) -> None:
        del self.streams[sid]
        self.handler.end(s.state)
        if not s.headers_sent:
            out.append(frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
        out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, TRAILERS_OK))


class MinimalHandler:
    """Do-nothing: request headers -> empty HeadersResponse, body -> route to the destination."""

    def __init__(self, replies: tuple[Any, Any]) -> None:
        self.h, self.b = (m.SerializeToString() for m in replies)

    def begin(self, sid: int) -> None:
        return None

    def message(self, state: None, raw: bytes) -> list[bytes]:
        from bench.experiments.servers import REQUEST_BODY, REQUEST_HEADERS, kind_of

        kind = kind_of(raw)
        if kind == REQUEST_HEADERS:
            return [self.h]
        if kind == REQUEST_BODY:
            return [self.b]
        return []

    def end(self, state: None) -> None:
        return None


def serve_h2(port: int, replies: tuple[Any, Any], handler: Any = None) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        h = handler or MinimalHandler(replies)
        server = await loop.create_server(lambda: H2ExtProc(h), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(run())
