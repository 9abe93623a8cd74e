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

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
import yaml
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from extproc.metrics import LabelCache
from fleet.pods import Pod

__all__ = [
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


class TokenEstimator:
    """Counts prompts with the engine's ``/tokenize`` (see the module doc)."""

    def __init__(self, config: TokenEstimateConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.timeout = config.timeout_ms / 1000.0
        self.metrics = EstimateMetrics(registry)
        self._turn = itertools.count()
        self._failing: set[str] = set()  # pods whose failure was logged and that did not recover
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        """One keep-alive client session (made in the running loop on first use); connections a
        pod closed, or idle for 30 s, are let go by aiohttp's connector."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=8, keepalive_timeout=30.0),
                headers={"Content-Type": "application/json"},
            )
        return self._session

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
            async with self._http().post(
                f"http://{pod.address}/tokenize",
                data=orjson.dumps(payload),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                status, raw = resp.status, await resp.read()
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
        session, self._session = self._session, None
        if session is not None:
            await session.close()
