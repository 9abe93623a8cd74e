"""The gateway's decisions for one request: parse, route, schedule, answer. Pure of gRPC.

The ext_proc servicer (``extproc.servicer``) calls, per request stream:

1. :meth:`Gateway.start` with the request headers — answers ``GET /v1/models`` and rejects bad
   request lines or announced oversize bodies at once;
2. :meth:`Gateway.decide` with the whole body — returns :class:`Routed` (endpoints, best first, and
   the body to forward when the model is rewritten) or :class:`Immediate` (an OpenAI-style error);
3. :meth:`Gateway.routed` once the answer went out (credits the scheduler's prefix/session state);
4. :meth:`Gateway.finish` when the stream ends (the request is over: in-flight count drops).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from extproc.datastore import Datastore, ServerView
from extproc.errors import (
    GatewayError,
    bad_request,
    body_too_large,
    internal_error,
    no_pod_available,
)
from extproc.metrics import GatewayMetrics
from extproc.parsing import DEFAULT_BODY_LIMIT, Endpoint, classify, estimate_tokens, parse_body
from extproc.scheduling.types import (
    AllPodsSaturated,
    NoPodAvailable,
    SchedulingRequest,
    SchedulingResult,
)
from fleet.pods import Pod

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from extproc.parsing import ParsedRequest
    from extproc.policies.enforce import Policies
    from extproc.routing import RouteDecision

__all__ = [
    "DESTINATION_HEADER",
    "SESSION_HEADER",
    "Gateway",
    "Immediate",
    "RequestState",
    "Routed",
    "SchedulerLike",
]

log = logging.getLogger("matrixinfer.extproc")

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SESSION_HEADER = "x-session-id"


class SchedulerLike(Protocol):
    def schedule(self, request: SchedulingRequest, pods: Sequence[Pod]) -> SchedulingResult: ...
    def on_routed(self, request: SchedulingRequest, result: SchedulingResult) -> None: ...
    def on_finished(self, request_id: str, pod_name: str) -> None: ...
    def forget_pod(self, pod_name: str) -> None: ...


SchedulerFactory = Callable[[Any], SchedulerLike]


def default_scheduler_factory(profile: Any) -> SchedulerLike:
    from extproc.scheduling import build_scheduler

    return build_scheduler(profile=profile, clock=time.monotonic)


@dataclass(slots=True)
class Immediate:
    """An answer from the gateway itself."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # e.g. retry-after, x-ratelimit-*


@dataclass(slots=True)
class Routed:
    endpoints: list[str]  # primary first, then fallbacks ("ip:port")
    pod: Pod
    body: bytes | None  # the body to forward when it changed (model rewrite), else None
    headers: dict[str, str] = field(default_factory=dict)  # headers to set towards the pod
    metadata: dict[str, Any] | None = None  # dynamic metadata namespace "matrixinfer" (policies)


@dataclass(slots=True)
class RequestState:
    request_id: str
    started: float
    headers: dict[str, str]
    endpoint: Endpoint | None = None
    model: str = ""
    route: str = ""
    server: str = ""
    server_key: str = ""
    pod_name: str | None = None
    scheduling_request: SchedulingRequest | None = None
    result: SchedulingResult | None = None
    scheduler: SchedulerLike | None = None
    code: int = 0
    identity: Any = None  # extproc.auth.Identity when policies authenticate the caller
    charge: Any = None  # extproc.usage.Charge of an admitted request (policies)


def _error(exc: GatewayError) -> Immediate:
    headers = getattr(exc, "headers", None)
    return Immediate(exc.status, exc.body(), headers=dict(headers) if headers else {})


class Gateway:
    def __init__(
        self,
        datastore: Datastore,
        metrics: GatewayMetrics | None = None,
        *,
        body_limit: int = DEFAULT_BODY_LIMIT,
        scheduler_factory: SchedulerFactory = default_scheduler_factory,
        rng: Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        session_header: str = SESSION_HEADER,
    ) -> None:
        self.datastore = datastore
        self.metrics = metrics or GatewayMetrics()
        self.body_limit = body_limit
        self.scheduler_factory = scheduler_factory
        self.rng = rng or Random()
        self.clock = clock
        self.session_header = session_header
        self._schedulers: dict[str, tuple[Any, SchedulerLike]] = {}
        datastore.on_pod_removed.append(self._forget_pod)
        self.policies: Policies | None = None  # extproc.policies (auth, limits, queue, usage)

    # ---- schedulers ---------------------------------------------------------------------------
    def scheduler_for(self, view: ServerView, default_profile: Any) -> SchedulerLike:
        profile = view.profile if view.profile is not None else default_profile
        held = self._schedulers.get(view.key)
        if held is not None and held[0] == profile:
            return held[1]
        scheduler = self.scheduler_factory(profile)
        self._schedulers[view.key] = (profile, scheduler)
        return scheduler

    def _forget_pod(self, pod_name: str) -> None:
        for _, scheduler in self._schedulers.values():
            scheduler.forget_pod(pod_name)

    # ---- request phases -----------------------------------------------------------------------
    def start(
        self, headers: Mapping[str, str], end_of_stream: bool
    ) -> tuple[RequestState, Immediate | None]:
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        state = RequestState(request_id, self.clock(), dict(headers))
        try:
            endpoint = classify(headers.get(":method", "GET"), headers.get(":path", "/"))
            state.endpoint = endpoint
            if endpoint.kind == "models":
                return state, self._answer(state, Immediate(200, self.models_body()))
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.body_limit:
                raise body_too_large(int(length), self.body_limit)
            if end_of_stream:
                raise bad_request(
                    "the request body is empty; send a JSON object with a 'model' field"
                )
            if self.policies is not None:
                state.identity = self.policies.authenticate(headers)
        except GatewayError as exc:
            return state, self._answer(state, _error(exc))
        return state, None

    def too_large(self, state: RequestState, size: int) -> Immediate:
        return self._answer(state, _error(body_too_large(size, self.body_limit)))

    def models_body(self) -> bytes:
        created = 0
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "matrixinfer"}
            for name in self.datastore.snapshot.routes.model_names()
        ]
        return orjson.dumps({"object": "list", "data": data})

    def decide(
        self, state: RequestState, raw: bytes
    ) -> Routed | Immediate | Coroutine[Any, Any, Routed | Immediate]:
        """Routed/Immediate; with policies configured, a coroutine to await (they may wait)."""
        if self.policies is not None:
            return self._decide_with_policies(state, raw, self.policies)
        began = time.perf_counter()
        try:
            return self._decide(state, raw)
        except GatewayError as exc:
            return self._answer(state, _error(exc))
        except Exception:  # a bug must cost one request a 500, never the process or the stream
            log.exception("request %s: the gateway failed to decide", state.request_id)
            self._release(state)
            return self._answer(state, _error(internal_error(state.request_id)))
        finally:
            self.metrics.decision_duration.observe(time.perf_counter() - began)

    def _route(self, state: RequestState, raw: bytes) -> tuple[ParsedRequest, RouteDecision]:
        assert state.endpoint is not None
        parsed = parse_body(state.endpoint.kind, raw, self.body_limit)
        state.model = parsed.model
        snap = self.datastore.snapshot
        decision = snap.routes.decide(parsed.model, state.headers, state.endpoint.path, self.rng)
        state.route = decision.route
        state.server = decision.server
        state.server_key = decision.server_key
        return parsed, decision

    def _schedule(
        self, view: ServerView, scheduler: SchedulerLike, request: SchedulingRequest
    ) -> SchedulingResult:
        if not view.pods:
            raise no_pod_available(f"ModelServer '{view.name}' has no pods")
        began = time.perf_counter()
        try:
            return scheduler.schedule(request, view.pods)
        finally:
            m = self.metrics
            m.child(m.scheduling_duration, view.name).observe(time.perf_counter() - began)

    def _decide(self, state: RequestState, raw: bytes) -> Routed:
        parsed, decision = self._route(state, raw)
        snap = self.datastore.snapshot
        view = snap.servers[decision.server_key]
        if not view.pods:
            raise no_pod_available(f"ModelServer '{view.name}' has no pods")
        request = self._scheduling_request(state, parsed, decision)
        scheduler = self.scheduler_for(view, snap.default_profile)
        try:
            result = self._schedule(view, scheduler, request)
        except NoPodAvailable as exc:
            raise no_pod_available(f"ModelServer '{view.name}': {exc.reason}") from None
        self.datastore.begin(result.primary)
        return self._routed(state, parsed, decision, view, scheduler, request, result)

    def _scheduling_request(
        self, state: RequestState, parsed: ParsedRequest, decision: RouteDecision
    ) -> SchedulingRequest:
        return SchedulingRequest(
            request_id=state.request_id,
            model=parsed.model,
            lora=decision.lora,
            prompt=parsed.prompt,
            estimated_input_tokens=estimate_tokens(parsed.prompt),
            session_key=state.headers.get(self.session_header),
            headers=state.headers,
        )

    def _routed(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        decision: RouteDecision,
        view: ServerView,
        scheduler: SchedulerLike,
        request: SchedulingRequest,
        result: SchedulingResult,
    ) -> Routed:
        """Book a scheduled request (the caller already did ``datastore.begin(primary)``)."""
        pod = result.primary
        state.pod_name = pod.name
        state.scheduling_request = request
        state.result = result
        state.scheduler = scheduler
        state.code = 200
        self.metrics.in_flight.inc()
        m = self.metrics
        m.child(m.pod_picks, view.name, pod.name).inc()
        m.child(m.requests, parsed.model, decision.route, view.name, "200").inc()
        body: bytes | None = None
        if decision.rewritten:
            parsed.body["model"] = decision.upstream_model
            body = orjson.dumps(parsed.body)
        return Routed(
            endpoints=result.endpoints(),
            pod=pod,
            body=body,
            headers=self._route_headers(view, len(result.fallbacks)),
        )

    async def _decide_with_policies(
        self, state: RequestState, raw: bytes, policies: Policies
    ) -> Routed | Immediate:
        """The data path plus authentication, authorisation, budgets, the fair queue and usage
        marking (``extproc.policies``)."""
        began = time.perf_counter()
        waited = 0.0
        try:
            parsed, decision = self._route(state, raw)
            snap = self.datastore.snapshot
            policy = policies.route_policy(snap, parsed.model)
            estimate = estimate_tokens(parsed.prompt)
            count = None
            if policies.estimator is not None:  # the engine's /tokenize, asked by admit()
                count = functools.partial(
                    policies.estimator.estimate,
                    snap.servers[decision.server_key].pods,
                    parsed.kind,
                    parsed.body,
                    decision.upstream_model,
                    estimate,
                    parsed.model,
                )
            state.charge = await policies.admit(
                state.identity,
                policy,
                estimate,
                parsed.kind,
                parsed.model,
                count=count,
                max_tokens=parsed.max_tokens,
            )
            view = snap.servers[decision.server_key]
            request = self._scheduling_request(state, parsed, decision)
            scheduler = self.scheduler_for(view, snap.default_profile)
            try:
                if policies.waiting(view.key):
                    # others already wait for this server: a newcomer takes its place in the
                    # fair queue (priority, fair share) instead of overtaking them on a free slot
                    raise AllPodsSaturated("requests are already waiting in the fair queue")
                result = self._schedule(view, scheduler, request)
                self.datastore.begin(result.primary)
            except AllPodsSaturated:
                key = view.key

                def attempt() -> tuple[ServerView, SchedulingResult]:
                    current = self.datastore.snapshot.servers.get(key, view)
                    found = self._schedule(current, scheduler, request)
                    self.datastore.begin(found.primary)
                    return current, found

                def undo(held: tuple[ServerView, SchedulingResult]) -> None:
                    self.datastore.finish(held[1].primary.name)

                identity = state.identity
                tenant = identity.tenant if identity is not None else "anonymous"
                priority = policies.priority_of(policy, state.headers, tenant)
                mark = time.perf_counter()
                view, result = await policies.wait_for_pod(
                    key, parsed.model, policy, state.charge, priority, attempt, undo
                )
                waited = time.perf_counter() - mark
            except NoPodAvailable as exc:
                raise no_pod_available(f"ModelServer '{view.name}': {exc.reason}") from None
            routed = self._routed(state, parsed, decision, view, scheduler, request, result)
            charge = state.charge
            routed.metadata = policies.metadata(charge)  # rid + charge (any replica settles)
            if parsed.stream and parsed.kind != "embeddings":
                from extproc.policies.usage import force_usage

                if force_usage(parsed.body):  # Envoy's usage.lua hides the forced usage event
                    routed.metadata["matrixinfer_strip"] = True
                    routed.body = orjson.dumps(parsed.body)
            policies.expect(charge)
            if "authorization" in state.headers:
                routed.headers["authorization"] = ""  # credentials never reach the engine
            return routed
        except GatewayError as exc:
            policies.release(state.charge)
            state.charge = None
            return self._answer(state, _error(exc))
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the client went away while waiting
                policies.release(state.charge)
                state.charge = None
                raise
            log.exception("request %s: the gateway failed to decide", state.request_id)
            policies.release(state.charge)
            state.charge = None
            self._release(state)
            return self._answer(state, _error(internal_error(state.request_id)))
        finally:
            self.metrics.decision_duration.observe(time.perf_counter() - began - waited)

    @staticmethod
    def _route_headers(view: ServerView, fallbacks: int) -> dict[str, str]:
        headers = {"x-gateway-model-server": view.name}
        for name, value in view.retry_headers:
            if name == "x-envoy-max-retries":
                value = str(min(int(value), fallbacks))
            headers[name] = value
        if "x-envoy-retriable-status-codes" not in headers:
            headers["x-envoy-retriable-status-codes"] = ""
        return headers

    def _answer(self, state: RequestState, immediate: Immediate) -> Immediate:
        state.code = immediate.status
        # the model label only carries names a route serves (callers cannot grow the series)
        model = state.model if state.route else ""
        m = self.metrics
        m.child(m.requests, model, state.route, state.server, str(immediate.status)).inc()
        if immediate.status >= 400:
            log.info(
                "request %s answered %d by the gateway: %s",
                state.request_id,
                immediate.status,
                immediate.body.decode(errors="replace"),
            )
        return immediate

    def _release(self, state: RequestState) -> None:
        """Undo the in-flight count of a request that will not be routed after all."""
        if state.pod_name is not None:
            self.datastore.finish(state.pod_name)
            self.metrics.in_flight.dec()
            state.pod_name = None

    def routed(self, state: RequestState) -> None:
        if state.scheduler is not None and state.scheduling_request and state.result:
            try:
                state.scheduler.on_routed(state.scheduling_request, state.result)
            except Exception:  # a plugin bug must not break the request path
                log.exception("scheduler on_routed failed for request %s", state.request_id)

    def finish(self, state: RequestState) -> None:
        if self.policies is not None:
            self._finish_policies(state, self.policies)
        if state.pod_name is None:
            return
        self.datastore.finish(state.pod_name)
        self.metrics.in_flight.dec()
        m = self.metrics
        m.child(m.request_duration, state.model, state.server).observe(self.clock() - state.started)
        if state.scheduler is not None:
            try:
                state.scheduler.on_finished(state.request_id, state.pod_name)
            except Exception:
                log.exception("scheduler on_finished failed for request %s", state.request_id)
        state.pod_name = None

    def _finish_policies(self, state: RequestState, policies: Policies) -> None:
        if state.charge is not None:
            policies.finished(state.charge.rid)
        if state.pod_name is not None and policies.waiting(state.server_key):
            # this request's pod frees up: let the fair queue try (after the in-flight drop;
            # nobody waiting: nothing to try — a newcomer sees the dropped count itself)
            try:
                import asyncio

                asyncio.get_running_loop().call_soon(policies.capacity_freed, state.server_key)
            except RuntimeError:
                pass
