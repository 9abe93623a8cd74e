"""``envoy/usage.lua`` under LuaJIT (Envoy's Lua), with a stand-in for Envoy's stream handle: the
usage-only event is removed from what a client that did not ask for it sees, however the stream is
cut into chunks; everything else passes byte for byte; the usage numbers are read either way.
Plus the extproc side: ``force_usage`` and the ``matrixinfer_strip`` mark."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.gateway import Routed
from extproc.policies.usage import force_usage
from fleet.oip import grpc_predict_v2_pb2 as oip
from fleet.usage_envoy import RESPONSES_KEY, STRIP_KEY, USAGE_KEY, lua_source

lupa = pytest.importorskip("lupa.luajit21")

HARNESS = b"""
local chunks, lb, ctype = ...
EnvoyTimestampResolution = {MILLISECOND = 0, MICROSECOND = 1}
local clock = 0 -- a stand-in clock: microsecond 1000 * (the chunk being looked at)
local meta = {["envoy.lb"] = lb}
local dm = {
  get = function(self, ns) return meta[ns] end,
  set = function(self, ns, k, v) meta[ns] = meta[ns] or {}; meta[ns][k] = v end,
}
local info = {dynamicMetadata = function(self) return dm end}
local removed = {}
local headers = {
  get = function(self, name) if name == "content-type" then return ctype end return nil end,
  remove = function(self, name) removed[#removed + 1] = name end,
}
local seen = {}
local handle = {
  streamInfo = function(self) return info end,
  headers = function(self) return headers end,
  timestampString = function(self, resolution)
    assert(resolution == EnvoyTimestampResolution.MICROSECOND)
    return tostring(1000 * clock)
  end,
  body = function(self)
    local b = {data = table.concat(chunks)}
    function b:length() return #self.data end
    function b:getBytes(at, n) return string.sub(self.data, at + 1, at + n) end
    return b
  end,
  bodyChunks = function(self)
    local i = 0
    return function()
      i = i + 1
      clock = i
      if chunks[i] == nil then return nil end
      local c = {data = chunks[i]}
      function c:length() return #self.data end
      function c:getBytes(at, n) return string.sub(self.data, at + 1, at + n) end
      function c:setBytes(s) self.data = s end
      seen[#seen + 1] = c
      return c
    end
  end,
}
envoy_on_response(handle)
local out = {}
for i, c in ipairs(seen) do out[i] = c.data end
return out, meta["matrixinfer"], removed
"""


def run_filter(
    chunks: list[bytes],
    strip: bool,
    ctype: bytes = b"text/event-stream",
    responses: bool = False,
    marked: bool = True,
) -> tuple[list[bytes], dict[str, Any]]:
    lua = lupa.LuaRuntime(encoding=None)
    lua.execute(lua_source().encode())
    flags = {b"matrixinfer_strip": strip, b"matrixinfer_responses": responses}
    if marked:
        flags[USAGE_KEY.encode()] = True
    lb = lua.table_from(flags)
    out, md, _ = lua.execute(HARNESS, lua.table_from(chunks), lb, ctype)
    passed = [out[i + 1] for i in range(len(out))]
    fields = {k.decode(): v for k, v in (md or {}).items()}
    return passed, fields


def event(obj: dict[str, Any], eol: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + eol


def content(text: str) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": text}}],
    }


USAGE = {"prompt_tokens": 17, "completion_tokens": 3, "total_tokens": 20}


def stream(texts: list[str], eol: bytes = b"\n\n", usage: bool = True) -> tuple[bytes, bytes]:
    """(the engine's stream, what a client that did not ask for usage must see)"""
    head = event({"id": "c1", "choices": [{"delta": {"role": "assistant"}}]}, eol)
    body = head + b"".join(event(content(t), eol) for t in texts)
    usage_event = event({"id": "c1", "choices": [], "usage": USAGE}, eol) if usage else b""
    done = b"data: [DONE]" + eol
    return body + usage_event + done, body + done


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# content that looks like the markers, escaped as JSON does it
TEXTS = st.lists(
    st.sampled_from(["hello", " world", '"choices":[]', '"usage":{', "\n\n", "data: x", "é"]),
    min_size=0,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(texts=TEXTS, points=st.lists(st.integers(0, 2000), max_size=12), crlf=st.booleans())
def test_usage_event_removed_however_the_stream_is_cut(
    texts: list[str], points: list[int], crlf: bool
) -> None:
    eol = b"\r\n\r\n" if crlf else b"\n\n"
    full, expected = stream(texts, eol)
    passed, md = run_filter(cut(full, points), strip=True)
    assert b"".join(passed) == expected
    assert md["prompt"] == 17 and md["completion"] == 3
    assert md["events"] == full.count(b"data:")


@settings(max_examples=100, deadline=None)
@given(texts=TEXTS, points=st.lists(st.integers(0, 2000), max_size=12))
def test_asked_for_usage_passes_unchanged(texts: list[str], points: list[int]) -> None:
    full, _ = stream(texts)
    chunks = cut(full, points)
    passed, md = run_filter(chunks, strip=False)
    assert passed == chunks  # chunk for chunk, not only in total
    assert md["prompt"] == 17 and md["completion"] == 3


def test_whole_events_are_passed_without_holding_anything_back() -> None:
    full, expected = stream(["a", "b", "c"])
    events = [e + b"\n\n" for e in full.split(b"\n\n") if e]
    passed, _ = run_filter(events, strip=True)
    # every content chunk goes out as it came; only the usage event's chunk is emptied
    assert passed[:-2] == events[:-2] and passed[-2] == b"" and passed[-1] == events[-1]
    assert b"".join(passed) == expected


def test_long_events_split_are_passed_on_not_held() -> None:
    big = "x" * 10000  # longer than any usage event: not held back in a chunk
    full, expected = stream([big, "tail"])
    chunks = cut(full, list(range(500, len(full), 3000)))
    passed, md = run_filter(chunks, strip=True)
    assert b"".join(passed) == expected
    assert md["completion"] == 3
    # the big event went out while it arrived (no chunk waited for the whole of it)
    assert all(len(p) < 7000 for p in passed)


def test_stream_cut_inside_an_event_at_its_end() -> None:
    """An aborted stream that ends inside an event: the incomplete event is not passed on (SSE
    clients drop it anyway); the events seen are still counted."""
    full, _ = stream(["one", "two"], usage=False)
    truncated = full[: full.index(b"two") + 2]
    passed, md = run_filter(cut(truncated, [40, 90]), strip=True)
    out = b"".join(passed)
    assert out == truncated[: truncated.rindex(b"\n\n") + 2]
    assert md["events"] == truncated.count(b"data:") and "prompt" not in md


def test_json_answers_untouched_and_read() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE})
    passed, md = run_filter([body], strip=True, ctype=b"application/json")
    assert md["prompt"] == 17 and md["completion"] == 3
    assert passed == [body]  # passed on as it came (chunk by chunk, nothing held or changed)
    # a long answer cut anywhere: the usage is read from the last 4 KiB across the cuts
    long = orjson.dumps({"choices": [{"message": {"content": "x" * 9000}}], "usage": USAGE})
    for points in ([len(long) - 30], [100, 5000, len(long) - 2], [len(long) - 4096]):
        passed, md = run_filter(cut(long, points), strip=True, ctype=b"application/json")
        assert md["prompt"] == 17 and md["completion"] == 3, points
        assert b"".join(passed) == long


def grpc_frame(message: Any) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def infer_response(prompt: int | None, completion: int | None, text: bytes) -> Any:
    """A ModelInferResponse as an engine sends it: its counts as response parameters (none when
    ``prompt`` is None), beside other parameters, an output tensor holding ``text``."""
    params: dict[str, Any] = {"finish_reason": oip.InferParameter(string_param="length")}
    if prompt is not None:
        params["prompt_tokens"] = oip.InferParameter(int64_param=prompt)
    if completion is not None:
        params["completion_tokens"] = oip.InferParameter(uint64_param=completion)
    tensor = oip.ModelInferResponse.InferOutputTensor(
        name="text_output",
        datatype="BYTES",
        shape=[1],
        contents=oip.InferTensorContents(bytes_contents=[text]),
    )
    return oip.ModelInferResponse(model_name="m", id="1", parameters=params, outputs=[tensor])


COUNTS = st.tuples(st.integers(0, 2**40), st.integers(0, 2**40))


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(COUNTS, min_size=1, max_size=4),
    text=st.binary(max_size=300) | st.sampled_from([b"prompt_tokens", b"\n\rprompt_tokens\x12"]),
    points=st.lists(st.integers(0, 3000), max_size=12),
)
def test_grpc_answers_counts_are_summed_however_the_answer_is_cut(
    counts: list[tuple[int, int]], text: bytes, points: list[int]
) -> None:
    """A ModelStreamInfer answer (one response per request): the call's usage is the sum of the
    responses' ``prompt_tokens``/``completion_tokens`` parameters; the answer passes unchanged."""
    body = b"".join(
        grpc_frame(oip.ModelStreamInferResponse(infer_response=infer_response(p, c, text)))
        for p, c in counts
    )
    passed, md = run_filter(cut(body, points), strip=False, ctype=b"application/grpc")
    assert b"".join(passed) == body
    assert md == {
        "prompt": sum(p for p, _ in counts),
        "completion": sum(c for _, c in counts),
    }


def test_grpc_answer_without_counts_reports_none() -> None:
    body = grpc_frame(infer_response(None, None, b"x" * 5000))
    passed, md = run_filter(cut(body, [10, 4000]), strip=False, ctype=b"application/grpc+proto")
    assert b"".join(passed) == body and md == {}
    one = grpc_frame(infer_response(12, 300, b"hello"))  # ModelInfer: one response
    _, md = run_filter([one], strip=False, ctype=b"application/grpc")
    assert md == {"prompt": 12, "completion": 300}


def test_first_token_is_the_first_event() -> None:
    """A chat stream's first token is its first ``data:`` event (vLLM sends the role chunk with
    the first token): usage.lua notes the clock when that chunk passes, once."""
    full, _ = stream(["a", "b", "c"])
    first = full.index(b"data:")
    chunks = [b": keep-alive\n\n", full[: first + 20], full[first + 20 :]]
    _, md = run_filter(chunks, strip=False)
    assert md["first_token_us"] == 2000  # the second chunk (the first one carries no event)
    # "data:" cut across two chunks: the chunk that completes it
    _, md = run_filter([full[: first + 2], full[first + 2 :]], strip=False)
    assert md["first_token_us"] == 2000
    # no event at all: no first token
    _, md = run_filter([b": keep-alive\n\n"], strip=False)
    assert "first_token_us" not in md


def responses_stream(texts: list[str]) -> list[bytes]:
    """A Responses API stream (vLLM's shape), one chunk per group of events."""

    def ev(kind: str, **data: Any) -> bytes:
        payload = json.dumps({"type": kind, **data}, separators=(",", ":")).encode()
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    usage = {"input_tokens": 11, "output_tokens": len(texts), "total_tokens": 11 + len(texts)}
    return [
        ev("response.created", response={"status": "in_progress", "usage": None})
        + ev("response.in_progress", response={"status": "in_progress", "usage": None}),
        ev("response.output_item.added", item={"type": "message", "content": []}),
        *(ev("response.output_text.delta", delta=t) for t in texts),
        ev("response.output_text.done", text="".join(texts))
        + ev("response.completed", response={"status": "completed", "usage": usage}),
    ]


def test_responses_stream_first_delta_and_usage() -> None:
    """A /v1/responses stream: the first token is the first delta event (response.created
    comes before any token); the usage is response.completed's input/output tokens."""
    chunks = responses_stream(["x", " y", " z"])
    passed, md = run_filter(chunks, strip=False, responses=True)
    assert passed == chunks
    assert md["first_token_us"] == 3000  # the third chunk: the first delta
    assert md["prompt"] == 11 and md["completion"] == 3
    # without the flag the first event counts (what a chat stream needs)
    _, md = run_filter(chunks, strip=False)
    assert md["first_token_us"] == 1000


def test_responses_json_usage_read() -> None:
    body = orjson.dumps(
        {
            "object": "response",
            "output": [{"type": "message", "content": [{"text": "hi"}]}],
            "max_output_tokens": 99,  # not the usage
            "usage": {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9},
        }
    )
    _, md = run_filter([body], strip=False, ctype=b"application/json")
    assert md["prompt"] == 7 and md["completion"] == 2 and "first_token_us" not in md


def test_unmarked_answers_are_not_read() -> None:
    full, _ = stream(["a"])
    passed, md = run_filter([full], strip=False, marked=False)
    assert passed == [] and md == {}  # returned before asking for the body


def test_lua_file_is_the_shipped_one() -> None:
    assert (Path(__file__).resolve().parents[2] / "envoy" / "usage.lua").read_text() == (
        lua_source()
    )


def test_force_usage_keeps_what_the_client_asked() -> None:
    plain: dict[str, Any] = {"stream": True}
    assert force_usage(plain) is True
    assert plain["stream_options"] == {"include_usage": True}
    asked = {
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    assert force_usage(asked) is False
    assert asked["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    # continuous stats without include_usage gave no usage at all: the forced request must not
    # put usage into every chunk either
    cont = {
        "stream": True,
        "stream_options": {"include_usage": False, "continuous_usage_stats": True},
    }
    assert force_usage(cont) is True
    assert cont["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}


async def test_gateway_marks_only_forced_streams(tmp_path: Path) -> None:
    from tests.policies.test_gateway_policies import decide, gateway

    gw = gateway(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    forced = await decide(gw, {"model": "m", "messages": messages, "stream": True})
    assert isinstance(forced, Routed) and forced.metadata is not None
    assert forced.metadata[STRIP_KEY] is True
    other = tmp_path / "other"
    other.mkdir()
    asked = await decide(
        gateway(other),  # a fresh budget (1 request an hour)
        {
            "model": "m",
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert isinstance(asked, Routed) and asked.metadata is not None
    assert STRIP_KEY not in asked.metadata
    assert asked.body is None  # the client's body goes to the engine as it was


async def test_without_policies_streams_are_marked_too() -> None:
    """No policies: a chat stream still asks for its usage event (hidden again from the client),
    the model rewrite kept; a /v1/responses stream is flagged for usage.lua's first token; a JSON
    request keeps the kept reply (no per-request metadata)."""
    from tests.extproc.test_gateway_core import HEADERS, make

    gw, _ = make()
    assert gw.policies is None
    messages = [{"role": "user", "content": "hi"}]

    async def decide(path: str, body: dict[str, Any]) -> Routed:
        state, answer = gw.start({**HEADERS, ":path": path}, end_of_stream=False)
        assert answer is None
        routed = await gw.decide(state, orjson.dumps(body))
        gw.finish(state)
        assert isinstance(routed, Routed)
        return routed

    chat = await decide("/v1/chat/completions", {"model": "chat", "messages": messages,
                                                 "stream": True})  # fmt: skip
    assert chat.metadata == {STRIP_KEY: True} and chat.body is not None
    sent = orjson.loads(chat.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == "upstream/chat-7b"  # the ModelServer's model rewrite kept
    responses = await decide("/v1/responses", {"model": "chat", "input": "hi", "stream": True})
    assert responses.metadata == {RESPONSES_KEY: True}
    assert "stream_options" not in orjson.loads(responses.body or b"{}")
    plain = await decide("/v1/chat/completions", {"model": "chat", "messages": messages})
    assert plain.metadata is None
