"""Request bodies (pydantic, validated at the edge) and OpenAI-style errors."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ApiError",
    "ChatBody",
    "CompletionBody",
    "LoadLoraBody",
    "ResponsesBody",
    "TokenizeBody",
    "UnloadLoraBody",
    "parse_body",
]


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {
        400: "BadRequestError",
        404: "NotFoundError",
        429: "RateLimitError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.TYPES.get(self.status, "Error"),
                    "param": self.param,
                    "code": self.status,
                }
            }
        )


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenBody(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="the simulator returns one choice")
    kv_transfer_params: dict[str, Any] | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ContentPart(_Body):
    type: str = "text"
    text: str | None = None


_TEXT_PARTS = frozenset(("text", "input_text", "output_text"))  # chat's and the Responses API's


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in _TEXT_PARTS)


class ChatBody(_GenBody):
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True


class CompletionBody(_GenBody):
    prompt: str | list[str] | list[int] | list[list[int]]


class InputMessage(_Body):
    role: str = "user"
    content: str | list[ContentPart]


class ResponsesBody(_Body):
    """``POST /v1/responses`` (OpenAI's Responses API): the text it takes, as a chat."""

    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    seed: int | None = None

    def as_chat(self) -> ChatBody:
        """The same generation as a chat request (the simulator's one generation path)."""
        messages: list[Message] = []
        if self.instructions:
            messages.append(Message(role="system", content=self.instructions))
        if isinstance(self.input, str):
            messages.append(Message(role="user", content=self.input))
        else:
            messages.extend(Message(role=m.role, content=m.content) for m in self.input)
        return ChatBody(
            model=self.model,
            messages=messages,
            max_tokens=self.max_output_tokens,
            seed=self.seed,
        )


class TokenizeBody(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True


class LoadLoraBody(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraBody(_Body):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def _describe(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return (f"{loc}: {first.get('msg', 'invalid value')}" if loc else first.get("msg", "")), (
        str(first["loc"][0]) if first.get("loc") else None
    )


T = TypeVar("T", bound=BaseModel)


def parse_body(raw: bytes, model: type[T]) -> T:
    """JSON bytes -> validated body, or ApiError(400) naming the bad field."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        msg, param = _describe(exc)
        raise ApiError(400, f"invalid request: {msg}", param) from None
