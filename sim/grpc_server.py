"""The simulator's Open Inference Protocol v2 gRPC service (``inference.GRPCInferenceService``).

ModelInfer runs the same engine as ``POST /v1/completions``: the text of the request's BYTES input
tensors is the prompt, the ``max_tokens`` parameter (request or input parameters) the output
limit, and the answer is one BYTES output tensor ``text_output`` with the generated text, plus
the token counts as the response parameters ``prompt_tokens`` and ``completion_tokens`` (int64:
the convention the gateway's usage accounting reads, envoy/usage.lua). ModelStreamInfer answers
each request of the stream with one response once it is generated. Served on ``--grpc-port``
(off by default).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fleet.oip import grpc_predict_v2_pb2 as oip
from fleet.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from sim.engine import QueueFull
from sim.protocol import ApiError, CompletionBody

__all__ = ["OipServicer", "start_grpc"]

log = logging.getLogger("matrixinfer.sim")

OUTPUT_TENSOR = "text_output"
# the gRPC status of the simulator's HTTP error statuses
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _prompt(request: Any) -> str:
    """The text of the BYTES input tensors (contents, else raw 4-byte-length-prefixed)."""
    parts: list[str] = []
    raw = list(request.raw_input_contents)
    for i, tensor in enumerate(request.inputs):
        if tensor.datatype != "BYTES":
            continue
        if tensor.contents.bytes_contents:
            parts.extend(b.decode(errors="replace") for b in tensor.contents.bytes_contents)
        elif i < len(raw):
            data, at = raw[i], 0
            while at + 4 <= len(data):
                size = int.from_bytes(data[at : at + 4], "little")
                parts.append(data[at + 4 : at + 4 + size].decode(errors="replace"))
                at += 4 + size
    return "\n".join(parts)


def _max_tokens(request: Any) -> int | None:
    for params in (request.parameters, *(t.parameters for t in request.inputs)):
        if "max_tokens" in params:
            value = params["max_tokens"]
            kind = value.WhichOneof("parameter_choice")
            if kind in ("int64_param", "uint64_param"):
                return int(getattr(value, kind))
            raise ApiError(400, "the parameter 'max_tokens' must be an integer", "max_tokens")
    return None


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The service over one :class:`sim.server.SimServer` (its engine, model, health)."""

    def __init__(self, server: Any) -> None:
        self.server = server  # sim.server.SimServer

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return oip.ServerReadyResponse(ready=self.server.is_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return oip.ServerMetadataResponse(name="matrixinfer-sim", version="2")

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return oip.ModelReadyResponse(ready=self._known(request.name) and self.server.is_ready())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        if not self._known(request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' is not served")
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=request.name,
            platform="matrixinfer-sim",
            inputs=[tensor(name="text_input", datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=OUTPUT_TENSOR, datatype="BYTES", shape=[-1])],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            return await self._infer(request)
        except ApiError as exc:
            code = _CODES.get(exc.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, str(exc))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for request in requests:
            try:
                response = await self._infer(request)
            except ApiError as exc:
                yield oip.ModelStreamInferResponse(error_message=str(exc))
                continue
            yield oip.ModelStreamInferResponse(infer_response=response)

    def _known(self, name: str) -> bool:
        return name == self.server.cfg.model or name in self.server.loras

    async def _infer(self, request: Any) -> Any:
        server = self.server
        body = CompletionBody(
            model=request.model_name or None,
            prompt=_prompt(request),
            max_tokens=_max_tokens(request),
        )
        gen = server._build(body, False)
        req = gen.req
        req.arrival = server.driver.now()
        try:
            server.driver.submit(req)
        except QueueFull as exc:
            raise ApiError(429, f"too many requests: {exc}") from None
        try:
            while not req.done:
                await server.driver.wait(req)
                req.sent = req.num_output
        finally:
            if not req.done:
                server.driver.abort(req)
        text = server._text(req).encode()
        return oip.ModelInferResponse(
            model_name=gen.model,
            id=request.id,
            parameters={
                "prompt_tokens": oip.InferParameter(int64_param=req.prompt_len),
                "completion_tokens": oip.InferParameter(int64_param=req.num_output),
                "finish_reason": oip.InferParameter(string_param=str(req.finish_reason)),
            },
            outputs=[
                oip.ModelInferResponse.InferOutputTensor(
                    name=OUTPUT_TENSOR,
                    datatype="BYTES",
                    shape=[1],
                    contents=oip.InferTensorContents(bytes_contents=[text]),
                )
            ],
        )


async def start_grpc(server: Any, host: str, port: int) -> grpc.aio.Server:
    """Start the gRPC service of ``server`` (a SimServer) on ``host:port``."""
    grpc_server = grpc.aio.server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        OipServicer(server), grpc_server
    )
    if grpc_server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen on {host}:{port} for gRPC")
    await grpc_server.start()
    return grpc_server
