"""Request parsing: which OpenAI endpoint, and what of its JSON body the gateway needs. Pure.

Only the fields routing and scheduling use are extracted; the body is kept as the parsed dict so
the model can be rewritten without a second parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from extproc.errors import bad_request, body_too_large, method_not_allowed, path_not_found

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "ENDPOINTS",
    "USAGE_STREAM_KINDS",
    "Endpoint",
    "ParsedRequest",
    "classify",
    "estimate_tokens",
    "parse_body",
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

    def with_model(self, model: str) -> bytes:
        """The body to forward with ``model`` instead of the client's model name."""
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
    out: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        role = message.get("role")
        out.append(
            f"{role if isinstance(role, str) else ''}: {_text_of_content(message.get('content'))}\n"
        )
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
