"""The gateway's decisions for one request, as one pipeline of stages. Pure of gRPC.

A request passes these stages, in order:

1. **parse** the request line (``start``): ``GET /v1/models`` is answered here, an unknown path
   or an announced oversize body is rejected;
2. **authenticate** the caller from the headers (``start``: a bad credential is answered before
   the body is read);
3. **parse** the body (``decide``): the OpenAI JSON, its ``model``, prompt and ``stream``;
4. **route**: the ModelRoute and ModelServer for the model (``extproc.routing``);
5. **admit**: authorise the caller on the route and reserve its token budget;
6. **wake**: when the ModelServer has no ready pod (at zero, or its pods are starting), wait in
   the :class:`WakeRoom` until it has one — at most the route's ``queue.maxWait`` (the gateway's
   ``wake_timeout`` when the route sets no queue), then 503 with ``Retry-After``. Policies or not;
   the waiting requests count as the ModelServer's demand (``extproc.demand``), which is what
   wakes a target of the autoscaler at zero;
7. **queue**: when others already wait for the ModelServer, or every pod is saturated, wait until
   a pod has room: in the fair queue with policies, else in the ModelServer's line for room
   (:class:`WakeRoom`, first come first served) — at most the route's ``queue.maxWait``
   (``wake_timeout`` when the route sets no queue), then 503 with ``Retry-After``;
8. **schedule**: the scheduler picks the pod and its fallbacks; the pod's in-flight count rises;
9. **mark** the routed request for Envoy's usage filters (:func:`mark_usage`: a stream asks for
   its final usage event), whose findings come back in the access log (:meth:`Gateway.answered`:
   the metrics).

Authenticate, admit, queue and the settling of a routed request's token charge are the policy
stages (``extproc.policies``): without policies they are :class:`NoPolicies`, whose methods return
at once (no credential is looked at, nothing is reserved or settled, a saturated ModelServer's
requests wait in its line for room instead of the fair queue). Any stage may fail:
:meth:`Gateway._failed` turns a :class:`GatewayError` into its answer and any other exception into
a logged 500, and gives back what the request took (budget reservation, in-flight count) — in
one place.

The ext_proc servicer (``extproc.transport.grpc_servicer``) calls, per request stream:

1. :meth:`Gateway.start` with the request headers — ``(state, None)`` to go on, or an
   :class:`Immediate` answer;
2. ``await`` :meth:`Gateway.decide` with the whole body — :class:`Routed` (endpoints, best first,
   and the body to forward when it changed) or :class:`Immediate` (an OpenAI-style error);
3. :meth:`Gateway.routed` once the answer went out (credits the scheduler's prefix/session state);
4. :meth:`Gateway.finish` when the stream ends (the request is over: in-flight count drops).

With tracing on (``Gateway.tracing``, :mod:`extproc.tracing`) each stage is an OpenTelemetry span,
a child of the request's trace context (``start``'s ``metadata``: the ext_proc stream's gRPC
metadata): ``trace.enter(stage)`` ends the previous stage's span and starts the next, and the
request's answer (or ``_failed``) ends the last. Off, ``state.trace`` is None and each stage costs
one ``is not None`` test (a context manager per stage measured ~1 µs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from crds.common import parse_duration
from extproc.datastore import Datastore, ServerView, Snapshot
from extproc.errors import (
    GRPC_CODES,
    GatewayError,
    bad_request,
    body_too_large,
    internal_error,
    model_not_found,
    no_pod_available,
)
from extproc.metrics import GatewayMetrics
from extproc.parsing import (
    DEFAULT_BODY_LIMIT,
    USAGE_STREAM_KINDS,
    Endpoint,
    classify,
    estimate_tokens,
    grpc_frames,
    parse_body,
    parse_oip,
)
from extproc.policies.queue import QueueEntry
from extproc.policies.usage import force_usage
from extproc.room import QUEUE_TIMEOUT_MARGIN, RoomWaits, Waiter, queue_notice
from extproc.scheduling.types import (
    AllPodsSaturated,
    NoPodAvailable,
    SchedulingRequest,
    SchedulingResult,
)
from fleet.config import object_key
from fleet.pd import PREFILL_HEADER, format_prefill
from fleet.pods import Pod, grpc_address
from fleet.usage_envoy import (
    LORA_HEADER,
    MODEL_HEADER,
    RESPONSES_KEY,
    ROUTE_HEADER,
    SERVER_HEADER,
    STRIP_KEY,
    Answered,
)

if TYPE_CHECKING:
    from extproc.parsing import ParsedRequest
    from extproc.policies.enforce import Policies, PolicyError
    from extproc.routing import RouteDecision
    from extproc.tracing import Tracing

__all__ = [
    "DEFAULT_WAKE_TIMEOUT",
    "DESTINATION_HEADER",
    "REQUEST_ID_HEADER",
    "ROOM_RETRY",
    "SESSION_HEADER",
    "EnforcedPolicies",
    "Gateway",
    "Immediate",
    "NoPolicies",
    "RequestState",
    "Routed",
    "SchedulerLike",
    "WakeRoom",
]

log = logging.getLogger("matrixinfer.extproc")

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SESSION_HEADER = "x-session-id"


def _user_session(body: dict[str, Any]) -> str | None:
    """The session of a request without a session header: the OpenAI ``user`` field."""
    user = body.get("user")
    return f"user:{user}" if isinstance(user, str) and user else None


# how long a request waits in the gateway, without a fair queue, for a ModelServer with no ready
# pod or with every pod saturated, when its route sets no queue (ModelRoute queue.maxWait
# otherwise; matrixinfer-extproc --wake-timeout)
DEFAULT_WAKE_TIMEOUT = 60.0
# while requests wait for room (every pod saturated, no fair queue), their lines are served at
# least this often: a scrape may have freed room without any request finishing (the fair queue's
# dispatch interval is the same)
ROOM_RETRY = 0.05
REQUEST_ID_HEADER = "x-request-id"  # Envoy keeps the client's or makes one (HCM settings)
_KEPT = 4096  # entries of the gateway's small caches (cleared when full)


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
    # an answer to a gRPC caller: its gRPC status code (``body`` is then the grpc-message text);
    # Envoy sends it as a trailers-only gRPC response (HTTP 200, grpc-status, grpc-message)
    grpc_status: int | None = None


_GRPC_KINDS = frozenset(("oip", "oip_server"))


def _grpc_answer(immediate: Immediate) -> Immediate:
    """An error answer as a gRPC caller gets it: the gRPC code of its HTTP status
    (``extproc.errors.GRPC_CODES``) and its message as the grpc-message."""
    message = immediate.body.decode(errors="replace")
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        message = orjson.loads(immediate.body)["error"]["message"]
    return Immediate(
        immediate.status,
        message.encode(),
        content_type="application/grpc",
        headers=immediate.headers,
        grpc_status=GRPC_CODES.get(immediate.status, 2),
    )


@dataclass(slots=True)
class Routed:
    endpoints: list[str]  # primary first, then fallbacks ("ip:port")
    pod: Pod
    body: bytes | None  # the body to forward when it changed (model rewrite), else None
    headers: dict[str, str] = field(default_factory=dict)  # headers to set towards the pod
    # dynamic metadata namespace "envoy.lb" beyond the endpoints and the usage mark (the
    # transport adds those): per-request flags for usage.lua, the policies' id and charge
    metadata: dict[str, Any] | None = None


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
    policy: Any = None  # extproc.policies.enforce.RoutePolicy of the route (policies)
    # the proxy's subset hint (endpoint-picker protocol): pick only these "ip:port"; None: any
    subset: frozenset[str] | None = None
    trace: Any = None  # extproc.tracing.RequestTrace when tracing is on


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "matrixinfer"}


def _error(exc: GatewayError) -> Immediate:
    headers = getattr(exc, "headers", None)
    return Immediate(exc.status, exc.body(), headers=dict(headers) if headers else {})


# ---- the policy stages ------------------------------------------------------------------------
Attempt = Callable[[], tuple[ServerView, SchedulingResult]]


def mark_usage(parsed: ParsedRequest, routed: Routed) -> None:
    """Prepare a routed request's answer for Envoy's usage filters (policies or not).

    Every routed reply carries the mark the filters match (``envoy.lb``/``matrixinfer_usage``,
    set by the transport with the endpoints): Envoy reads the answer's usage and, for a stream,
    the time of its first token; the access log brings both back (:meth:`Gateway.answered`).
    Here only streams change: a chat or completions stream asks the engine for its final usage
    event (:func:`force_usage`; Envoy's usage.lua hides it from a client that had not asked for
    it: ``matrixinfer_strip``); a Responses API stream is flagged so that usage.lua takes its
    first delta event, not ``response.created``, as the first token."""
    if not parsed.stream:
        return
    if parsed.kind in USAGE_STREAM_KINDS:
        if force_usage(parsed.body):
            routed.metadata = {STRIP_KEY: True}
            routed.body = orjson.dumps(parsed.body)
    elif parsed.kind == "responses":
        routed.metadata = {RESPONSES_KEY: True}


def _pod_headers(
    view: ServerView, fallbacks: int, model: str, decision: RouteDecision
) -> dict[str, str]:
    """The headers a routed request carries towards its pod."""
    headers = {SERVER_HEADER: view.name, MODEL_HEADER: model, ROUTE_HEADER: decision.route}
    # always set: a client-sent copy is overwritten (empty = removed)
    headers[LORA_HEADER] = decision.lora or ""
    for name, value in view.retry_headers:
        if name == "x-envoy-max-retries":
            value = str(min(int(value), fallbacks))
        headers[name] = value
    if "x-envoy-retriable-status-codes" not in headers:
        headers["x-envoy-retriable-status-codes"] = ""
    return headers


class NoPolicies:
    """The policy stages when no policies are configured: each returns at once.

    :class:`EnforcedPolicies` has the same methods; the gateway calls them at their place in the
    pipeline either way, so the pipeline has one shape."""

    __slots__ = ()

    def authenticate(self, state: RequestState) -> None:
        """The authenticate stage: set ``state.identity`` from the credentials in the headers."""

    async def admit(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        decision: RouteDecision,
        snapshot: Snapshot,
    ) -> None:
        """The admit stage: authorise the caller on the route, reserve its token budget
        (``state.charge``)."""

    def waiting(self, server_key: str) -> bool:
        """Whether requests wait for this ModelServer (a newcomer then queues behind them)."""
        return False

    async def queue(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        view: ServerView,
        saturated: AllPodsSaturated,
        attempt: Attempt,
        undo: Callable[[tuple[ServerView, SchedulingResult]], None],
    ) -> tuple[ServerView, SchedulingResult]:
        """The queue stage, entered when every pod is ``saturated`` (or others wait): wait until
        ``attempt()`` (the schedule stage) finds a pod; ``undo`` what it took for a request that
        gave up just as it was dispatched. Without a fair queue: ``saturated`` is raised again
        (the gateway then waits for room itself, ``Gateway._wait_for_room``)."""
        raise saturated

    def mark(self, state: RequestState, parsed: ParsedRequest, routed: Routed) -> None:
        """Mark a routed request for usage accounting (the id its report settles, and its
        charge); strip the caller's credentials."""

    def release(self, state: RequestState) -> None:
        """Give back the budget reserved by ``admit`` of a request that is not routed after all."""

    def finish(self, state: RequestState) -> None:
        """The request ended: its usage report is due; its freed pod may serve the queue."""


NO_POLICIES = NoPolicies()


class EnforcedPolicies(NoPolicies):
    """The policy stages over :class:`extproc.policies.enforce.Policies` (auth, token budgets,
    the fair queue, usage marking)."""

    __slots__ = ("policies",)

    def __init__(self, policies: Policies) -> None:
        self.policies = policies

    def authenticate(self, state: RequestState) -> None:
        state.identity = self.policies.authenticate(state.headers)

    async def admit(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        decision: RouteDecision,
        snapshot: Snapshot,
    ) -> None:
        policies = self.policies
        policy = policies.route_policy(snapshot, parsed.model)
        state.policy = policy
        estimate = estimate_tokens(parsed.prompt)
        count = None
        if policies.estimator is not None:  # the engine's /tokenize, asked by admit()
            count = functools.partial(
                policies.estimator.estimate,
                snapshot.servers[decision.server_key].pods,
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

    def waiting(self, server_key: str) -> bool:
        return self.policies.waits.waiting(server_key)

    async def queue(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        view: ServerView,
        saturated: AllPodsSaturated,
        attempt: Attempt,
        undo: Callable[[tuple[ServerView, SchedulingResult]], None],
    ) -> tuple[ServerView, SchedulingResult]:
        policies = self.policies
        identity = state.identity
        tenant = identity.tenant if identity is not None else "anonymous"
        priority = policies.priority_of(state.policy, state.headers, tenant)
        result: tuple[ServerView, SchedulingResult] = await policies.wait_for_pod(
            view.key, parsed.model, state.policy, state.charge, priority, attempt, undo
        )
        return result

    def mark(self, state: RequestState, parsed: ParsedRequest, routed: Routed) -> None:
        policies = self.policies
        charge = state.charge
        metadata = policies.metadata(charge)  # rid + charge (any replica settles)
        if routed.metadata is not None:  # the gateway's own marks (mark_usage)
            metadata.update(routed.metadata)
        routed.metadata = metadata
        policies.expect(charge)
        if "authorization" in state.headers:
            routed.headers["authorization"] = ""  # credentials never reach the engine

    def release(self, state: RequestState) -> None:
        self.policies.release(state.charge)
        state.charge = None

    def finish(self, state: RequestState) -> None:
        policies = self.policies
        if state.charge is not None:
            policies.finished(state.charge.rid)
        if state.pod_name is not None:  # its pod frees up: the fair queue may go on
            policies.waits.freed(state.server_key)


class WakeRoom(RoomWaits):
    """Requests waiting in the gateway for a pod of a ModelServer, by server key, without a fair
    queue to wait in:

    - **for a ready pod** (the wake stage: the ModelServer has none, at zero or starting):
      :meth:`wait_ready`; :meth:`server_ready` (the datastore's ``on_server_ready``) wakes every
      one, in arrival order; each then checks the datastore again and goes on to the schedule
      stage;
    - **for room** (every pod saturated): the ModelServer's line, first come first served
      (:class:`extproc.room.RoomWaits` with every entry of one user and priority), served when
      a request of that server finishes and every ``retry`` seconds while anything waits.

    :meth:`counts` (the ModelServer's waiting demand) and :meth:`state` (``/debug/state``) show
    both."""

    __slots__ = ("_waiters",)

    def __init__(self, clock: Callable[[], float] = time.monotonic, retry: float = ROOM_RETRY):
        super().__init__(retry, clock)
        # server key -> the futures of the requests waiting for a ready pod, in arrival order
        self._waiters: dict[str, dict[asyncio.Future[None], None]] = {}

    def counts(self) -> dict[str, int]:
        """Server key -> how many requests wait for it (only keys with waiting requests)."""
        counts = {key: len(waiters) for key, waiters in self._waiters.items()}
        for key, line in self.queues.items():
            counts[key] = counts.get(key, 0) + len(line)
        return counts

    def state(self) -> dict[str, Any]:
        """What waits, for ``/debug/state``: per server key, the requests waiting for a ready pod
        (a count) and the line for room (request ids and seconds waited, first first)."""
        now = self.clock()
        out: dict[str, Any] = {}
        for key in sorted(self._waiters.keys() | self.queues.keys()):
            line = self.queues.get(key)
            out[key] = {
                "forReadyPod": len(self._waiters.get(key, ())),
                "forRoom": [
                    {"requestId": e.payload.request_id, "waitedSeconds": round(now - e.enqueued, 3)}
                    for e in (line.entries() if line is not None else ())
                ],
            }
        return out

    def server_ready(self, key: str) -> None:
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result(None)

    async def wait_ready(self, key: str, seconds: float) -> bool:
        """Wait until :meth:`server_ready` names ``key`` (True) or ``seconds`` pass (False)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(key, {})
        waiters[future] = None
        try:
            await asyncio.wait_for(future, seconds)
            return True
        except TimeoutError:
            return False
        finally:
            waiters.pop(future, None)
            if not waiters:
                del self._waiters[key]


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
        policies: Policies | None = None,
        wake_timeout: float = DEFAULT_WAKE_TIMEOUT,
        tracing: Tracing | None = None,
    ) -> None:
        if wake_timeout < 0:
            raise ValueError(f"wake_timeout must be >= 0 seconds, not {wake_timeout}")
        self.datastore = datastore
        self.metrics = metrics or GatewayMetrics()
        self.body_limit = body_limit
        self.scheduler_factory = scheduler_factory
        self.rng = rng or Random()
        self.clock = clock
        self.session_header = session_header
        self.tracing = tracing  # extproc.tracing: spans of the stages, or None (off)
        self._schedulers: dict[str, tuple[Any, SchedulerLike]] = {}
        datastore.on_pod_removed.append(self._forget_pod)
        # requests waiting without a fair queue: for a ModelServer with no ready pod (the wake
        # stage: scale from zero) or for room on its saturated pods (``_wait_for_room``)
        self.wake_timeout = wake_timeout
        self.waking = WakeRoom(clock)
        datastore.on_server_ready.append(self.waking.server_ready)
        self._max_waits: tuple[int, dict[str, float | None]] = (-1, {})
        self.policy_stages: NoPolicies = NO_POLICIES
        self.policies = policies
        # called with the pod's name when its engine answered 404 to a request for a LoRA
        # adapter (the pod's adapters are not what the gateway last read)
        self.on_lora_missing: list[Callable[[str], None]] = []
        # the request lines seen, classified ((method, path) -> Endpoint; bounded, cleared when
        # full: a path may carry any query string)
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        # the headers towards the pod by (ModelServer view, fallbacks, model, route decision):
        # (view, decision, headers), checked by identity (see _route_headers)
        self._route_headers_kept: dict[
            tuple[int, int, str, int], tuple[ServerView, RouteDecision, dict[str, str]]
        ] = {}
        # (snapshot, its ModelServer names, pod name by address): what _labels checks against
        self._known: tuple[Snapshot | None, frozenset[str], dict[str, str]] = (
            None,
            frozenset(),
            {},
        )

    @property
    def policies(self) -> Policies | None:
        """``extproc.policies`` (auth, token budgets, the fair queue, usage), or None."""
        return self._policies

    @policies.setter
    def policies(self, policies: Policies | None) -> None:
        self._policies = policies
        self.policy_stages = NO_POLICIES if policies is None else EnforcedPolicies(policies)

    # ---- schedulers ---------------------------------------------------------------------------
    def scheduler_for(self, view: ServerView, default_profile: Any) -> SchedulerLike:
        pd_group = view.spec.workload_selector.pd_group
        profile: Any = view.profile if view.profile is not None else default_profile
        if pd_group is not None:  # prefill/decode pairs (extproc.scheduling.pd)
            profile = (pd_group, view.profile, view.spec.prefill_scheduler)
        held = self._schedulers.get(view.key)
        if held is not None and (held[0] is profile or held[0] == profile):
            return held[1]
        if pd_group is not None:
            from extproc.scheduling.pd import DECODE_PROFILE, PREFILL_PROFILE, PDScheduler

            scheduler: SchedulerLike = PDScheduler(
                pd_group,
                self.scheduler_factory(view.profile or DECODE_PROFILE),  # type: ignore[arg-type]
                self.scheduler_factory(view.spec.prefill_scheduler or PREFILL_PROFILE),  # type: ignore[arg-type]
            )
        else:
            scheduler = self.scheduler_factory(profile)
        self._schedulers[view.key] = (profile, scheduler)
        return scheduler

    def _forget_pod(self, pod_name: str) -> None:
        for _, scheduler in self._schedulers.values():
            scheduler.forget_pod(pod_name)

    # ---- the pipeline -------------------------------------------------------------------------
    def start(
        self,
        headers: Mapping[str, str],
        end_of_stream: bool,
        subset: frozenset[str] | None = None,
        metadata: Iterable[tuple[str, Any]] = (),
    ) -> tuple[RequestState, Immediate | None]:
        """The headers' stages: parse the request line, authenticate. ``(state, None)``: go on
        with :meth:`decide`; else the answer. ``subset``: the proxy's subset hint, the only pod
        addresses the request may go to (the endpoint-picker protocol's
        ``x-gateway-destination-endpoint-subset``). ``metadata``: the ext_proc stream's gRPC
        metadata (read for the trace context when tracing is on)."""
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        state = RequestState(request_id, self.clock(), dict(headers), subset=subset)
        trace = None
        if self.tracing is not None:
            trace = state.trace = self.tracing.request(state, metadata)
        try:
            endpoint = self._classify(headers.get(":method", "GET"), headers.get(":path", "/"))
            state.endpoint = endpoint
            if endpoint.kind == "models":
                return state, self._answer(state, Immediate(200, self.models_body()))
            if endpoint.kind == "model":
                return state, self._answer(state, Immediate(200, self.model_body(endpoint.model)))
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.body_limit:
                raise body_too_large(int(length), self.body_limit)
            if end_of_stream:
                raise bad_request(
                    "the gRPC request body is empty: it carries no message"
                    if endpoint.kind in _GRPC_KINDS
                    else "the request body is empty; send a JSON object with a 'model' field"
                )
            if trace is not None:
                trace.enter("authenticate")
            self.policy_stages.authenticate(state)
        except Exception as exc:
            return state, self._failed(state, exc)
        if trace is not None:
            trace.close()
        return state, None

    def _classify(self, method: str, path: str) -> Endpoint:
        """:func:`classify`, kept for the request lines seen (a bad one raises each time)."""
        key = (method, path)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = classify(method, path)
            if len(self._endpoints) >= _KEPT:
                self._endpoints.clear()
            self._endpoints[key] = endpoint
        return endpoint

    def too_large(self, state: RequestState, size: int) -> Immediate:
        return self._answer(state, _error(body_too_large(size, self.body_limit)))

    def models_body(self) -> bytes:
        """``GET /v1/models``: every model name a caller may ask for and a ready pod serves."""
        data = [_model_object(name) for name in self.datastore.snapshot.routes.model_names()]
        return orjson.dumps({"object": "list", "data": data})

    def model_body(self, model: str) -> bytes:
        """``GET /v1/models/{model}``: the model's object, when ``GET /v1/models`` lists it."""
        if model not in self.datastore.snapshot.routes.model_names():
            raise model_not_found(model)
        return orjson.dumps(_model_object(model))

    async def decide(self, state: RequestState, raw: bytes) -> Routed | Immediate:
        """The body's stages: parse, route, admit, queue, schedule. :class:`Routed`, or the
        :class:`Immediate` answer of the stage that refused (or failed)."""
        began = time.perf_counter()
        stages = self.policy_stages
        trace = state.trace  # extproc.tracing.RequestTrace, or None: tracing is off
        try:
            if trace is not None:
                trace.enter("parse")
            if state.endpoint is not None and state.endpoint.kind == "oip_server":
                return self._any_grpc_pod(state, raw)
            parsed = self._parse(state, raw)
            snap = self.datastore.snapshot
            if trace is not None:
                trace.enter("route")
            decision = self._route(state, parsed, snap)
            if trace is not None:
                trace.enter("admit")
            await stages.admit(state, parsed, decision, snap)
            view = snap.servers[decision.server_key]
            woken = False  # the request waited for a first pod (Envoy was told to wait)
            if not view.ready:
                mark = time.perf_counter()
                if trace is not None:
                    trace.enter("wake")
                view = await self._wake(state, parsed, view, snap)
                woken = True
                began += time.perf_counter() - mark  # the wait is not the gateway's decision time
            request = self._scheduling_request(state, parsed, decision)
            scheduler = self.scheduler_for(view, snap.default_profile)
            if parsed.kind == "oip":  # only the pods that serve gRPC
                state.subset = self._grpc_subset(view, state.subset)
            try:
                if stages.waiting(view.key) or self.waking.waiting(view.key):
                    # others already wait for room on this server (in its fair queue, or its
                    # line without one): a newcomer joins them instead of taking a free slot
                    # they wait for
                    raise AllPodsSaturated("requests are already waiting for room")
                if trace is not None:
                    trace.enter("schedule")
                result = self._schedule(view, scheduler, request, state.subset)
            except AllPodsSaturated as saturated:
                mark = time.perf_counter()
                if trace is not None:  # the wait, then the schedule stage that ended it
                    trace.enter("queue")
                attempt = functools.partial(self._attempt, view, scheduler, request, state.subset)
                try:
                    view, result = await stages.queue(
                        state, parsed, view, saturated, attempt, self._undo
                    )
                except AllPodsSaturated as unqueued:  # no fair queue: wait for room here
                    view, result = await self._wait_for_room(
                        state, parsed, view, snap, attempt, unqueued, notified=woken
                    )
                began += time.perf_counter() - mark  # the wait is not the gateway's decision time
            routed = self._book(state, parsed, decision, view, scheduler, request, result)
            if parsed.kind == "oip":
                routed.endpoints = self._grpc_endpoints(view, routed.endpoints)
            mark_usage(parsed, routed)
            stages.mark(state, parsed, routed)
            if trace is not None:
                trace.close()
            return routed
        except Exception as exc:
            return self._failed(state, exc)
        except BaseException as exc:  # cancelled: the client went away (while waiting)
            self._release(state)
            if trace is not None:
                trace.close(exc)
            raise
        finally:
            self.metrics.decision_duration.observe(time.perf_counter() - began)

    # ---- gRPC calls (the Open Inference Protocol) ---------------------------------------------
    @staticmethod
    def _grpc_port(view: ServerView) -> int:
        """The ModelServer's ``workloadPort.grpcPort``: gRPC calls go to its pods there."""
        port = view.spec.workload_port.grpc_port
        if port is None:
            raise no_pod_available(
                f"ModelServer '{view.name}' serves no gRPC (it sets no workloadPort.grpcPort)"
            )
        return port

    @classmethod
    def _grpc_subset(cls, view: ServerView, subset: frozenset[str] | None) -> frozenset[str]:
        """The addresses of the ModelServer's pods that serve gRPC (within the proxy's subset)."""
        cls._grpc_port(view)
        serving = frozenset(p.address for p in view.pods)
        return serving if subset is None else serving & subset

    @classmethod
    def _grpc_endpoints(cls, view: ServerView, endpoints: list[str]) -> list[str]:
        """The scheduled pods' gRPC addresses (their host, the ModelServer's gRPC port)."""
        port = cls._grpc_port(view)
        return [a for a in (grpc_address(address, port) for address in endpoints) if a]

    def _any_grpc_pod(self, state: RequestState, raw: bytes) -> Routed:
        """ServerLive, ServerReady, ServerMetadata: about the server, not a model; any ready pod
        that serves gRPC answers (the one with the fewest requests in flight). None: 503
        (UNAVAILABLE), which is what a gRPC health check of the gateway should see."""
        grpc_frames(raw)  # a well-framed body, or INVALID_ARGUMENT
        best: tuple[int, str, Pod, str] | None = None
        for pod in self.datastore.snapshot.pods.values():
            grpc = pod.grpc
            if grpc is None or not pod.ready:
                continue
            if state.subset is not None and pod.address not in state.subset:
                continue
            key = (pod.in_flight, pod.name, pod, grpc)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            raise no_pod_available(
                "no ready pod serves gRPC (no ModelServer with a workloadPort.grpcPort has one)"
            )
        state.code = 200
        if state.trace is not None:
            state.trace.close()
        return Routed(endpoints=[best[3]], pod=best[2], body=None)

    # ---- the stages (the policy stages are ``self.policy_stages``) ----------------------------
    def _parse(self, state: RequestState, raw: bytes) -> ParsedRequest:
        assert state.endpoint is not None
        if state.endpoint.kind == "oip":
            parsed = parse_oip(state.endpoint.path, raw, self.body_limit)
            state.model = parsed.model
            return parsed
        content_type = state.headers.get("content-type", "")
        parsed = parse_body(state.endpoint.kind, raw, self.body_limit, content_type)
        state.model = parsed.model
        return parsed

    def _route(self, state: RequestState, parsed: ParsedRequest, snap: Snapshot) -> RouteDecision:
        assert state.endpoint is not None
        decision = snap.routes.decide(parsed.model, state.headers, state.endpoint.path, self.rng)
        state.route = decision.route
        state.server = decision.server
        state.server_key = decision.server_key
        return decision

    async def _wake(
        self, state: RequestState, parsed: ParsedRequest, view: ServerView, snap: Snapshot
    ) -> ServerView:
        """The wake stage: wait until the ModelServer has a ready pod (its view then), at most
        the route's ``queue.maxWait``; 503 with ``Retry-After`` after that. A wait of 0 leaves
        the 503 to the schedule stage at once."""
        max_wait = self._max_wait(snap, parsed.model)
        if max_wait <= 0:
            return view
        notice = queue_notice.get()
        if notice is not None:  # tell Envoy to wait for this message while the request waits
            await notice(max_wait + QUEUE_TIMEOUT_MARGIN)
        log.info(
            "request %s waits up to %gs for a ready pod of ModelServer %s",
            state.request_id, max_wait, view.name,
            extra={"request_id": state.request_id, "model": parsed.model},
        )  # fmt: skip
        deadline = self.clock() + max_wait
        while True:
            current = self.datastore.snapshot.servers.get(view.key)
            if current is not None and current.ready:
                return current
            left = deadline - self.clock()
            if left <= 0 or not await self.waking.wait_ready(view.key, left):
                break
        raise _waited_too_long(
            f"ModelServer '{view.name}' had no ready pod within {max_wait:g}s (it may be "
            f"starting from zero; ModelRoute '{state.route}' queue.maxWait)",
            max_wait,
        )

    async def _wait_for_room(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        view: ServerView,
        snap: Snapshot,
        attempt: Attempt,
        saturated: AllPodsSaturated,
        notified: bool,
    ) -> tuple[ServerView, SchedulingResult]:
        """Every pod of the ModelServer is saturated (or others already wait for room on it) and
        there is no fair queue to wait in: wait in the server's line (:class:`WakeRoom`, first
        come first served) until a pod has room — a request of that server finishing or the
        next ``ROOM_RETRY`` try (a scrape may have freed room) — at most until the request's
        route bound (``_max_wait``: its ``queue.maxWait`` or ``wake_timeout``, from its
        arrival); then 503 with ``Retry-After``. A bound of 0: the ``saturated`` 503 at once.
        ``notified``: Envoy was told to wait already (the wake stage)."""
        max_wait = self._max_wait(snap, parsed.model)
        if max_wait <= 0:
            raise saturated
        left = state.started + max_wait - self.clock()
        if left > 0:
            # one user and priority for all: the line is first come first served
            waiter = QueueEntry("", 0, 0, payload=Waiter(attempt, state.request_id))
            outcome = "left"  # the client went away (even if a pod was found just then)
            try:
                result: tuple[ServerView, SchedulingResult] = await self.waking.wait(
                    view.key, waiter, left, self._undo, notify=not notified
                )
                outcome = "served"
                return result
            except TimeoutError:
                outcome = "timed_out"
            except Exception:  # a scheduling failure other than saturation or no ready pod
                outcome = "failed"
                raise
            finally:
                namespace, _, name = view.key.partition("/")
                m = self.metrics
                m.child(m.room_waits, namespace, name, outcome).inc()
        raise _waited_too_long(
            f"every pod of ModelServer '{view.name}' stayed saturated for {max_wait:g}s "
            f"(ModelRoute '{state.route}': queue.maxWait, or the gateway's --wake-timeout)",
            max_wait,
        )

    def _max_wait(self, snap: Snapshot, model: str) -> float:
        """How long a request for ``model`` waits for a ready pod (and, without a fair queue,
        for room): its ModelRoute's ``queue.maxWait``, or ``wake_timeout`` when the route sets
        no queue."""
        version, by_route = self._max_waits
        if version != snap.version:
            by_route = {}
            for route in snap.config.routes:
                queue = route.spec.queue
                by_route[object_key(route)] = (
                    parse_duration(queue.max_wait) if queue is not None else None
                )
            self._max_waits = (snap.version, by_route)
        compiled, _ = snap.routes.lookup(model)
        wait = by_route.get(compiled.key)
        return self.wake_timeout if wait is None else wait

    def _schedule(
        self,
        view: ServerView,
        scheduler: SchedulerLike,
        request: SchedulingRequest,
        subset: frozenset[str] | None = None,
    ) -> SchedulingResult:
        """Pick the pod (and fallbacks), among ``subset`` when the proxy gave one, and count the
        request in flight on it."""
        if not view.pods:
            raise no_pod_available(f"ModelServer '{view.name}' has no pods")
        pods = view.pods
        if subset is not None:
            pods = tuple(p for p in pods if p.address in subset)
            if not pods:
                raise no_pod_available(
                    f"none of the {len(subset)} endpoint(s) in the proxy's subset hint "
                    f"(x-gateway-destination-endpoint-subset) is a pod of ModelServer "
                    f"'{view.name}'"
                )
        began = time.perf_counter()
        try:
            result = scheduler.schedule(request, pods)
        finally:
            m = self.metrics
            m.child(m.scheduling_duration, view.name).observe(time.perf_counter() - began)
        self.datastore.begin(result.primary)
        return result

    def _attempt(
        self,
        view: ServerView,
        scheduler: SchedulerLike,
        request: SchedulingRequest,
        subset: frozenset[str] | None = None,
    ) -> tuple[ServerView, SchedulingResult]:
        """The schedule stage for a waiting request (fair queue or line for room), on the
        server's current pods."""
        current = self.datastore.snapshot.servers.get(view.key, view)
        return current, self._schedule(current, scheduler, request, subset)

    def _undo(self, held: tuple[ServerView, SchedulingResult]) -> None:
        self.datastore.finish(held[1].primary.name)

    def _scheduling_request(
        self, state: RequestState, parsed: ParsedRequest, decision: RouteDecision
    ) -> SchedulingRequest:
        return SchedulingRequest(
            request_id=state.request_id,
            model=parsed.model,
            lora=decision.lora,
            prompt=parsed.prompt,
            estimated_input_tokens=estimate_tokens(parsed.prompt),
            session_key=state.headers.get(self.session_header) or _user_session(parsed.body),
            headers=state.headers,
        )

    def _book(
        self,
        state: RequestState,
        parsed: ParsedRequest,
        decision: RouteDecision,
        view: ServerView,
        scheduler: SchedulerLike,
        request: SchedulingRequest,
        result: SchedulingResult,
    ) -> Routed:
        """Book a scheduled request (``_schedule`` counted it on its pod) and build its answer."""
        pod = result.primary
        state.pod_name = pod.name
        self.metrics.in_flight_requests += 1
        state.scheduling_request = request
        state.result = result
        state.scheduler = scheduler
        state.code = 200
        m = self.metrics
        m.child(m.pod_picks, view.name, pod.name).inc()  # (its status counts once answered)
        body: bytes | None = None
        if decision.rewritten:
            body = parsed.with_model(decision.upstream_model)
        routed = Routed(
            endpoints=result.endpoints(),
            pod=pod,
            body=body,
            headers=self._route_headers(view, len(result.fallbacks), parsed.model, decision),
        )
        # always set: a client-sent copy never reaches a PD proxy (empty = removed)
        prefill = result.prefill
        routed.headers[PREFILL_HEADER] = format_prefill(prefill.endpoints()) if prefill else ""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s routed: model %s, ModelRoute %s, ModelServer %s, pod %s (%s)%s%s",
                state.request_id,
                parsed.model,
                decision.route,
                view.name,
                pod.name,
                ", ".join(routed.endpoints),
                f", prefill pod {prefill.primary.name} ({routed.headers[PREFILL_HEADER]})"
                if prefill
                else "",
                f", LoRA adapter {decision.lora}" if decision.lora else "",
                extra={"request_id": state.request_id, "model": parsed.model, "pod": pod.name},
            )
        return routed

    def _route_headers(
        self, view: ServerView, fallbacks: int, model: str, decision: RouteDecision
    ) -> dict[str, str]:
        """The headers towards the pod (a new dict): they depend only on the ModelServer's view,
        the number of fallbacks, the model name and the route decision, so they are kept by
        those (the view and the decision by identity: both are immutable, and a new
        configuration makes new ones)."""
        key = (id(view), fallbacks, model, id(decision))
        held = self._route_headers_kept.get(key)
        if held is not None and held[0] is view and held[1] is decision:
            return dict(held[2])
        headers = _pod_headers(view, fallbacks, model, decision)
        if len(self._route_headers_kept) >= _KEPT:
            self._route_headers_kept.clear()
        self._route_headers_kept[key] = (view, decision, headers)
        return dict(headers)

    def _answer(self, state: RequestState, immediate: Immediate) -> Immediate:
        if (
            state.endpoint is not None
            and state.endpoint.kind in _GRPC_KINDS
            and immediate.grpc_status is None
        ):
            immediate = _grpc_answer(immediate)
        state.code = immediate.status
        immediate.headers[REQUEST_ID_HEADER] = state.request_id
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
                extra={
                    "request_id": state.request_id,
                    "model": state.model,
                    "status": immediate.status,
                },
            )
        return immediate

    def _failed(self, state: RequestState, exc: Exception) -> Immediate:
        """The answer to a stage that raised: a GatewayError is its own answer; anything else is a
        bug, which costs this request a 500 (logged), never the process or the stream. Either way
        the request gives back what it took (budget reservation, in-flight count)."""
        self._release(state)
        if state.trace is not None:  # the stage that raised ends its span with the reason
            state.trace.close(exc)
        if isinstance(exc, NoPodAvailable):
            exc = no_pod_available(f"ModelServer '{state.server}': {exc.reason}")
        elif not isinstance(exc, GatewayError):
            log.exception(
                "request %s: the gateway failed to decide",
                state.request_id,
                extra={"request_id": state.request_id},
            )
            exc = internal_error(state.request_id)
        return self._answer(state, _error(exc))

    def _release(self, state: RequestState) -> None:
        """Undo what a request that will not be routed after all took."""
        if state.charge is not None:
            self.policy_stages.release(state)
        if state.pod_name is not None:
            self.datastore.finish(state.pod_name)
            self.metrics.in_flight_requests -= 1
            state.pod_name = None

    # ---- after the answer (Envoy's access log) ---------------------------------------------
    def answered(self, answer: Answered) -> None:
        """A request's answer is over (Envoy's access log says so): count the status the client
        got, the time to the first byte, a stream's time to the first token and inter-token
        latency, the input and output tokens; log an engine's error answer; an
        engine's 404 to a LoRA request makes the pod's adapters be read again."""
        if answer.by_gateway:
            return  # counted and logged by _answer when the gateway made it
        model, route, server, pod = self._labels(answer)
        m = self.metrics
        m.child(m.requests, model, route, server, str(answer.status)).inc()
        if not answer.upstream:
            return
        if answer.first_byte > 0:
            m.child(m.first_byte, model).observe(answer.first_byte)
        first_token = answer.first_token
        if first_token > 0:
            m.child(m.first_token, model).observe(first_token)
        if answer.prompt_tokens is not None:
            m.child(m.input_tokens, model).inc(answer.prompt_tokens)
        tokens = answer.completion_tokens
        if tokens is not None:
            m.child(m.output_tokens, model).inc(tokens)
            if tokens > 0 and answer.duration > 0:
                m.child(m.output_token_rate, model).observe(tokens / answer.duration)
            if tokens > 1 and 0 < first_token < answer.duration:
                m.child(m.inter_token, model).observe(
                    (answer.duration - first_token) / (tokens - 1)
                )
        if answer.status >= 400:
            log.info(
                "request %s answered %d by pod %s (%s) of ModelServer %s for model %s",
                answer.request_id,
                answer.status,
                pod,
                answer.upstream,
                server,
                model,
                extra={"request_id": answer.request_id, "model": model, "pod": pod,
                       "status": answer.status},
            )  # fmt: skip
            if answer.status == 404 and answer.lora and pod:
                for callback in self.on_lora_missing:
                    callback(pod)

    def _labels(self, answer: Answered) -> tuple[str, str, str, str]:
        """``(model, route, server, pod)`` of an answer; a name the configuration does not
        know reads as "" (the headers of a request the extproc did not route are the
        client's: they must not grow the metric series)."""
        snap = self.datastore.snapshot
        held, servers, pods = self._known
        if held is not snap:
            servers = frozenset(view.name for view in snap.servers.values())
            pods = {pod.address: pod.name for pod in snap.pods.values()}
            self._known = (snap, servers, pods)
        routes = snap.routes
        found = routes.by_model.get(answer.model) or routes.by_lora.get(answer.model)
        if found is None or found.name != answer.route or answer.server not in servers:
            return "", "", "", pods.get(answer.upstream, "")
        return answer.model, answer.route, answer.server, pods.get(answer.upstream, "")

    def routed(self, state: RequestState) -> None:
        if state.scheduler is not None and state.scheduling_request and state.result:
            try:
                state.scheduler.on_routed(state.scheduling_request, state.result)
            except Exception:  # a plugin bug must not break the request path
                log.exception(
                    "scheduler on_routed failed for request %s",
                    state.request_id,
                    extra={"request_id": state.request_id},
                )

    def finish(self, state: RequestState) -> None:
        self.policy_stages.finish(state)
        if state.pod_name is None:
            return
        self.datastore.finish(state.pod_name)
        self.waking.freed(state.server_key)  # a request waiting for room may take its place
        self.metrics.in_flight_requests -= 1
        m = self.metrics
        m.child(m.request_duration, state.model, state.server).observe(self.clock() - state.started)
        if state.scheduler is not None:
            try:
                state.scheduler.on_finished(state.request_id, state.pod_name)
            except Exception:
                log.exception(
                    "scheduler on_finished failed for request %s",
                    state.request_id,
                    extra={"request_id": state.request_id},
                )
        state.pod_name = None


def _waited_too_long(reason: str, max_wait: float) -> PolicyError:
    """The 503 of a request that waited ``max_wait`` seconds for a pod in vain; it may come back
    after a quarter of that wait (at least 1 s)."""
    from extproc.policies.enforce import PolicyError

    retry = max(1, math.ceil(max_wait / 4))
    return PolicyError(no_pod_available(reason), {"retry-after": str(retry)})
