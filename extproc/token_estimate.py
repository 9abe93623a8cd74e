"""The input-token estimate a rate-limited request reserves at admission.

By default characters/4 of the prompt (:func:`extproc.parsing.estimate_tokens`). With
``tokenEstimate: {method: tokenize}`` in the ``--policy-config`` file, the extproc asks the
engine: ``POST /tokenize`` (vLLM's shape: ``{"model", "messages"}`` for chat, ``{"model",
"prompt"}`` otherwise; the answer's ``count``) on a ready pod of the ModelServer the request is
routed to — the pod set the scheduler uses — with a short timeout. On a timeout, an error or an
answer without a count, the request reserves characters/4 instead; the failure is counted
(``matrixinfer_gateway_tokenize_failures_total{reason}``) and logged once per pod until that pod
answers again. Only requests of routes with an input-token limit are counted this way: the estimate
costs nothing elsewhere. The settlement corrects the reservation to the engine's exact
``prompt_tokens`` either way; a better estimate makes admission tighter before it does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from extproc.metrics import LabelCache
from extproc.scheduling.types import Pod

__all__ = [
    "HttpPool",
    "PolicyConfig",
    "TokenEstimateConfig",
    "TokenEstimator",
    "tokenize_request",
]

log = logging.getLogger("matrixinfer.extproc.token_estimate")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class TokenEstimateConfig(_Model):
    """How the input tokens of a rate-limited request are estimated at admission."""

    method: Literal["chars", "tokenize"] = Field(
        default="chars",
        description="chars: characters/4 of the prompt; tokenize: the engine's POST /tokenize",
    )
    timeout_ms: int = Field(
        default=200, ge=1, le=60000, description="tokenize: give up (and use chars) after this"
    )


class PolicyConfig(_Model):
    """``--policy-config`` file (YAML, camelCase): gateway-wide policy options."""

    token_estimate: TokenEstimateConfig = Field(default_factory=TokenEstimateConfig)

    @classmethod
    def load(cls, path: Path) -> PolicyConfig:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"policy config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"policy config {path}: expected a mapping (e.g. tokenEstimate: ...)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"policy config {path}: {problems}") from None


_CHAT_FIELDS = (
    "add_generation_prompt",
    "continue_final_message",
    "tools",
    "chat_template",
    "chat_template_kwargs",
)


def tokenize_request(kind: str, body: dict[str, Any], model: str) -> dict[str, Any] | int | None:
    """The ``/tokenize`` body for a request (an int: the count is known without asking; None:
    nothing the engine's tokenizer endpoint takes, use characters/4)."""
    if kind == "chat":
        out: dict[str, Any] = {"model": model, "messages": body.get("messages")}
        for name in _CHAT_FIELDS:
            if name in body:
                out[name] = body[name]
        return out
    value = body.get("prompt" if kind == "completions" else "input")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return {"model": model, "prompt": value}
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return len(value)  # token ids: already counted
    return None


class EstimateMetrics(LabelCache):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.estimates = Counter(
            "matrixinfer_gateway_token_estimates",
            "Input-token estimates of rate-limited requests by source (tokenize = the engine's "
            "count; token_ids = a prompt of token ids; fallback = characters/4 after a failed "
            "/tokenize; chars = nothing the engine's /tokenize takes).",
            ["source"],
            registry=registry,
        )
        self.failures = Counter(
            "matrixinfer_gateway_tokenize_failures",
            "Failed /tokenize calls by reason (timeout | error | status | no_pod).",
            ["reason"],
            registry=registry,
        )
        self.reserved = Counter(
            "matrixinfer_gateway_estimated_prompt_tokens",
            "Prompt tokens reserved at admission (the estimates), by model; the settled exact "
            "count is matrixinfer_gateway_usage_tokens_total{kind='prompt'}.",
            ["model"],
            registry=registry,
        )


class HttpPool:
    """A lean HTTP/1.1 keep-alive client for one small JSON POST per call (``/tokenize``).

    aiohttp's client cost ~250-300 µs of user CPU per call here, this one ~85-95 µs (uvloop,
    docs/policies.md). Idle connections are kept per address (``max_idle`` each); a reused
    connection the server closed in the meantime is replaced once.
    """

    def __init__(self, max_idle: int = 32, idle_seconds: float = 30.0) -> None:
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds  # sweep(): an address unused this long is let go
        self._idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._used: dict[str, float] = {}  # address -> when a connection was last put back

    async def post(self, address: str, path: str, body: bytes, seconds: float) -> tuple[int, bytes]:
        """(status, body) of ``POST http://address/path``; raises on timeout or bad answers."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        async with asyncio.timeout(seconds):
            idle = self._idle.get(address)
            while idle:
                conn = idle.pop()
                try:
                    return await self._exchange(address, conn, head + body)
                except (ConnectionError, asyncio.IncompleteReadError):
                    continue  # closed while idle: try the next one, then a new one
            host, _, port = address.rpartition(":")
            conn = await asyncio.open_connection(host, int(port))
            return await self._exchange(address, conn, head + body)

    async def _exchange(
        self,
        address: str,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        request: bytes,
    ) -> tuple[int, bytes]:
        reader, writer = conn
        keep = False
        try:
            writer.write(request)
            line = await reader.readline()
            if not line:
                raise ConnectionResetError("the connection was closed")
            version, status_text = line.split(None, 2)[:2]
            status = int(status_text)
            length: int | None = None
            chunked = False
            keep = version == b"HTTP/1.1"
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise asyncio.IncompleteReadError(b"", None)
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    keep = b"close" not in value.lower()
            if chunked:
                parts = []
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    parts.append(await reader.readexactly(size))
                    await reader.readexactly(2)
                data = b"".join(parts)
            elif length is not None:
                data = await reader.readexactly(length)
            else:
                data = await reader.read()
                keep = False
        except BaseException:
            keep = False
            raise
        finally:
            if keep:
                idle = self._idle.setdefault(address, [])
                if len(idle) < self.max_idle:
                    idle.append(conn)
                    self._used[address] = time.monotonic()
                else:
                    writer.close()
            else:
                writer.close()
        return status, data

    def sweep(self, now: float | None = None) -> int:
        """Close idle connections the server closed, and all of an address unused for
        ``idle_seconds`` (pods come and go); the number closed."""
        now = time.monotonic() if now is None else now
        closed = 0
        for address in list(self._idle):
            idle = self._idle[address]
            stale = now - self._used.get(address, now) > self.idle_seconds
            keep = []
            for reader, writer in idle:
                if stale or reader.at_eof():
                    writer.close()
                    closed += 1
                else:
                    keep.append((reader, writer))
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]
                self._used.pop(address, None)
        return closed

    def close(self) -> None:
        for idle in self._idle.values():
            for _, writer in idle:
                writer.close()
        self._idle.clear()
        self._used.clear()


class TokenEstimator:
    """Counts prompts with the engine's ``/tokenize`` (see the module doc)."""

    def __init__(self, config: TokenEstimateConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.timeout = config.timeout_ms / 1000.0
        self.metrics = EstimateMetrics(registry)
        self._turn = itertools.count()
        self._failing: set[str] = set()  # pods whose failure was logged and that did not recover
        self.http = HttpPool()

    async def estimate(
        self,
        pods: Sequence[Pod],
        kind: str,
        body: dict[str, Any],
        upstream_model: str,
        fallback: int,
        model: str,
    ) -> int:
        """The prompt's token count from a ready pod, else ``fallback`` (characters/4).
        ``upstream_model`` is the name the engine knows; ``model`` the metric label."""
        m = self.metrics
        payload = tokenize_request(kind, body, upstream_model)
        if payload is None:
            source, count = "chars", fallback
        elif isinstance(payload, int):
            source, count = "token_ids", payload
        else:
            asked = await self._ask(pods, payload)
            source, count = ("fallback", fallback) if asked is None else ("tokenize", asked)
        m.child(m.estimates, source).inc()
        m.child(m.reserved, model).inc(count)
        return count

    async def _ask(self, pods: Sequence[Pod], payload: dict[str, Any]) -> int | None:
        m = self.metrics
        ready = [p for p in pods if p.ready]
        if not ready:
            m.child(m.failures, "no_pod").inc()
            return None
        pod = ready[next(self._turn) % len(ready)]
        reason, detail = "error", ""
        try:
            status, raw = await self.http.post(
                pod.address, "/tokenize", orjson.dumps(payload), self.timeout
            )
            if status != 200:
                reason, detail = "status", f"HTTP {status}: {raw[:200]!r}"
            else:
                count = orjson.loads(raw).get("count")
                if type(count) is int and count >= 0:
                    self._recovered(pod)
                    return count
                detail = f"no 'count' in the answer {raw[:200]!r}"
        except TimeoutError:
            reason, detail = "timeout", f"no answer within {self.config.timeout_ms} ms"
        except Exception as exc:  # connection, HTTP or JSON trouble: never fail the request
            detail = f"{type(exc).__name__}: {exc}"
        m.child(m.failures, reason).inc()
        if pod.name not in self._failing:
            self._failing.add(pod.name)
            log.warning(
                "tokenize on pod %s (%s) failed (%s): using characters/4 for input-token "
                "estimates; logged once until the pod answers again",
                pod.name,
                pod.address,
                detail,
            )
        return None

    def _recovered(self, pod: Pod) -> None:
        if pod.name in self._failing:
            self._failing.discard(pod.name)
            log.info("tokenize on pod %s (%s) answers again", pod.name, pod.address)

    async def close(self) -> None:
        self.http.close()
