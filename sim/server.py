"""The HTTP edge (aiohttp): vLLM/SGLang-shaped OpenAI endpoints over the engine core.

Handlers translate bodies into engine requests and stream what the engine produces; every
decision about time, batching and caching is in :mod:`sim.engine`. Every response carries
``x-inference-pod``; every error is OpenAI-style JSON.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import xxhash
from aiohttp import web

from sim.config import FaultConfig, SimConfig
from sim.driver import EngineDriver
from sim.engine import SGLANG_BUCKETS, VLLM_BUCKETS, Engine, QueueFull, Request
from sim.kvpublisher import ZmqEventPublisher
from sim.metrics import LoraView, SglangCollector, VllmCollector, make_registry, render
from sim.protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    LoadLoraBody,
    Message,
    ResponsesBody,
    TokenizeBody,
    UnloadLoraBody,
    parse_body,
)
from sim.tokenizer import (
    OUTPUT_WORD_IDS,
    OUTPUT_WORDS,
    VOCAB_SIZE,
    Tokenizer,
    apply_chat_template,
)

__all__ = ["POD_HEADER", "SimServer", "serve"]

log = logging.getLogger("matrixinfer.sim")

POD_HEADER = "x-inference-pod"
_JSON = "application/json"
_WORD: dict[int, str] = {}
for _w, _i in zip(OUTPUT_WORDS, OUTPUT_WORD_IDS, strict=True):
    _WORD.setdefault(_i, _w)
_FIRST: dict[int, bytes] = {i: w.encode() for i, w in _WORD.items()}
_NEXT: dict[int, bytes] = {i: b" " + w.encode() for i, w in _WORD.items()}
_DONE = b"data: [DONE]\n\n"
_END = b'","stop_reason":null}]}\n\n'


def process_age() -> float:
    """Seconds since this process started (Linux: ``/proc/self/stat``; elsewhere 0)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        boot = Path("/proc/uptime").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, in ticks since boot
    return max(0.0, float(boot.split()[0]) - started)


@dataclass(slots=True)
class LoraAdapter:
    name: str
    path: str
    created: int


@dataclass(slots=True)
class _Gen:
    """What a parsed generation request turned into."""

    req: Request
    model: str  # the name echoed in responses (base model or adapter)
    stream: bool
    include_usage: bool
    chat: bool
    responses: bool = False  # answered in the Responses API's shape (/v1/responses)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type=_JSON)


def _error(err: ApiError) -> web.Response:
    return web.Response(body=err.body(), status=err.status, content_type=_JSON)


class SimServer:
    """One simulated engine pod: the engine, its driver, the aiohttp application."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.sglang = cfg.engine_kind == "sglang"
        self.kv_publisher: ZmqEventPublisher | None = None
        if cfg.kv_events.active:
            # each simulator stands for a pod with its own IP: "*" binds the simulator's --host
            self.kv_publisher = ZmqEventPublisher(
                cfg.kv_events, bind_host=cfg.host, fmt=cfg.kv_events_format
            )
        self.engine = Engine(
            cfg.engine,
            SGLANG_BUCKETS if self.sglang else VLLM_BUCKETS,
            record_events=self.kv_publisher is not None,
        )
        self.driver = EngineDriver(
            self.engine,
            cfg.time_scale,
            publish=self.kv_publisher.publish if self.kv_publisher is not None else None,
        )
        self.tokenizer = Tokenizer()
        self.pod_name = cfg.pod_name or os.environ.get("POD_NAME") or f"sim-{cfg.host}-{cfg.port}"
        self.faults = cfg.faults.model_copy()
        self._fault_rng = random.Random(cfg.seed * 7919 + 17)
        self._started = time.monotonic()
        self.created = int(time.time())
        self.engine_id = f"{self.pod_name}-{uuid.uuid4().hex[:8]}"
        self.loras: dict[str, LoraAdapter] = {
            name: LoraAdapter(name, path, self.created) for name, path in cfg.lora_modules.items()
        }
        self.lora_view = LoraView(cfg.engine.max_loras)
        collector = (
            SglangCollector(self.engine, cfg.model)
            if self.sglang
            else VllmCollector(self.engine, cfg.model, self.lora_view)
        )
        self.registry = make_registry(collector)
        self.output_length = cfg.output_length
        self.model_len = cfg.engine.max_model_len

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._errors])
        app.on_response_prepare.append(self._identity)
        r = app.router
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/responses", self.responses)
        r.add_get("/v1/models", self.models)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)  # SGLang's deeper health check
        r.add_get("/version", self.version)
        r.add_get("/metrics", self.metrics)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/v1/load_lora_adapter", self.load_lora)
        r.add_post("/v1/unload_lora_adapter", self.unload_lora)
        if self.sglang:  # SGLang's paths for the same calls (lora_name, lora_path)
            r.add_post("/load_lora_adapter", self.load_lora)
            r.add_post("/unload_lora_adapter", self.unload_lora)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_get("/sim/fault", self.get_fault)
        r.add_post("/sim/fault", self.set_fault)
        r.add_get("/sim/state", self.state)
        r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        # the slow start counts from the process's start, as an engine's start-up includes
        # its own (Python) start: a pod is Ready after max(slow start, its real start-up)
        self._started = time.monotonic() - process_age()
        self.driver.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.driver.stop()
        if self.kv_publisher is not None:
            self.kv_publisher.close()

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's dev endpoint: drop every cached block; 400 while requests hold blocks."""
        if not self.engine.kv.reset_prefix_cache():
            raise ApiError(400, "cannot reset the prefix cache while requests hold KV blocks")
        self.driver.publish_events()
        return web.Response(text="")

    async def _identity(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POD_HEADER] = self.pod_name

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        except ApiError as err:
            return _error(err)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(ApiError(exc.status, exc.reason or "error"))
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:  # never a traceback to the caller
            log.exception("internal error on %s", request.path)
            return _error(ApiError(500, f"internal error: {type(exc).__name__}"))

    # ------------------------------------------------------------------ health, faults

    def _starting(self) -> bool:
        return time.monotonic() - self._started < self.cfg.slow_start

    def is_ready(self) -> bool:
        """What /health answers 200 to (the gRPC ServerReady too)."""
        return not self._starting() and not self.faults.not_ready

    async def health(self, request: web.Request) -> web.Response:
        if self._starting():
            return web.Response(status=503, text="engine is starting")
        if self.faults.not_ready:
            return web.Response(status=503, text="engine is not ready")
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": "0.0.0+matrixinfer-sim", "engine": self.cfg.engine_kind})

    async def get_fault(self, request: web.Request) -> web.Response:
        return _json(self.faults.model_dump())

    async def set_fault(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            patch = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(patch, dict):
            raise ApiError(400, "the request body must be a JSON object")
        merged = {**self.faults.model_dump(), **patch}
        try:
            self.faults = FaultConfig.model_validate(merged)
        except Exception as exc:
            raise ApiError(400, f"invalid fault settings: {exc}") from None
        return _json(self.faults.model_dump())

    async def state(self, request: web.Request) -> web.Response:
        e = self.engine
        s = e.stats
        return _json(
            {
                "pod": self.pod_name,
                "now": self.driver.now(),
                "running": len(e.running),
                "waiting": e.num_waiting,
                "kv_cache_usage": e.kv_usage(),
                "free_blocks": e.kv.pool.num_free,
                "steps": s.steps,
                "busy_time": s.busy_time,
                "requests": s.requests_total,
                "prompt_tokens": s.prompt_tokens,
                "generation_tokens": s.generation_tokens,
                "prefill_computed_tokens": s.prefill_computed_tokens,
                "prefix_cache_queries": s.prefix_queries,
                "prefix_cache_hits": s.prefix_hits,
                "preemptions": s.preemptions,
                "kv_transfers": s.kv_transfers,
                "kv_transfer_tokens": s.kv_transfer_tokens,
                "ttft_mean": s.ttft.mean(),
                "itl_mean": s.itl.mean(),
                "success": s.success,
                "loras": sorted(self.loras),
            }
        )

    async def _apply_faults(self, request: web.Request) -> None:
        """Answer 503 while starting; draw the injected error / reset / hang."""
        if self._starting():
            raise ApiError(503, "the engine is still starting")
        f = self.faults
        if not (f.error_rate or f.reset_rate or f.hang_rate):
            return
        x = self._fault_rng.random()
        if x < f.error_rate:
            raise ApiError(500, "injected fault: internal server error")
        x -= f.error_rate
        if x < f.reset_rate:
            transport = request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                transport.abort()
            raise asyncio.CancelledError
        x -= f.reset_rate
        if x < f.hang_rate:
            await asyncio.get_running_loop().create_future()  # until the client goes away

    # ------------------------------------------------------------------ models, tokenize, lora

    def _resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """Requested model -> (name to echo, LoRA adapter or None); 404 when unknown."""
        if name is None or name == self.cfg.model:
            return self.cfg.model, None
        if name in self.loras:
            return name, name
        raise ApiError(404, f"The model `{name}` does not exist.", "model")

    async def models(self, request: web.Request) -> web.Response:
        owner = "sglang" if self.sglang else "vllm"

        def card(mid: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
            return {
                "id": mid,
                "object": "model",
                "created": created,
                "owned_by": owner,
                "root": root,
                "parent": parent,
                "max_model_len": self.model_len if parent is None else None,
                "permission": [],
            }

        data = [card(self.cfg.model, self.cfg.model, None, self.created)]
        data += [card(a.name, a.path, self.cfg.model, a.created) for a in self.loras.values()]
        return _json({"object": "list", "data": data})

    def _chat_prompt(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return apply_chat_template([(m.role, m.text()) for m in messages], add_generation_prompt)

    async def tokenize(self, request: web.Request) -> web.Response:
        body = parse_body(await request.read(), TokenizeBody)
        self._resolve_model(body.model)
        if body.messages is not None:
            text = self._chat_prompt(body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            text = body.prompt
        else:
            raise ApiError(400, "invalid request: one of prompt or messages is required", "prompt")
        ids = self.tokenizer.encode(text)
        return _json(
            {"count": len(ids), "max_model_len": self.model_len, "tokens": ids, "token_strs": None}
        )

    async def load_lora(self, request: web.Request) -> web.Response:
        body = parse_body(await request.read(), LoadLoraBody)
        name = body.lora_name
        if name in self.loras or name == self.cfg.model:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        if self.cfg.max_cpu_loras is not None and len(self.loras) >= self.cfg.max_cpu_loras:
            raise ApiError(
                400,
                f"cannot load '{name}': {len(self.loras)} adapters are loaded "
                f"(--max-cpu-loras {self.cfg.max_cpu_loras})",
                "lora_name",
            )
        self.loras[name] = LoraAdapter(name, body.lora_path, int(time.time()))
        self.lora_view.last_change = time.time()
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = parse_body(await request.read(), UnloadLoraBody)
        name = body.lora_name
        if name not in self.loras:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        del self.loras[name]
        self.lora_view.last_change = time.time()
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=render(self.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"malformed JSON body: {exc}") from None
        if not isinstance(data, dict) or "input" not in data:
            raise ApiError(400, "invalid request: input: Field required", "input")
        model, _ = self._resolve_model(data.get("model"))
        inputs = data["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise ApiError(400, "invalid request: input must be a string or strings", "input")
        out = []
        total = 0
        for i, text in enumerate(inputs):
            total += self.tokenizer.count(text)
            rng = random.Random(xxhash.xxh64_intdigest(text.encode(), seed=self.cfg.seed))
            vec = [rng.uniform(-1.0, 1.0) for _ in range(64)]
            norm = sum(v * v for v in vec) ** 0.5 or 1.0
            out.append({"object": "embedding", "index": i, "embedding": [v / norm for v in vec]})
        return _json(
            {
                "object": "list",
                "data": out,
                "model": model,
                "usage": {"prompt_tokens": total, "total_tokens": total},
            }
        )

    # ------------------------------------------------------------------ generation

    def _build(self, body: ChatBody | CompletionBody, chat: bool) -> _Gen:
        model, lora = self._resolve_model(body.model)
        if isinstance(body, ChatBody):
            ids = self.tokenizer.encode(
                self._chat_prompt(body.messages, body.add_generation_prompt)
            )
        else:
            ids = self._completion_prompt(body.prompt)
        if not ids:
            raise ApiError(400, "invalid request: the prompt is empty", "prompt")
        limit = body.output_limit
        room = self.model_len - len(ids)
        if room < 1 or (limit is not None and limit > room):
            want = len(ids) + (limit or 1)
            raise ApiError(
                400,
                f"This model's maximum context length is {self.model_len} tokens. However, you "
                f"requested {want} tokens ({len(ids)} in the messages, {limit or 1} in the "
                "completion). Please reduce the length of the messages or completion.",
                "max_tokens" if limit is not None and len(ids) < self.model_len else "messages",
            )

        # PD roles: vLLM kv_transfer_params (NIXL-style) or SGLang bootstrap fields
        remote_decode = remote_prefill = False
        kvp = body.kv_transfer_params or {}
        if kvp.get("do_remote_decode"):
            remote_decode = True
        if kvp.get("do_remote_prefill"):
            remote_prefill = True
        if self.sglang and body.bootstrap_room is not None:
            if self.cfg.role == "prefill":
                remote_decode = True
            elif self.cfg.role == "decode":
                remote_prefill = True
        if remote_decode and remote_prefill:
            raise ApiError(
                400, "kv_transfer_params: do_remote_decode and do_remote_prefill both set"
            )
        if remote_decode and self.cfg.role == "decode":
            raise ApiError(400, "this pod has role decode: it cannot prefill for a remote decoder")
        if remote_prefill and self.cfg.role == "prefill":
            raise ApiError(400, "this pod has role prefill: it cannot decode a remote prefill")

        # output plan: deterministic for (seed, request seed, prompt)
        h = xxhash.xxh64_intdigest(array.array("i", ids).tobytes(), seed=self.cfg.seed)
        if body.seed is not None:
            h ^= (body.seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        rng = random.Random(h)
        if remote_decode:
            n, reason = 1, "length"
        elif limit is not None:
            n, reason = limit, "length"
        else:
            n = self.output_length.sample(rng)
            reason = "stop"
            if n >= room:
                n, reason = room, "length"
        out = rng.choices(OUTPUT_WORD_IDS, k=n)
        req = Request(
            request_id=uuid.uuid4().hex,
            prompt_ids=ids,
            output_ids=out,
            arrival=0.0,
            finish_reason_at_end=reason,
            lora=lora,
            remote_prefill=remote_prefill,
            remote_decode=remote_decode,
        )
        opts = body.stream_options
        return _Gen(req, model, body.stream, bool(opts and opts.include_usage), chat)

    def _completion_prompt(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not prompt:
            return []
        if len(prompt) == 1 and not isinstance(prompt[0], int):
            return self._completion_prompt(prompt[0])
        if all(isinstance(x, int) for x in prompt):
            ids = [int(x) for x in prompt]  # type: ignore[arg-type]
            bad = [x for x in ids if not 0 <= x < VOCAB_SIZE]
            if bad:
                raise ApiError(
                    400, f"invalid request: token id {bad[0]} out of vocabulary", "prompt"
                )
            return ids
        raise ApiError(400, "invalid request: batched prompts are not supported", "prompt")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, False)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: generated as a chat, answered in the Responses API's shape
        (usage ``input_tokens``/``output_tokens``; a stream's events end with
        ``response.completed``, which carries the usage)."""
        body = parse_body(await request.read(), ResponsesBody)
        chat = body.as_chat()
        chat.stream = body.stream
        gen = self._build(chat, True)
        gen.responses = True
        return await self._run(request, gen)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        body: ChatBody | CompletionBody = (
            parse_body(raw, ChatBody) if chat else parse_body(raw, CompletionBody)
        )
        return await self._run(request, self._build(body, chat))

    async def _run(self, request: web.Request, gen: _Gen) -> web.StreamResponse:
        await self._apply_faults(request)
        req = gen.req
        req.arrival = self.driver.now()
        try:
            self.driver.submit(req)
        except QueueFull as exc:
            raise ApiError(429, f"too many requests: {exc}") from None
        try:
            if gen.stream:
                if gen.responses:
                    return await self._stream_responses(request, gen)
                return await self._stream(request, gen)
            while not req.done:
                await self.driver.wait(req)
                req.sent = req.num_output
            if gen.responses:
                return _json(self._response_object(gen, "completed"))
            return _json(self._full_response(gen))
        finally:
            if not req.done:
                self.driver.abort(req)

    def _usage(self, req: Request) -> dict[str, Any]:
        return {
            "prompt_tokens": req.prompt_len,
            "total_tokens": req.prompt_len + req.num_output,
            "completion_tokens": req.num_output,
            "prompt_tokens_details": {"cached_tokens": req.num_cached_tokens},
        }

    def _kv_params(self, req: Request) -> dict[str, Any] | None:
        if not req.remote_decode or self.sglang:
            return None
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": req.kv_block_ids,
            "remote_engine_id": self.engine_id,
            "remote_host": self.cfg.host,
            "remote_port": self.cfg.nixl_side_channel_port,
            "tp_size": 1,
        }

    def _text(self, req: Request) -> str:
        return " ".join(_WORD[t] for t in req.output_ids[: req.num_output])

    def _full_response(self, gen: _Gen) -> dict[str, Any]:
        req = gen.req
        choice: dict[str, Any]
        if gen.chat:
            rid = f"chatcmpl-{req.request_id}"
            obj = "chat.completion"
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": self._text(req), "tool_calls": []},
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": None,
            }
        else:
            rid = f"cmpl-{req.request_id}"
            obj = "text_completion"
            choice = {
                "index": 0,
                "text": self._text(req),
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        return {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": gen.model,
            "choices": [choice],
            "usage": self._usage(req),
            "prompt_logprobs": None,
            "kv_transfer_params": self._kv_params(req),
        }

    async def _stream(self, request: web.Request, gen: _Gen) -> web.StreamResponse:
        req = gen.req
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        head = orjson.dumps(
            {
                "id": f"{'chatcmpl' if gen.chat else 'cmpl'}-{req.request_id}",
                "object": "chat.completion.chunk" if gen.chat else "text_completion",
                "created": int(time.time()),
                "model": gen.model,
            }
        )[:-1]
        # vLLM (and SGLang) send a chat stream's role chunk when the first token is out, with it
        role = b""
        if gen.chat:
            pre = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":"'
            end_open = b'"},"logprobs":null,"finish_reason":'
            role = (
                b"data: "
                + head
                + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n'
            )
        else:
            pre = b"data: " + head + b',"choices":[{"index":0,"text":"'
            end_open = b'","logprobs":null,"finish_reason":'
        # vLLM leaves stop_reason out of chat chunks until the last one; completions carry it
        mid = end_open + (b"null}]}\n\n" if gen.chat else b'null,"stop_reason":null}]}\n\n')
        first, nxt = _FIRST, _NEXT
        out_ids = req.output_ids
        driver = self.driver
        while True:
            await driver.wait(req)
            upto = req.num_output
            sent = req.sent
            if upto > sent:
                parts = [role] if role else []
                role = b""
                for i in range(sent, upto):
                    word = (nxt if i else first)[out_ids[i]]
                    if req.done and i == upto - 1:
                        reason = (req.finish_reason or "stop").encode()
                        parts.append(
                            pre + word + end_open + b'"' + reason + b'","stop_reason":null}]}\n\n'
                        )
                    else:
                        parts.append(pre + word + mid)
                req.sent = upto
                await resp.write(b"".join(parts))
            if req.done:
                break
        if gen.include_usage:
            await resp.write(
                b"data: "
                + head
                + b',"choices":[],"usage":'
                + orjson.dumps(self._usage(req))
                + b"}\n\n"
            )
        await resp.write(_DONE)
        await resp.write_eof()
        return resp

    def _response_object(self, gen: _Gen, status: str) -> dict[str, Any]:
        """The Responses API's response object (``status`` completed, or in_progress while a
        stream runs: no output, no usage yet)."""
        req = gen.req
        done = status != "in_progress"
        if done and req.finish_reason == "length":
            status = "incomplete"
        output: list[dict[str, Any]] = []
        if done:
            text = {"type": "output_text", "text": self._text(req), "annotations": []}
            output.append(_message_item(req, "completed", [text]))
        return {
            "id": f"resp_{req.request_id}",
            "object": "response",
            "created_at": int(time.time()),
            "model": gen.model,
            "status": status,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "output": output,
            "usage": (
                {
                    "input_tokens": req.prompt_len,
                    "input_tokens_details": {"cached_tokens": req.num_cached_tokens},
                    "output_tokens": req.num_output,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": req.prompt_len + req.num_output,
                }
                if done
                else None
            ),
        }

    async def _stream_responses(self, request: web.Request, gen: _Gen) -> web.StreamResponse:
        """A Responses API stream, as vLLM sends it: ``response.created`` and
        ``response.in_progress`` at once, the output item and content part with the first
        token, a ``response.output_text.delta`` per token, then the ``*.done`` events and
        ``response.completed`` (with the usage)."""
        req = gen.req
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        seq = 0

        def event(kind: str, **data: Any) -> bytes:
            nonlocal seq
            seq += 1
            payload = orjson.dumps({"type": kind, "sequence_number": seq - 1, **data})
            return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

        item_id = f"msg_{req.request_id}"
        await resp.write(
            event("response.created", response=self._response_object(gen, "in_progress"))
            + event("response.in_progress", response=self._response_object(gen, "in_progress"))
        )
        started = False
        while True:
            await self.driver.wait(req)
            upto, sent = req.num_output, req.sent
            if upto > sent:
                parts = []
                if not started:
                    started = True
                    parts.append(
                        event(
                            "response.output_item.added",
                            output_index=0,
                            item=_message_item(req, "in_progress", []),
                        )
                    )
                    parts.append(
                        event(
                            "response.content_part.added",
                            item_id=item_id,
                            output_index=0,
                            content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []},
                        )
                    )
                for i in range(sent, upto):
                    word = (_NEXT if i else _FIRST)[req.output_ids[i]].decode()
                    parts.append(
                        event(
                            "response.output_text.delta",
                            item_id=item_id,
                            output_index=0,
                            content_index=0,
                            delta=word,
                            logprobs=[],
                        )
                    )
                req.sent = upto
                await resp.write(b"".join(parts))
            if req.done:
                break
        text = self._text(req)
        part = {"type": "output_text", "text": text, "annotations": []}
        await resp.write(
            event(
                "response.output_text.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                text=text,
                logprobs=[],
            )
            + event(
                "response.content_part.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part=part,
            )
            + event(
                "response.output_item.done",
                output_index=0,
                item=_message_item(req, "completed", [part]),
            )
            + event("response.completed", response=self._response_object(gen, "completed"))
        )
        await resp.write_eof()
        return resp


def _message_item(req: Request, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    """The Responses API's assistant message output item."""
    return {
        "type": "message",
        "id": f"msg_{req.request_id}",
        "status": status,
        "role": "assistant",
        "content": content,
    }


async def serve(cfg: SimConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run one simulator until SIGTERM/SIGINT (or cancellation)."""
    try:
        server = SimServer(cfg)
    except OSError as exc:
        raise SystemExit(f"matrixinfer-sim: {exc}") from None
    runner = web.AppRunner(server.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(
            f"matrixinfer-sim: cannot listen on {cfg.host}:{cfg.port}: {exc}"
        ) from None
    grpc_server = None
    if cfg.grpc_port:  # the Open Inference Protocol's gRPC service (sim.grpc_server)
        from sim.grpc_server import start_grpc

        try:
            grpc_server = await start_grpc(server, cfg.host, cfg.grpc_port)
        except (OSError, RuntimeError) as exc:
            await runner.cleanup()
            raise SystemExit(f"matrixinfer-sim: --grpc-port: {exc}") from None
    log.info(
        "sim %s serving %s (%s, role %s) on http://%s:%d%s, time scale %g",
        server.pod_name, cfg.model, cfg.engine_kind, cfg.role, cfg.host, cfg.port,
        f" and gRPC {cfg.host}:{cfg.grpc_port}" if grpc_server is not None else "",
        cfg.time_scale,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=None)
        await runner.cleanup()
