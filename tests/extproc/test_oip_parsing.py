"""The Open Inference Protocol's gRPC bodies: framing, model, prompt text, errors."""

from __future__ import annotations

import pytest

from extproc.errors import GRPC_CODES, GatewayError
from extproc.parsing import classify, grpc_frames, parse_oip
from fleet.oip import grpc_predict_v2_pb2 as oip

INFER = "/inference.GRPCInferenceService/ModelInfer"


def frame(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(message).to_bytes(4, "big") + message


def infer_request(model: str, *texts: str) -> bytes:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="text_input",
        datatype="BYTES",
        shape=[len(texts)],
        contents=oip.InferTensorContents(bytes_contents=[t.encode() for t in texts]),
    )
    return oip.ModelInferRequest(model_name=model, inputs=[tensor]).SerializeToString()


def test_classify_oip_methods() -> None:
    assert classify("POST", INFER).kind == "oip"
    assert classify("POST", "/inference.GRPCInferenceService/ModelStreamInfer").kind == "oip"
    assert classify("POST", "/inference.GRPCInferenceService/ModelReady").kind == "oip"
    assert classify("POST", "/inference.GRPCInferenceService/ServerLive").kind == "oip_server"
    with pytest.raises(GatewayError) as err:
        classify("POST", "/inference.GRPCInferenceService/RepositoryIndex")
    assert GRPC_CODES[err.value.status] == 12  # UNIMPLEMENTED
    assert "RepositoryIndex" in err.value.message


def test_model_and_prompt_of_infer() -> None:
    parsed = parse_oip(INFER, frame(infer_request("llama", "hello", "world")))
    assert parsed.model == "llama"
    assert parsed.prompt == "hello\nworld"
    assert not parsed.stream


def test_raw_input_contents_are_read_as_text() -> None:
    text = b"raw prompt"
    request = oip.ModelInferRequest(
        model_name="m",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="t", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(text).to_bytes(4, "little") + text],
    )
    assert parse_oip(INFER, frame(request.SerializeToString())).prompt == "raw prompt"


def test_stream_of_messages_reads_every_frame() -> None:
    raw = frame(infer_request("m", "a")) + frame(infer_request("m", "b"))
    parsed = parse_oip("/inference.GRPCInferenceService/ModelStreamInfer", raw)
    assert parsed.stream and parsed.prompt == "a\nb"


def test_model_rewrite_reframes_the_messages() -> None:
    parsed = parse_oip(INFER, frame(infer_request("alias", "x")))
    (message,) = grpc_frames(parsed.with_model("upstream"))
    assert oip.ModelInferRequest.FromString(message).model_name == "upstream"


def test_model_ready_names_the_model_in_name() -> None:
    raw = frame(oip.ModelReadyRequest(name="m2").SerializeToString())
    assert parse_oip("/inference.GRPCInferenceService/ModelReady", raw).model == "m2"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", "empty"),
        (b"\x00\x00\x00", "inside a frame header"),
        (b"\x00\x00\x00\x00\x10abc", "truncated"),
        (frame(b"\x0a\x01m", flag=1), "compressed"),
        (frame(b"\xff\xff\xff"), "not a valid inference.ModelInferRequest"),
        (frame(b""), "'model_name' field is required"),
    ],
)
def test_bad_bodies_are_invalid_argument(raw: bytes, words: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_oip(INFER, raw)
    assert GRPC_CODES[err.value.status] == 3  # INVALID_ARGUMENT
    assert words in err.value.message


def test_oversize_body_is_resource_exhausted() -> None:
    with pytest.raises(GatewayError) as err:
        parse_oip(INFER, frame(infer_request("m", "x" * 100)), limit=50)
    assert GRPC_CODES[err.value.status] == 8


def with_max_tokens(model: str, value: oip.InferParameter | None, on_input: bool = False) -> bytes:
    message = oip.ModelInferRequest.FromString(infer_request(model, "x"))
    if value is not None:
        (message.inputs[0].parameters if on_input else message.parameters)["max_tokens"].CopyFrom(
            value
        )
    return frame(message.SerializeToString())


def test_max_tokens_is_what_the_call_reserves() -> None:
    """The ``max_tokens`` parameter (request or input) bounds the call's output, as an HTTP
    request's: what it reserves of an output-token budget; a stream's is the sum of its
    requests' (None as soon as one has none: the route's estimate or the whole budget)."""
    int64, uint64 = oip.InferParameter(int64_param=48), oip.InferParameter(uint64_param=7)
    assert parse_oip(INFER, with_max_tokens("m", int64)).max_tokens == 48
    assert parse_oip(INFER, with_max_tokens("m", uint64, on_input=True)).max_tokens == 7
    assert parse_oip(INFER, with_max_tokens("m", None)).max_tokens is None
    stream = "/inference.GRPCInferenceService/ModelStreamInfer"
    both = with_max_tokens("m", int64) + with_max_tokens("m", uint64)
    assert parse_oip(stream, both).max_tokens == 55
    assert parse_oip(stream, both + with_max_tokens("m", None)).max_tokens is None


@pytest.mark.parametrize(
    "value",
    [oip.InferParameter(string_param="48"), oip.InferParameter(int64_param=-1)],
)
def test_max_tokens_not_a_count_is_invalid_argument(value: oip.InferParameter) -> None:
    with pytest.raises(GatewayError) as err:
        parse_oip(INFER, with_max_tokens("m", value))
    assert GRPC_CODES[err.value.status] == 3
    assert "'max_tokens' must be a non-negative integer" in err.value.message
