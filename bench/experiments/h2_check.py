"""Self-check of the HTTP/2 prototype's flow control (not a test; exits 1 on a mismatch).

``python -m bench.experiments.h2_check [--inline]``: a servicer that answers each request body
with a ``body_mutation`` of 3x its size (up to 3 MB: many DATA frames, past grpcio's 64 KiB initial
window, so sending blocks and resumes on WINDOW_UPDATE), called by a grpcio client, 20 streams
in parallel, each checked byte for byte; then a health check and an unknown method.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.experiments.h2_extproc import start_h2
from matrixinfer.process import free_port


class Echo:
    async def Process(self, request_iterator: object, context: Any) -> None:
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            if req.WhichOneof("request") == "request_headers":
                await context.write(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
            else:
                body = req.request_body.body * 3
                reply = pb.ProcessingResponse(request_body=pb.BodyResponse())
                reply.request_body.response.body_mutation.body = body
                await context.write(reply)


def main() -> int:
    port = free_port()
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        await start_h2(Echo(), "127.0.0.1", port, inline="--inline" in sys.argv)
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True).start()
    ready.wait(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.ExternalProcessorStub(channel)

    def one(i: int) -> bool:
        body = bytes([i % 251]) * (1000 + i * 50_000)
        msgs = [
            pb.ProcessingRequest(request_headers=pb.HttpHeaders()),
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
        ]
        replies = list(stub.Process(iter(msgs), timeout=20))
        return len(replies) == 2 and (
            replies[1].request_body.response.body_mutation.body == body * 3
        )

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    try:
        channel.unary_unary("/no.Such/Method")(b"", timeout=5)
        unknown = "OK?!"
    except grpc.RpcError as exc:
        unknown = exc.code().name
    ok = all(results) and health.status == health.SERVING and unknown == "UNIMPLEMENTED"
    print(f"echo streams ok: {sum(results)}/20, health {health.status}, unknown method {unknown}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
