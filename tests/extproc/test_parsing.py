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


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/responses", "responses"),
        ("/tokenize", "tokenize"),
        ("/detokenize", "detokenize"),
        ("/v1/rerank", "rerank"),
        ("/rerank", "rerank"),
        ("/v1/score", "score"),
        ("/pooling", "pooling"),
        ("/v1/audio/transcriptions", "audio"),
    ],
)
def test_engine_endpoints_are_classified(path: str, kind: str) -> None:
    assert classify("POST", path).kind == kind


def test_one_model_path_carries_the_decoded_model() -> None:
    endpoint = classify("GET", "/v1/models/org%2Fmodel-7b")
    assert (endpoint.kind, endpoint.model) == ("model", "org/model-7b")
    assert classify("GET", "/v1/models/meta-llama/Llama-3").model == "meta-llama/Llama-3"
    with pytest.raises(GatewayError) as err:
        classify("DELETE", "/v1/models/x")
    assert err.value.status == 405


def test_other_endpoints_need_only_a_model() -> None:
    body = {"model": "m", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 9}
    parsed = parse_body("responses", orjson.dumps(body))
    assert (parsed.model, parsed.prompt, parsed.max_tokens) == ("m", "hi", 9)
    rerank = {"model": "m", "query": "q", "documents": ["a", {"text": "b"}]}
    assert parse_body("rerank", orjson.dumps(rerank)).prompt == "q\na\nb"
    assert parse_body("detokenize", orjson.dumps({"model": "m", "tokens": [1, 2]})).prompt == ""
    with pytest.raises(GatewayError, match="'model' field is required"):
        parse_body("score", orjson.dumps({"text_1": "a"}))


FORM = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
    b"Content-Type: audio/wav\r\n\r\n"
    b"RIFF\x00\x01binary\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="model"\r\n\r\n'
    b"whisper\r\n"
    b"--XyZ--\r\n"
)


def test_a_multipart_form_names_its_model_and_can_be_rewritten() -> None:
    parsed = parse_body("audio", FORM, content_type='multipart/form-data; boundary="XyZ"')
    assert parsed.model == "whisper" and not parsed.stream
    rewritten = parsed.with_model("org/whisper-large")
    assert rewritten == FORM.replace(b"\r\nwhisper\r\n", b"\r\norg/whisper-large\r\n")
    with pytest.raises(GatewayError, match="no 'model' field"):
        parse_body("audio", FORM.replace(b'name="model"', b'name="x"'),
                   content_type="multipart/form-data; boundary=XyZ")  # fmt: skip
