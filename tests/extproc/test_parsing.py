from __future__ import annotations

import orjson
import pytest

from extproc.errors import GatewayError
from extproc.parsing import classify, estimate_tokens, parse_body


def test_classify_known_paths() -> None:
    assert classify("POST", "/v1/chat/completions").kind == "chat"
    assert classify("POST", "/v1/completions?x=1").kind == "completions"
    assert classify("POST", "/v1/embeddings/").kind == "embeddings"
    assert classify("GET", "/v1/models").kind == "models"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405), ("POST", "/v1/models", 405)],
)
def test_classify_rejects(method: str, path: str, status: int) -> None:
    with pytest.raises(GatewayError) as err:
        classify(method, path)
    assert err.value.status == status
    assert path.split("?")[0] in err.value.message


def test_chat_prompt_is_flattened_with_roles_and_parts() -> None:
    body = {
        "model": "m",
        "stream": True,
        "max_completion_tokens": 7,
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "you"}],
            },
        ],
    }
    parsed = parse_body("chat", orjson.dumps(body))
    assert parsed.model == "m" and parsed.stream and parsed.max_tokens == 7
    assert parsed.prompt == "system: be brief\nuser: hello you\n"
    assert estimate_tokens(parsed.prompt) > 0


def test_completions_and_embeddings_prompts() -> None:
    assert parse_body("completions", b'{"model":"m","prompt":["a","b"]}').prompt == "a\nb"
    assert parse_body("embeddings", b'{"model":"m","input":"xyz"}').prompt == "xyz"
    assert parse_body("completions", b'{"model":"m","prompt":[1,2,3]}').prompt == "1 2 3"


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"{bad", 400, "not valid JSON"),
        (b"[]", 400, "JSON object"),
        (b"", 400, "empty"),
        (b'{"messages":[{"role":"user","content":"x"}]}', 400, "'model' field is required"),
        (b'{"model":3,"messages":[]}', 400, "must be a string"),
        (b'{"model":"m","messages":[]}', 400, "'messages'"),
        (b'{"model":"m","stream":"yes","messages":[{"role":"u"}]}', 400, "'stream'"),
        (b'{"model":"m","max_tokens":-1,"messages":[{"role":"u"}]}', 400, "'max_tokens'"),
    ],
)
def test_bad_bodies(raw: bytes, status: int, needle: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_body("chat", raw)
    assert err.value.status == status
    assert needle in err.value.message
    assert orjson.loads(err.value.body())["error"]["message"] == err.value.message


def test_body_limit_gives_413() -> None:
    with pytest.raises(GatewayError) as err:
        parse_body("chat", b"x" * 101, limit=100)
    assert err.value.status == 413
    assert "100 bytes" in err.value.message
