"""extproc.transport_h2 against grpcio clients (and a raw socket for protocol errors)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.transport.h2 import PROCESS_PATH, GrpcMethod, H2Server

pytestmark = pytest.mark.timeout(60)

SUM_PATH = "/test.Sum/Add"
STALL_PATH = "/test.Stall/Hold"  # a handler that never reads
BIG = 10 * 1024 * 1024


class Echo:
    """Answers every request: its body length in a header reply; ``big`` gets a 10 MB body."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finished: list[str] = []  # "eof" | "cancelled"

    async def Process(self, request_iterator: Any, context: Any) -> None:
        self.started.set()
        try:
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    self.finished.append("eof")
                    return
                body = req.request_body.body
                if body == b"boom":
                    raise RuntimeError("handler failed on purpose")
                reply = pb.ProcessingResponse()
                if body == b"big":
                    reply.request_body.response.body_mutation.body = b"x" * BIG
                else:
                    reply.request_body.response.body_mutation.body = str(len(body)).encode()
                await context.write(reply)
        except asyncio.CancelledError:
            self.finished.append("cancelled")
            raise


async def add(request_iterator: Any, context: Any) -> pb.ProcessingResponse:
    total = 0
    async for req in request_iterator:
        total += len(req.request_body.body)
    reply = pb.ProcessingResponse()
    reply.request_body.response.body_mutation.body = str(total).encode()
    return reply


async def stall(request_iterator: Any, context: Any) -> None:
    await asyncio.Event().wait()


def body(data: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))


@pytest.fixture
async def served() -> AsyncIterator[tuple[H2Server, Echo, grpc.aio.Channel]]:
    echo = Echo()
    parse = pb.ProcessingRequest.FromString
    server = H2Server(
        {
            PROCESS_PATH: GrpcMethod(echo.Process, parse),
            SUM_PATH: GrpcMethod(add, parse, unary_response=True),
            STALL_PATH: GrpcMethod(stall, bytes),
        },
        health_services=("", "envoy.service.ext_proc.v3.ExternalProcessor"),
        max_concurrent_streams=64,
        max_message=1024 * 1024,
    )
    await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 2 * BIG)]
    )
    try:
        yield server, echo, channel
    finally:
        await channel.close()
        await server.stop(grace=0.5)


def process_call(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(
        PROCESS_PATH,
        request_serializer=pb.ProcessingRequest.SerializeToString,
        response_deserializer=pb.ProcessingResponse.FromString,
    )()


async def test_bidirectional_stream_runs_the_handler(served: Any) -> None:
    _, echo, channel = served
    call = process_call(channel)
    for data in (b"a", b"bbb", b"c" * 70_000):  # the last one spans several DATA frames
        await call.write(body(data))
        reply = await call.read()
        assert reply.request_body.response.body_mutation.body == str(len(data)).encode()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert echo.finished == ["eof"]


async def test_a_10_mb_reply_respects_flow_control(served: Any) -> None:
    server, _, channel = served
    calls = [process_call(channel) for _ in range(3)]  # three at once share the windows
    for call in calls:
        await call.write(body(b"big"))
    for call in calls:
        reply = await call.read()
        assert len(reply.request_body.response.body_mutation.body) == BIG
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert server.active_streams == 0


async def test_client_streaming_method_returns_its_one_reply(served: Any) -> None:
    _, _, channel = served
    call = channel.stream_unary(
        SUM_PATH,
        request_serializer=pb.ProcessingRequest.SerializeToString,
        response_deserializer=pb.ProcessingResponse.FromString,
    )
    reply = await call(iter([body(b"ab"), body(b"cde")]))
    assert reply.request_body.response.body_mutation.body == b"5"


async def test_health_check(served: Any) -> None:
    server, _, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in (err.value.details() or "")
    server.stopping = True  # what extproc.main sets first when it shuts down
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_unknown_method_is_unimplemented(served: Any) -> None:
    _, _, channel = served
    call = channel.unary_unary("/no.Such/Method")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/no.Such/Method" in (err.value.details() or "")


async def test_handler_exception_is_internal(served: Any) -> None:
    _, _, channel = served
    call = process_call(channel)
    await call.write(body(b"boom"))
    assert await call.code() == grpc.StatusCode.INTERNAL
    assert "on purpose" in (await call.details())


async def test_compressed_message_is_refused(served: Any) -> None:
    _, echo, channel = served
    call = channel.stream_stream(
        PROCESS_PATH,
        request_serializer=pb.ProcessingRequest.SerializeToString,
        response_deserializer=pb.ProcessingResponse.FromString,
    )(compression=grpc.Compression.Gzip)
    await call.write(body(b"a" * 1000))
    assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "compressed" in (await call.details())
    await asyncio.wait_for(_until(lambda: echo.finished == ["cancelled"]), 20)


async def test_message_over_the_limit_is_resource_exhausted(served: Any) -> None:
    _, _, channel = served
    call = process_call(channel)
    await call.write(body(b"x" * (2 * 1024 * 1024)))
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_client_cancel_cancels_the_handler(served: Any) -> None:
    server, echo, channel = served
    call = process_call(channel)
    await call.write(body(b"a"))
    await call.read()
    call.cancel()  # RST_STREAM
    await asyncio.wait_for(_until(lambda: echo.finished == ["cancelled"]), 20)
    await asyncio.wait_for(_until(lambda: server.active_streams == 0), 20)


async def test_stop_lets_in_flight_streams_finish_and_refuses_new_ones(served: Any) -> None:
    server, echo, channel = served
    port = server.port
    call = process_call(channel)
    await call.write(body(b"a"))
    await call.read()
    stopping = asyncio.create_task(server.stop(grace=10))
    await asyncio.wait_for(_until(lambda: server.stopping), 20)
    # the open stream still works after GOAWAY
    await call.write(body(b"bb"))
    assert (await call.read()).request_body.response.body_mutation.body == b"2"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(stopping, 20)
    assert echo.finished == ["eof"]
    # and the listener is gone
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


async def test_stop_cancels_streams_that_outlive_the_grace(served: Any) -> None:
    server, echo, channel = served
    call = process_call(channel)
    await call.write(body(b"a"))
    await call.read()
    await asyncio.wait_for(server.stop(grace=0.2), 20)
    assert echo.finished == ["cancelled"]
    assert await call.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_protocol_error_gets_goaway_and_the_server_goes_on(served: Any) -> None:
    server, _, channel = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    # a DATA frame on stream 0 is a connection error (PROTOCOL_ERROR)
    writer.write(preface + settings + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    received = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), 20)
        if not chunk:
            break
        received += chunk
    writer.close()
    assert _frame_types(received)[-1] == 0x7  # GOAWAY last, then the connection closed
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_peer_goaway_lets_streams_in_flight_finish_then_closes(served: Any) -> None:
    """Envoy drains a connection with GOAWAY NO_ERROR and goes on with its streams in flight
    (RFC 9113 6.8): they finish, then the server closes the connection."""
    server, echo, _ = served
    reader, writer = await _open_echo_stream(server.port)
    await asyncio.wait_for(echo.started.wait(), 20)
    writer.write(_goaway_frame(0) + _raw_frame(0x0, 0x1, 1, _grpc_message(body(b"abcd"))))
    received = await asyncio.wait_for(_read_all(reader), 20)  # the server closes
    writer.close()
    frames = [f for f in _frames(received) if f[2] == 1]
    replies = [pb.ProcessingResponse.FromString(f[3][5:]) for f in frames if f[0] == 0x0]
    assert [r.request_body.response.body_mutation.body for r in replies] == [b"3", b"4"]
    assert frames[-1][0] == 0x1 and frames[-1][1] & 0x1  # trailers, END_STREAM
    assert echo.finished == ["eof"]
    await asyncio.wait_for(_until(lambda: server.active_streams == 0), 20)


async def test_peer_goaway_with_an_error_cancels_streams_in_flight(served: Any) -> None:
    server, echo, _ = served
    reader, writer = await _open_echo_stream(server.port)
    await asyncio.wait_for(echo.started.wait(), 20)
    writer.write(_goaway_frame(0x2))  # INTERNAL_ERROR
    await asyncio.wait_for(_until(lambda: echo.finished == ["cancelled"]), 20)
    await asyncio.wait_for(_read_to_eof(reader), 5)  # times out unless the server closes
    writer.close()
    await asyncio.wait_for(_until(lambda: server.active_streams == 0), 20)


async def test_a_protocol_error_after_a_goaway_still_reads_on_until_the_peer_closes(
    served: Any,
) -> None:
    """After the peer's GOAWAY NO_ERROR (the connection closes once idle), a protocol error
    while a stream is in flight: the error's GOAWAY, then only our end is shut (FIN) and the
    server reads on until the peer closes, so no TCP reset can destroy the GOAWAY."""
    server, _, _ = served
    reader, writer = await _open_raw(server.port, (1,))
    await asyncio.wait_for(_until(lambda: server.active_streams == 1), 20)
    connections = len(server._connections)  # ours among them
    writer.write(_goaway_frame(0) + _raw_frame(0x0, 0, 0, b"x"))  # then DATA on stream 0
    received = await asyncio.wait_for(_read_all(reader), 20)  # up to the server's FIN
    assert _frame_types(received)[-1] == 0x7
    assert int.from_bytes(_frames(received)[-1][3][4:8], "big") == 0x1  # PROTOCOL_ERROR
    assert len(server._connections) == connections  # still reading: not closed at once
    writer.close()
    await asyncio.wait_for(_until(lambda: len(server._connections) < connections), 20)
    assert server.active_streams == 0


async def test_ping_is_answered_with_its_payload(served: Any) -> None:
    server, _, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    writer.write(PREFACE + EMPTY_SETTINGS + ping)
    data = b""
    while not any(kind == 0x6 for kind, *_ in _frames(data)):
        data += await asyncio.wait_for(reader.read(65536), 20)
    writer.close()
    (ack,) = [f for f in _frames(data) if f[0] == 0x6]
    assert ack[1] == 0x1 and ack[3] == b"12345678"  # ACK, the same 8 bytes


async def test_a_client_that_is_not_http2_gets_goaway(served: Any) -> None:
    server, _, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n\r\n")
    received = await asyncio.wait_for(_read_all(reader), 20)
    writer.close()
    assert _frame_types(received)[-1] == 0x7  # our SETTINGS, then GOAWAY, then closed


async def test_padding_and_a_header_block_in_continuation_frames(served: Any) -> None:
    """A padded DATA frame and a 40 KB header block (HEADERS + CONTINUATION, sent before the
    server's SETTINGS raise the frame size) reach the handler like any other request."""
    import h2.config
    import h2.connection
    import h2.events

    server, _, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "test"),
        (":path", PROCESS_PATH),
        ("content-type", "application/grpc"),
        ("x-large", "v" * 40_000),
    ]
    client.send_headers(1, headers)
    raw = body(b"abcd").SerializeToString()
    client.send_data(1, b"\x00" + len(raw).to_bytes(4, "big") + raw, pad_length=17)
    sent = client.data_to_send()
    assert 0x9 in _frame_types(sent[len(PREFACE) :])  # CONTINUATION on the wire
    writer.write(sent)
    message = b""
    while len(message) < 5 or len(message) < 5 + int.from_bytes(message[1:5], "big"):
        events = client.receive_data(await asyncio.wait_for(reader.read(65536), 20))
        writer.write(client.data_to_send())
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                message += event.data
    reply = pb.ProcessingResponse.FromString(message[5:])
    assert reply.request_body.response.body_mutation.body == b"4"
    writer.close()


# ------------------------------------------------------------ flow control and stream id rules

FLOW_CONTROL_ERROR, PROTOCOL_ERROR_CODE, FRAME_SIZE_ERROR = 0x3, 0x1, 0x6
MESSAGE = 1_000_000  # under the fixture's 1 MiB message limit


async def test_data_past_a_stream_window_resets_that_stream(served: Any) -> None:
    """A peer that sends more than the 8 MiB stream window to a handler that does not read gets
    RST_STREAM FLOW_CONTROL_ERROR on that stream; the connection goes on."""
    server, _, _ = served
    reader, writer = await _open_raw(server.port, (1,))
    writer.write(_messages(1, 9, MESSAGE) + _ping())
    frames = await _read_frames_until(reader, lambda f: f[0] == 0x6 and f[1] == 0x1)
    writer.close()
    assert (0x3, 1, FLOW_CONTROL_ERROR) in _resets(frames)
    assert not [f for f in frames if f[0] == 0x7]  # no GOAWAY


async def test_data_past_the_connection_window_is_a_connection_error(served: Any) -> None:
    """Nine streams, each within its 8 MiB window, together past the 64 MiB connection window
    while their handlers do not read: GOAWAY FLOW_CONTROL_ERROR, then the connection closes."""
    server, _, _ = served
    sids = tuple(range(1, 19, 2))
    reader, writer = await _open_raw(server.port, sids)
    for sid in sids:
        writer.write(_messages(sid, 8, MESSAGE))
    received = await asyncio.wait_for(_read_all(reader), 30)
    writer.close()
    kind, _, _, payload = _frames(received)[-1]
    assert kind == 0x7
    assert int.from_bytes(payload[4:8], "big") == FLOW_CONTROL_ERROR


async def test_windows_are_given_back_as_the_handler_reads(served: Any) -> None:
    """75 MB through one connection (12 MB per stream): past both receive windows, so each
    is given back as the handler consumes the messages."""
    _, _, channel = served
    data = b"d" * 900_000
    for _ in range(7):
        call = process_call(channel)
        for _ in range(12):
            await call.write(body(data))
            reply = await call.read()
            assert reply.request_body.response.body_mutation.body == str(len(data)).encode()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param(lambda: _window_update(5, 1), PROTOCOL_ERROR_CODE, id="WINDOW_UPDATE-idle"),
        pytest.param(lambda: _rst(7), PROTOCOL_ERROR_CODE, id="RST_STREAM-idle"),
        pytest.param(lambda: _raw_frame(0x0, 0, 2, b"x"), PROTOCOL_ERROR_CODE, id="DATA-even"),
        pytest.param(lambda: _window_update(2, 1), PROTOCOL_ERROR_CODE, id="WINDOW_UPDATE-even"),
        pytest.param(lambda: _rst(2), PROTOCOL_ERROR_CODE, id="RST_STREAM-even"),
        pytest.param(lambda: _raw_frame(0x2, 0, 5, b"\0" * 4), FRAME_SIZE_ERROR, id="PRIORITY-4"),
        pytest.param(
            lambda: _raw_frame(0x2, 0, 5, b"\0\0\0\x05\x10"),
            PROTOCOL_ERROR_CODE,
            id="PRIORITY-self",
        ),
        pytest.param(lambda: _raw_frame(0x7, 0, 0, b"\0" * 4), FRAME_SIZE_ERROR, id="GOAWAY-short"),
        pytest.param(
            lambda: _raw_frame(0x1, 0, 5) + _raw_frame(0x9, 0, 5) * 100,
            PROTOCOL_ERROR_CODE,
            id="CONTINUATION-flood",
        ),
        pytest.param(
            lambda: _window_update(1, 2**31 - 1 - 65535) + _settings(0x4, 65536),
            FLOW_CONTROL_ERROR,
            id="initial-window-past-2^31-1",
        ),
    ],
)
async def test_connection_errors_get_goaway(served: Any, frames: Any, code: int) -> None:
    """Frames on idle streams (above the highest opened, or even ids) other than HEADERS and
    PRIORITY, and other RFC 9113 connection errors: GOAWAY with the code and the last stream
    id, then the connection closes; the handlers of the open streams are cancelled."""
    server, _, _ = served
    reader, writer = await _open_raw(server.port, (1, 3))
    writer.write(frames())
    received = await asyncio.wait_for(_read_all(reader), 20)
    writer.close()
    kind, _, _, payload = _frames(received)[-1]
    assert kind == 0x7
    assert (int.from_bytes(payload[:4], "big"), int.from_bytes(payload[4:8], "big")) == (3, code)
    await asyncio.wait_for(_until(lambda: server.active_streams == 0), 20)


async def test_frames_on_closed_streams_and_priority_on_idle_ones_are_ignored(
    served: Any,
) -> None:
    server, _, _ = served
    reader, writer = await _open_raw(server.port, (1, 3))
    writer.write(
        _rst(1)  # the client cancels stream 1: later frames for it are dropped
        + _window_update(1, 10)
        + _raw_frame(0x0, 0x1, 1, b"late")
        + _raw_frame(0x2, 0, 9, b"\0\0\0\0\x10")  # PRIORITY is allowed on an idle stream
        + _ping()
    )
    frames = await _read_frames_until(reader, lambda f: f[0] == 0x6 and f[1] == 0x1)
    writer.close()
    assert not [f for f in frames if f[0] in (0x3, 0x7)]  # no RST_STREAM, no GOAWAY


async def test_trailers_after_the_end_of_stream_reset_the_stream(served: Any) -> None:
    import h2.config
    import h2.connection

    server, _, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, _request_headers(STALL_PATH), end_stream=True)
    head = client.data_to_send()
    encoder = client.encoder  # the same HPACK state, for a second header block on stream 1
    trailers = encoder.encode([("x-trailer", "1")])
    writer.write(head + _raw_frame(0x1, 0x1 | 0x4, 1, trailers) + _ping())
    frames = await _read_frames_until(reader, lambda f: f[0] == 0x6 and f[1] == 0x1)
    writer.close()
    assert (0x3, 1, 0x5) in _resets(frames)  # STREAM_CLOSED


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        H2Server({}, max_concurrent_streams=0)
    with pytest.raises(ValueError, match="method path"):
        H2Server({"Process": GrpcMethod(add, bytes)})


# ---------------------------------------------------------------------------------------- helpers


async def _until(cond: Any) -> None:
    while not cond():  # noqa: ASYNC110  (polled; callers bound it with wait_for)
        await asyncio.sleep(0.01)


async def _read_to_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each complete frame."""
    out, i = [], 0
    while len(data) - i >= 9:
        length = int.from_bytes(data[i : i + 3], "big")
        if len(data) - i - 9 < length:
            break
        sid = int.from_bytes(data[i + 5 : i + 9], "big") & 0x7FFFFFFF
        out.append((data[i + 3], data[i + 4], sid, data[i + 9 : i + 9 + length]))
        i += 9 + length
    return out


def _frame_types(data: bytes) -> list[int]:
    out, i = [], 0
    while len(data) - i >= 9:
        length = int.from_bytes(data[i : i + 3], "big")
        out.append(data[i + 3])
        i += 9 + length
    return out


def _request_headers(path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "test"),
        (":path", path),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


async def _open_raw(
    port: int, sids: tuple[int, ...]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with these streams open on STALL_PATH (headers encoded by ``h2``); the rest
    of the test writes raw frames."""
    import h2.config
    import h2.connection

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for sid in sids:
        client.send_headers(sid, _request_headers(STALL_PATH))
    writer.write(client.data_to_send())
    return reader, writer


def _raw_frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") + payload


def _window_update(sid: int, increment: int) -> bytes:
    return _raw_frame(0x8, 0, sid, increment.to_bytes(4, "big"))


def _rst(sid: int, code: int = 0x8) -> bytes:
    return _raw_frame(0x3, 0, sid, code.to_bytes(4, "big"))


def _settings(key: int, value: int) -> bytes:
    return _raw_frame(0x4, 0, 0, key.to_bytes(2, "big") + value.to_bytes(4, "big"))


def _ping() -> bytes:
    return _raw_frame(0x6, 0, 0, b"pingpong")


def _messages(sid: int, count: int, size: int) -> bytes:
    """``count`` gRPC messages of ``size`` bytes in 16 KiB DATA frames, ignoring every window."""
    data = (b"\0" + size.to_bytes(4, "big") + b"m" * size) * count
    step = 16384
    return b"".join(_raw_frame(0x0, 0, sid, data[k : k + step]) for k in range(0, len(data), step))


def _resets(frames: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int, int]]:
    """(0x3, stream id, error code) of each RST_STREAM."""
    return [(kind, sid, int.from_bytes(p, "big")) for kind, _, sid, p in frames if kind == 0x3]


async def _read_frames_until(
    reader: asyncio.StreamReader, done: Any
) -> list[tuple[int, int, int, bytes]]:
    """The frames received up to the first one ``done`` accepts (20 s at most)."""

    async def read() -> list[tuple[int, int, int, bytes]]:
        data = b""
        while True:
            chunk = await reader.read(65536)
            assert chunk, "the server closed the connection"
            data += chunk
            frames = _frames(data)
            if any(done(f) for f in frames):
                return frames

    return await asyncio.wait_for(read(), 20)


def _grpc_message(message: Any) -> bytes:
    raw: bytes = message.SerializeToString()
    return b"\0" + len(raw).to_bytes(4, "big") + raw


def _goaway_frame(code: int) -> bytes:
    return _raw_frame(0x7, 0, 0, (0).to_bytes(4, "big") + code.to_bytes(4, "big"))


async def _open_echo_stream(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection with stream 1 open on the Echo handler, its first message ``abc`` sent."""
    import h2.config
    import h2.connection

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, _request_headers(PROCESS_PATH))
    client.send_data(1, _grpc_message(body(b"abc")))
    writer.write(client.data_to_send())
    return reader, writer
