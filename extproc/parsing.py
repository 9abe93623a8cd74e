"""Request parsing: which OpenAI endpoint, and what of its JSON body the gateway needs. Pure.

Only the fields routing and scheduling use are extracted; the body is kept as the parsed dict so
the model can be rewritten without a second parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from extproc.errors import bad_request, body_too_large, method_not_allowed, path_not_found

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "ENDPOINTS",
    "Endpoint",
    "ParsedRequest",
    "classify",
    "estimate_tokens",
    "parse_body",
]

DEFAULT_BODY_LIMIT = 10 * 1024 * 1024  # 10 MiB

# path -> endpoint kind; all of them take a POST with a JSON body
ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
MODELS_PATH = "/v1/models"


@dataclass(slots=True, frozen=True)
class Endpoint:
    """What the request line asks for: ``kind`` is chat | completions | embeddings | models."""

    kind: str
    path: str  # without the query string


@dataclass(slots=True)
class ParsedRequest:
    kind: str
    model: str
    stream: bool
    max_tokens: int | None
    prompt: str  # flattened prompt text (chat messages joined), for prefix hashing and estimates
    body: dict[str, Any]
    body_size: int


def classify(method: str, path: str) -> Endpoint:
    """Map the request line to an endpoint kind, or raise a 404/405 GatewayError."""
    bare = path.split("?", 1)[0].rstrip("/") or "/"
    method = method.upper()
    if bare == MODELS_PATH:
        if method != "GET":
            raise method_not_allowed(method, bare, "GET")
        return Endpoint("models", bare)
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


def parse_body(kind: str, raw: bytes, limit: int = DEFAULT_BODY_LIMIT) -> ParsedRequest:
    """Parse an OpenAI request body; raise 400/413 GatewayErrors naming the bad field."""
    if len(raw) > limit:
        raise body_too_large(len(raw), limit)
    if not raw:
        raise bad_request("the request body is empty; send a JSON object with a 'model' field")
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
    for field in ("max_completion_tokens", "max_tokens"):
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
    else:
        prompt = _prompt_of_value(body.get("input"), "input")
    return ParsedRequest(
        kind=kind,
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        prompt=prompt,
        body=body,
        body_size=len(raw),
    )
