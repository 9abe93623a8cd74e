"""Transport CPU per ext_proc request without sockets, Envoy or load noise (not a test).

``python -m bench.experiments.h2lib_inproc [--requests 5000] [--reps 5]``

Pre-generates with an ``h2`` client connection the bytes Envoy sends per request (HEADERS, the
request_headers and request_body messages; then END_STREAM and RST_STREAM once the replies are
out), feeds them to a server-side protocol object with a fake transport, and runs the do-nothing
servicer of ``bench.experiments.servers`` on it. Compares ``extproc.transport_h2`` (h2 library)
with the hand-written prototype ``bench.experiments.h2_extproc``: process CPU per request, best of
``--reps`` (the client's cost is paid before the clock starts). ``--real`` adds ``h2lib+real``:
the real ``ExtProcServicer`` + gateway of ``bench.experiments.inproc`` on ``extproc.transport_h2``
(the whole extproc's CPU per request, bar the socket syscalls and the idle background).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.settings
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bench.experiments.servers import aio_pb
from extproc.transport_h2 import PROCESS_PATH, GrpcMethod, H2Server, _Connection

PREFACE_WINDOW = 2**31 - 1


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def close(self) -> None:
        pass


def default_messages() -> list[bytes]:
    """The do-nothing servicer's request_headers and request_body messages."""
    headers = pb.ProcessingRequest()
    for k, v in (
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        ("content-type", "application/json"),
    ):
        headers.request_headers.headers.headers.add(key=k, raw_value=v.encode())
    body = pb.ProcessingRequest()
    body.request_body.body = b'{"model":"demo-model","messages":[]}' + b" " * 1000
    body.request_body.end_of_stream = True
    return [headers.SerializeToString(), body.SerializeToString()]


def envoy_bytes(
    n: int, messages: list[bytes] | None = None
) -> tuple[bytes, list[bytes], list[bytes]]:
    """(connection preface, per-request [HEADERS + 2 messages], per-request [END + RST])."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: PREFACE_WINDOW}
    )
    c.initiate_connection()
    c.increment_flow_control_window(PREFACE_WINDOW - 65535)
    preface = c.data_to_send()
    # the server's SETTINGS and connection window as extproc.transport_h2 announces them
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    srv.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8 << 20}
    )
    srv.initiate_connection()
    srv.increment_flow_control_window((64 << 20) - 65535)
    c.receive_data(srv.data_to_send())
    c.data_to_send()  # the client's SETTINGS ACK: the server under test does not need it
    msgs = b"".join(
        b"\x00" + len(m).to_bytes(4, "big") + m for m in (messages or default_messages())
    )
    starts, ends = [], []
    for i in range(n):
        sid = 2 * i + 1
        c.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "ext_proc"),
                (":path", PROCESS_PATH),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", "200m"),
                ("user-agent", "envoy/1.40"),
                ("x-envoy-internal", "true"),
            ],
        )
        c.send_data(sid, msgs)
        starts.append(c.data_to_send())
        c.end_stream(sid)
        c.reset_stream(sid)
        ends.append(c.data_to_send())
    return preface, starts, ends


async def run_h2lib(preface: bytes, starts: list[bytes], ends: list[bytes]) -> float:
    servicer = aio_pb("127.0.0.1:8000")
    server = H2Server({PROCESS_PATH: GrpcMethod(servicer.Process, pb.ProcessingRequest.FromString)})
    proto = _Connection(server)
    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    return await _drive(proto, preface, starts, ends)


async def run_h2lib_real(preface: bytes, starts: list[bytes], ends: list[bytes]) -> float:
    import tempfile
    from pathlib import Path

    from bench.experiments.inproc import bench_servicer

    with tempfile.TemporaryDirectory() as tmp:
        servicer = bench_servicer(Path(tmp))
        method = GrpcMethod(servicer.Process, pb.ProcessingRequest.FromString)
        proto = _Connection(H2Server({PROCESS_PATH: method}))
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]
        return await _drive(proto, preface, starts, ends)


async def run_prototype(preface: bytes, starts: list[bytes], ends: list[bytes]) -> float:
    from bench.experiments.h2_extproc import H2ExtProc

    proto = H2ExtProc(aio_pb("127.0.0.1:8000"), pb.ProcessingRequest.FromString)
    proto.connection_made(FakeTransport())
    return await _drive(proto, preface, starts, ends)


async def _drive(proto: Any, preface: bytes, starts: list[bytes], ends: list[bytes]) -> float:
    proto.data_received(preface)
    await asyncio.sleep(0)
    t0 = time.process_time()
    for start, end in zip(starts, ends, strict=True):
        proto.data_received(start)
        await asyncio.sleep(0)  # the stream's task reads both messages and writes both replies
        await asyncio.sleep(0)  # the coalesced flush
        proto.data_received(end)
        await asyncio.sleep(0)
    return (time.process_time() - t0) * 1e6 / len(starts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.h2lib_inproc")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--real",
        action="store_true",
        help="also the real servicer + gateway (bench.experiments.inproc's set-up) on extproc's "
        "h2 transport: the whole process's CPU per request without sockets",
    )
    args = p.parse_args(argv)
    import uvloop

    uvloop.install()
    data = envoy_bytes(args.requests)
    results: dict[str, list[float]] = {"h2lib": [], "prototype": []}
    real: list[float] = []
    if args.real:
        from bench.experiments.inproc import messages
        from bench.gateway_overhead import request_body

        real_data = envoy_bytes(
            args.requests, [m.SerializeToString() for m in messages(request_body())]
        )
        results["h2lib+real"] = real
    for _ in range(args.reps):
        results["h2lib"].append(asyncio.run(run_h2lib(*data)))
        results["prototype"].append(asyncio.run(run_prototype(*data)))
        if args.real:
            real.append(asyncio.run(run_h2lib_real(*real_data)))
    for name, values in results.items():
        print(f"{name:12s} best {min(values):6.1f} µs/request  (all: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
