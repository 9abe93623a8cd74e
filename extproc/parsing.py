"""Request parsing: which OpenAI endpoint, and what of its JSON body the gateway needs. Pure.

Only the fields routing and scheduling use are extracted; the body is kept as the parsed dict so
the model can be rewritten without a second parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from extproc.errors import (
    bad_request,
    body_too_large,
    grpc_unimplemented,
    method_not_allowed,
    path_not_found,
)

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "ENDPOINTS",
    "OIP_MODEL_METHODS",
    "OIP_SERVER_METHODS",
    "OIP_SERVICE",
    "USAGE_STREAM_KINDS",
    "Endpoint",
    "ParsedRequest",
    "classify",
    "estimate_tokens",
    "grpc_frames",
    "parse_body",
    "parse_oip",
]

DEFAULT_BODY_LIMIT = 10 * 1024 * 1024  # 10 MiB

# path -> endpoint kind; all of them take a POST whose body names the ``model`` (JSON, or a
# multipart form for the audio endpoints). Paths as vLLM serves them; the gateway routes each
# by its model like the chat endpoint.
ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/rerank": "rerank",
    "/v1/score": "score",
    "/score": "score",
    "/pooling": "pooling",
    "/classify": "classify",
    "/v1/audio/transcriptions": "audio",
    "/v1/audio/translations": "audio",
    "/v1/audio/speech": "speech",
}
MODELS_PATH = "/v1/models"
_MODEL_PREFIX = MODELS_PATH + "/"
# The Open Inference Protocol v2 gRPC service (fleet/oip): ``POST /inference.GRPCInferenceService/
# <Method>``. The model methods name their model in the protobuf body and are routed like HTTP
# (kind ``oip``); the server methods name none and go to any ready pod (kind ``oip_server``).
OIP_SERVICE = "inference.GRPCInferenceService"
_OIP_PREFIX = f"/{OIP_SERVICE}/"
OIP_MODEL_METHODS = frozenset(("ModelInfer", "ModelStreamInfer", "ModelReady", "ModelMetadata"))
OIP_SERVER_METHODS = frozenset(("ServerLive", "ServerReady", "ServerMetadata"))
# the kinds whose streamed answers carry OpenAI's usage event (stream_options.include_usage)
USAGE_STREAM_KINDS = frozenset(("chat", "completions"))


@dataclass(slots=True, frozen=True)
class Endpoint:
    """What the request line asks for: ``kind`` is ``models`` (the list), ``model`` (one model:
    ``GET /v1/models/{model}``) or a value of :data:`ENDPOINTS`."""

    kind: str
    path: str  # without the query string
    model: str = ""  # kind ``model``: the model id of the path (percent-decoded)


@dataclass(slots=True)
class ParsedRequest:
    kind: str
    model: str
    stream: bool
    max_tokens: int | None
    prompt: str  # flattened prompt text (chat messages joined), for prefix hashing and estimates
    body: dict[str, Any]
    body_size: int
    # a multipart form (audio): the raw body and where the model's value sits in it, for a
    # rewrite (``with_model``); None for a JSON body
    form: tuple[bytes, int, int] | None = None
    # an Open Inference Protocol call (kind ``oip``): its decoded protobuf messages, for a rewrite
    messages: list[Any] | None = None

    def with_model(self, model: str) -> bytes:
        """The body to forward with ``model`` instead of the client's model name."""
        if self.messages is not None:
            out: list[bytes] = []
            for message in self.messages:
                if hasattr(message, "model_name"):
                    message.model_name = model
                else:
                    message.name = model
                data = message.SerializeToString()
                out.append(b"\x00" + len(data).to_bytes(4, "big") + data)
            return b"".join(out)
        if self.form is not None:
            raw, start, end = self.form
            return raw[:start] + model.encode() + raw[end:]
        self.body["model"] = model
        return orjson.dumps(self.body)


def classify(method: str, path: str) -> Endpoint:
    """Map the request line to an endpoint kind, or raise a 404/405 GatewayError."""
    bare = path.split("?", 1)[0].rstrip("/") or "/"
    method = method.upper()
    if bare == MODELS_PATH or bare.startswith(_MODEL_PREFIX):
        if method != "GET":
            raise method_not_allowed(method, bare, "GET")
        if bare == MODELS_PATH:
            return Endpoint("models", bare)
        return Endpoint("model", bare, unquote(bare[len(_MODEL_PREFIX) :]))
    if bare.startswith(_OIP_PREFIX):
        method_name = bare[len(_OIP_PREFIX) :]
        if method_name in OIP_MODEL_METHODS:
            return Endpoint("oip", bare)
        if method_name in OIP_SERVER_METHODS:
            return Endpoint("oip_server", bare)
        raise grpc_unimplemented(bare)
    kind = ENDPOINTS.get(bare)
    if kind is None:
        raise path_not_found(method, bare)
    if method != "POST":
        raise method_not_allowed(method, bare, "POST")
    return Endpoint(kind, bare)


def estimate_tokens(text: str) -> int:
    """A rough token estimate (about four characters a token); engines report the exact usage."""
    return (len(text) + 3) // 4


def _text_of_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def _prompt_of_chat(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    # "role: content\n" per message, joined once: a 16 kB content is copied once, not twice
    out: list[str] = []
    append = out.append
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = message.get("role")
        append(role if isinstance(role, str) else "")
        append(": ")
        append(_text_of_content(message.get("content")))
        append("\n")
    return "".join(out)


def _prompt_of_value(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return "\n".join(value)
        # token ids (or lists of them): keep them as text so equal prompts hash equally
        return " ".join(str(v) for v in value)
    if value is None:
        raise bad_request(f"'{field}' is required", param=field)
    raise bad_request(f"'{field}' must be a string or a list", param=field)


# the text fields of the other endpoints' bodies, for prefix hashing and token estimates
_TEXT_FIELDS = ("instructions", "input", "prompt", "query", "documents", "text_1", "text_2")


def _text_of_any(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _text_of_content(value.get("content", value.get("text")))
    if isinstance(value, list):
        return "\n".join(_text_of_any(v) for v in value)
    return ""


def _prompt_of_other(body: dict[str, Any]) -> str:
    """The prompt text of a request to another engine endpoint (responses, tokenize, rerank,
    score, ...): its messages, else its text fields joined; no field is required."""
    if isinstance(body.get("messages"), list):
        return _prompt_of_chat(body)
    return "\n".join(_text_of_any(body[f]) for f in _TEXT_FIELDS if f in body)


def _boundary(content_type: str) -> bytes | None:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode()
    return None


def _form_model(raw: bytes, boundary: bytes) -> tuple[str, int, int]:
    """The ``model`` field of a multipart form: its value and where it sits in ``raw``."""
    delimiter = b"--" + boundary
    at = raw.find(delimiter)
    while at >= 0:
        head_start = at + len(delimiter) + 2  # after the delimiter's CRLF
        head_end = raw.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            break
        head = raw[head_start:head_end].decode("latin-1").lower()
        start = head_end + 4
        at = raw.find(b"\r\n" + delimiter, start)
        if 'name="model"' in head:
            if at < 0:
                break
            try:
                return raw[start:at].decode(), start, at
            except UnicodeDecodeError:
                raise bad_request("the form field 'model' is not UTF-8", param="model") from None
        if at >= 0:
            at += 2
    raise bad_request("the form has no 'model' field", param="model")


def _parse_form(kind: str, raw: bytes, boundary: bytes) -> ParsedRequest:
    model, start, end = _form_model(raw, boundary)
    if not model:
        raise bad_request("the 'model' field is required", param="model")
    return ParsedRequest(
        kind=kind,
        model=model,
        stream=False,
        max_tokens=None,
        prompt="",
        body={"model": model},
        body_size=len(raw),
        form=(raw, start, end),
    )


def parse_body(
    kind: str, raw: bytes, limit: int = DEFAULT_BODY_LIMIT, content_type: str = ""
) -> ParsedRequest:
    """Parse an OpenAI request body (JSON, or a multipart form naming the ``model``); raise
    400/413 GatewayErrors naming the bad field."""
    if len(raw) > limit:
        raise body_too_large(len(raw), limit)
    if not raw:
        raise bad_request("the request body is empty; send a JSON object with a 'model' field")
    boundary = _boundary(content_type) if content_type else None
    if boundary is not None:
        return _parse_form(kind, raw, boundary)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("the 'model' field is required", param="model")
    if not isinstance(model, str):
        raise bad_request("the 'model' field must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    max_tokens: int | None = None
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad_request(f"'{field}' must be a non-negative integer", param=field)
        max_tokens = value
        break
    if kind == "chat":
        prompt = _prompt_of_chat(body)
    elif kind == "completions":
        prompt = _prompt_of_value(body.get("prompt"), "prompt")
    elif kind == "embeddings":
        prompt = _prompt_of_value(body.get("input"), "input")
    else:
        prompt = _prompt_of_other(body)
    return ParsedRequest(
        kind=kind,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        prompt=prompt,
        body=body,
        body_size=len(raw),
    )


# ---- gRPC (the Open Inference Protocol v2) -------------------------------------------------------
_FRAME_HEADER = 5  # 1 byte compressed flag, 4 bytes big-endian message length


def grpc_frames(raw: bytes) -> list[bytes]:
    """The messages of a gRPC-framed body (length-prefixed messages); raise a 400 GatewayError
    (INVALID_ARGUMENT) for an empty body, a truncated frame or a compressed message."""
    if not raw:
        raise bad_request("the gRPC request body is empty: it carries no message")
    out: list[bytes] = []
    at = 0
    while at < len(raw):
        if len(raw) - at < _FRAME_HEADER:
            raise bad_request(
                f"the gRPC body ends inside a frame header at byte {at} "
                f"({len(raw) - at} of {_FRAME_HEADER} bytes)"
            )
        flag = raw[at]
        size = int.from_bytes(raw[at + 1 : at + _FRAME_HEADER], "big")
        if flag != 0:
            raise bad_request(
                f"the gRPC message at byte {at} is compressed (flag {flag}); the gateway reads "
                "uncompressed messages only: send without grpc-encoding"
            )
        start = at + _FRAME_HEADER
        if len(raw) - start < size:
            raise bad_request(
                f"the gRPC message at byte {at} is truncated: its frame says {size} bytes, "
                f"{len(raw) - start} arrived"
            )
        out.append(raw[start : start + size])
        at = start + size
    return out


def _oip_prompt(message: Any) -> str:
    """The text of a ModelInferRequest's BYTES input tensors (for estimates and prefix hashing):
    their ``contents.bytes_contents``, else their ``raw_input_contents`` (4-byte length-prefixed
    elements), decoded as UTF-8 (undecodable bytes replaced)."""
    parts: list[str] = []
    raw_inputs = list(message.raw_input_contents)
    for i, tensor in enumerate(message.inputs):
        if tensor.datatype != "BYTES":
            continue
        if tensor.contents.bytes_contents:
            parts.extend(b.decode(errors="replace") for b in tensor.contents.bytes_contents)
        elif i < len(raw_inputs):
            data = raw_inputs[i]
            at = 0
            while at + 4 <= len(data):
                size = int.from_bytes(data[at : at + 4], "little")
                parts.append(data[at + 4 : at + 4 + size].decode(errors="replace"))
                at += 4 + size
    return "\n".join(parts)


def _oip_max_tokens(message: Any) -> int | None:
    """A ModelInferRequest's ``max_tokens`` parameter (the request's, else its first input's
    that has one), as the engines read it: an int64 or uint64 InferParameter, >= 0."""
    for params in (message.parameters, *(t.parameters for t in message.inputs)):
        if "max_tokens" in params:
            value = params["max_tokens"]
            choice = value.WhichOneof("parameter_choice")
            number = getattr(value, choice) if choice in ("int64_param", "uint64_param") else -1
            if number < 0:
                raise bad_request(
                    "the parameter 'max_tokens' must be a non-negative integer (int64_param)",
                    param="max_tokens",
                )
            return int(number)
    return None


def parse_oip(path: str, raw: bytes, limit: int = DEFAULT_BODY_LIMIT) -> ParsedRequest:
    """Parse the gRPC-framed protobuf body of an Open Inference Protocol call (kind ``oip``):
    its model (``model_name``, or ``name`` of ModelReady/ModelMetadata) and, for ModelInfer and
    ModelStreamInfer, the text of its BYTES inputs (all messages of a stream's body) and its
    ``max_tokens`` parameters (summed over a stream's messages; what the call reserves of an
    output-token budget, as an HTTP request's ``max_tokens``). Raise 400
    GatewayErrors (INVALID_ARGUMENT) for undecodable input, 413 above ``limit``."""
    from google.protobuf.message import DecodeError

    from fleet.oip import grpc_predict_v2_pb2 as oip

    if len(raw) > limit:
        raise body_too_large(len(raw), limit)
    method_name = path.rsplit("/", 1)[-1]
    frames = grpc_frames(raw)
    infer = method_name in ("ModelInfer", "ModelStreamInfer")
    model = ""
    prompts: list[str] = []
    messages: list[Any] = []
    # the output the call may produce: the sum of its requests' max_tokens (None: one has none)
    max_tokens: int | None = 0 if infer else None
    for i, frame in enumerate(frames):
        message: Any = oip.ModelInferRequest() if infer else oip.ModelReadyRequest()
        try:
            message.ParseFromString(frame)
        except DecodeError as exc:
            raise bad_request(
                f"gRPC message {i} is not a valid inference.{type(message).__name__}: {exc}"
            ) from None
        name = message.model_name if infer else message.name
        field_name = "model_name" if infer else "name"
        if not name:
            raise bad_request(f"the '{field_name}' field is required", param=field_name)
        if model and name != model:
            raise bad_request(
                f"the messages of one stream name different models ('{model}', '{name}')",
                param=field_name,
            )
        model = name
        messages.append(message)
        if infer:
            prompts.append(_oip_prompt(message))
            limit_of_one = _oip_max_tokens(message)
            max_tokens = (
                None if max_tokens is None or limit_of_one is None else (max_tokens + limit_of_one)
            )
    return ParsedRequest(
        kind="oip",
        model=model,
        stream=method_name == "ModelStreamInfer",
        max_tokens=max_tokens,
        prompt="\n".join(prompts),
        body={},
        body_size=len(raw),
        messages=messages,
    )
