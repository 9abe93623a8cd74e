"""Exact usage accounting: what each request really cost, back to the extproc once per request.

How (the measurements are in docs/policies.md):

1. the extproc forces ``stream_options.include_usage`` on streaming requests
   (:func:`force_usage`, ``extproc.gateway.mark_usage``: every routed request, policies or not, is
   marked ``envoy.lb``/``matrixinfer_usage`` for Envoy's usage filters; the gateway's metrics read
   what they find) and, with policies, gives it an id: ``envoy.lb``/``matrixinfer_rid``;
2. Envoy reads the usage into dynamic metadata namespace ``matrixinfer`` (prompt, completion,
   events), config from :func:`envoy_http_filters`: a JSON answer under 1 MB by Envoy's
   json_to_metadata filter, anything else (streams, long or chunked answers) by the Lua filter
   ``envoy/usage.lua``, which reads the engine's final usage event (or the JSON body's last
   ``usage``) and counts SSE events on the way;
3. Envoy's gRPC access-log service (config from :func:`envoy_access_logs`: every request)
   delivers one entry per request, batched, to :class:`AccessLogServicer` in the extproc;
4. the :class:`UsageLedger` (pure) matches the entry to the request's :class:`Charge` and
   settles it: exact ``prompt_tokens``/``completion_tokens`` when the engine reported them (a
   gRPC answer: its response parameters of those names, read by usage.lua); for an aborted
   stream the estimate for the prompt and the SSE content events seen (a lower bound: one event
   carries at least one token); for a gRPC answer without them the reservations (``estimated``).

Several extproc replicas (processes, or pods behind the extproc Service): Envoy's access-log
stream goes to ONE replica, not necessarily the one that admitted the request. So the charge
itself travels with the request: ``envoy.lb``/``matrixinfer_charge`` (:func:`encode_charge`, a
short JSON array: estimate, output reservation, kind, user, model, bucket key, where, the
limits), and a replica that
gets a report for a request it does not hold rebuilds the :class:`Charge` from it
(:func:`decode_charge`) and settles it there — Redis buckets are shared, so the shared budget is
exact whichever replica settles. The admitting replica cannot tell "reported elsewhere" from
"never reported": when no report reached it within ``grace`` seconds of the request's end it
drops the charge as ``unreported`` — no bucket change (the reservations stay: the input estimate
and the output reservation are what the request is charged) and no tokens counted (another
replica may have counted them); a report that comes later still settles from the metadata.

:func:`envoy_http_filters` / :func:`envoy_access_logs` are the ONE place that describes the
Envoy-side config; ``controllers.xds.sources.with_policy_filters`` places them in the listener
(the local stack and the controllers both run Envoy on xDS).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.health import attempt_failed
from extproc.parsing import ENDPOINTS
from extproc.policies.ratelimit import UNIT_SECONDS, Limits
from fleet.usage_envoy import (
    ATTEMPTS_LOG_NAME,
    CHARGE_KEY,
    LORA_HEADER,
    METADATA_NAMESPACE,
    MODEL_HEADER,
    RID_KEY,
    RID_NAMESPACE,
    ROUTE_HEADER,
    SERVER_HEADER,
    Answered,
)

__all__ = [
    "AccessLogServicer",
    "Charge",
    "Usage",
    "UsageLedger",
    "answered",
    "decode_charge",
    "encode_charge",
    "force_usage",
]

log = logging.getLogger("matrixinfer.extproc.usage")


# first element of the encoded charge; other versions are not decoded (3: with the output
# reservation; 2: the keyed-BLAKE2b MAC; 1 was HMAC-SHA256)
CHARGE_VERSION = 3


def force_usage(body: dict[str, Any]) -> bool:
    """Ask the engine for a final usage event; True when the client had not asked for it.

    The client's own ``stream_options`` are left alone when it asked for usage. When it did not,
    ``continuous_usage_stats`` (vLLM: usage in every chunk, only with ``include_usage``) is
    turned off so that the one final usage-only event is all that changes, and Envoy's
    ``usage.lua`` removes that event (the request is marked ``matrixinfer_strip``): the client
    sees the stream it asked for.
    """
    opts = body.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        return False
    if not isinstance(opts, dict):
        opts = {}
        body["stream_options"] = opts
    opts["include_usage"] = True
    if "continuous_usage_stats" in opts:
        opts["continuous_usage_stats"] = False
    return True


@dataclass(slots=True)
class Charge:
    """What a routed request reserved, to settle once its usage is known."""

    rid: str
    estimate: int  # estimated prompt tokens reserved at admission
    kind: str  # the endpoint kind (extproc.parsing.ENDPOINTS): chat, completions, ...
    user: str  # fairness key (tenant/user)
    bucket: str | None = None  # rate-limit bucket key (None: no rate limit)
    limits: Limits | None = None
    finished_at: float | None = None
    model: str = ""
    where: str = "local"  # local | redis: where the rate-limit reservation was made
    rebuilt: bool = False  # rebuilt from a report's metadata (another replica, or a late report)
    output_reserved: int = 0  # output tokens reserved at admission (ratelimit.output_reservation)


@dataclass(slots=True, frozen=True)
class Usage:
    prompt: int
    completion: int
    exact: bool
    source: str  # reported | aborted | estimated | error | unreported


# every endpoint a charge can be for (oip: a model call of the Open Inference Protocol's gRPC
# service, extproc.parsing.OIP_MODEL_METHODS)
_KINDS = frozenset((*ENDPOINTS.values(), "oip"))
_SCOPES = frozenset(("route", "tenant", "user"))
_PERIODS = frozenset(UNIT_SECONDS.values())


CHARGE_MAC_BYTES = 16  # keyed BLAKE2b, 128-bit digest


def _mac(key: bytes, rid: str, body: bytes) -> str:
    # keyed BLAKE2b (a MAC by design, RFC 7693) from Python's own C module: under load the
    # OpenSSL HMAC-SHA256 of version 1 cost ~14-22 us a call (its algorithm lookups), this ~1 us
    digest = hashlib.blake2b(
        rid.encode() + b"\0" + body, key=key, digest_size=CHARGE_MAC_BYTES
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def encode_charge(charge: Charge, key: bytes) -> str:
    """The charge as the short string carried in ``envoy.lb``/``matrixinfer_charge``:
    ``[3, estimate, output reserved, kind, user, model, bucket, where, limits]`` in JSON,
    ``limits`` being ``[requests, input, output, period, scope, redis, [ns, secret, key]]`` or
    null, then ``~`` and a keyed BLAKE2b of the request id and that JSON under the replicas'
    shared charge ``key`` (``--charge-key-file``): a replica settles only charges a replica with
    the same key made, so whoever reaches the access-log port cannot credit a bucket or point the
    extproc at a Redis or a Secret of their choosing."""
    limits = charge.limits
    lim = (
        None
        if limits is None
        else (
            limits.requests,
            limits.input,
            limits.output,
            limits.period,
            limits.scope,
            limits.redis,
            limits.password_ref,
        )
    )
    body = orjson.dumps(
        (
            CHARGE_VERSION,
            charge.estimate,
            charge.output_reserved,
            charge.kind,
            charge.user,
            charge.model,
            charge.bucket,
            charge.where,
            lim,
        )
    )
    return f"{body.decode()}~{_mac(key, charge.rid, body)}"


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative integer or null, not {value!r}")
    return value


def _str(value: Any, what: str, allowed: frozenset[str] | None = None) -> str:
    if type(value) is not str or (allowed is not None and value not in allowed):
        choice = f" (one of {', '.join(sorted(allowed))})" if allowed is not None else ""
        raise ValueError(f"{what} must be a string{choice}, not {value!r}")
    return value


def _limits(raw: Any) -> Limits | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 7:
        raise ValueError(f"limits must be a list of 7 values or null, not {raw!r}")
    requests, inp, out, period, scope, redis, ref = raw
    if type(period) not in (int, float) or float(period) not in _PERIODS:
        raise ValueError(f"limits period must be one of {sorted(_PERIODS)} seconds, not {period!r}")
    if redis is not None:
        _str(redis, "limits redis address")
    if ref is not None and not (
        isinstance(ref, list) and len(ref) == 3 and all(type(x) is str for x in ref)
    ):
        raise ValueError(f"limits password ref must be [namespace, name, key] or null, not {ref!r}")
    return Limits(
        requests=_int_or_none(requests, "limits requests"),
        input=_int_or_none(inp, "limits input"),
        output=_int_or_none(out, "limits output"),
        period=float(period),
        scope=_str(scope, "limits scope", _SCOPES),
        redis=redis,
        password_ref=(ref[0], ref[1], ref[2]) if ref is not None else None,
    )


def decode_charge(rid: str, text: str, key: bytes) -> Charge:
    """The :class:`Charge` of :func:`encode_charge` for request ``rid``, its signature checked
    with ``key``; ValueError naming what is wrong."""
    body, sep, mac = text.rpartition("~")
    if not sep:
        raise ValueError("is not signed")
    if not hmac.compare_digest(mac, _mac(key, rid, body.encode())):
        raise ValueError(
            "has a signature this replica's charge key does not match (give every extproc "
            "replica the same --charge-key-file)"
        )
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, list) or not raw or raw[0] != CHARGE_VERSION:
        version = raw[0] if isinstance(raw, list) and raw else None
        raise ValueError(f"not a version-{CHARGE_VERSION} charge (version {version!r})")
    if len(raw) != 9:
        raise ValueError(f"a charge has 9 elements, this one {len(raw)}")
    _, estimate, reserved, kind, user, model, bucket, where, lim = raw
    estimate_ = _int_or_none(estimate, "estimate")
    reserved_ = _int_or_none(reserved, "output reserved")
    limits = _limits(lim)
    if bucket is not None:
        _str(bucket, "bucket")
    if (bucket is None) != (limits is None):
        raise ValueError("bucket and limits must both be set or both be null")
    return Charge(
        rid=rid,
        estimate=estimate_ or 0,
        kind=_str(kind, "kind", _KINDS),
        user=_str(user, "user"),
        bucket=bucket,
        limits=limits,
        model=_str(model, "model"),
        where=_str(where, "where", frozenset(("local", "redis"))),
        rebuilt=True,
        output_reserved=reserved_ or 0,
    )


# the events of a /v1/responses stream before its first delta (vLLM's and the simulator's)
RESPONSES_PREAMBLE_EVENTS = 4


def usage_from_fields(charge: Charge, fields: dict[str, Any], status: int) -> Usage:
    """The settlement of one access-log entry's ``matrixinfer`` metadata."""
    prompt = fields.get("prompt")
    completion = fields.get("completion")
    if prompt is not None:
        return Usage(int(prompt), int(completion or 0), True, "reported")
    if charge.kind == "oip":
        # a gRPC answer without the engine's counts (its parameters): the reservations stand
        return Usage(charge.estimate, charge.output_reserved, False, "estimated")
    if status >= 400 and not fields.get("events"):
        return Usage(0, 0, True, "error")  # the engine refused: nothing was computed
    events = int(fields.get("events") or 0)
    if charge.kind == "chat":
        events -= 1  # the first chunk carries the role only
    elif charge.kind == "responses":
        # no token before the first delta: response.created, response.in_progress,
        # response.output_item.added, response.content_part.added
        events -= RESPONSES_PREAMBLE_EVENTS
    return Usage(charge.estimate, max(0, events), False, "aborted")


class UsageLedger:
    """Open charges by request id; settled by a usage report (whichever replica admitted the
    request: an unknown id is settled from the charge its report carries) or, failing that,
    dropped ``grace`` seconds after the request ended (``unreported``).

    ``prefix``: this replica's request-id prefix. A report for an id with this prefix that is no
    longer open is a duplicate (ignored) unless the charge was dropped as unreported (a late
    report: settled from its metadata). ``on_ignored(reason)``: a report that settled nothing —
    ``no_charge`` (unknown id, no charge metadata), ``duplicate`` or ``invalid`` (metadata that
    does not decode)."""

    def __init__(
        self,
        settle: Callable[[Charge, Usage], None],
        *,
        grace: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "",
        on_ignored: Callable[[str], None] | None = None,
        remember: int = 100_000,
        on_batch: Callable[[int], None] | None = None,
        charge_key: bytes | None = None,
    ) -> None:
        self.settle_cb = settle
        self.on_batch = on_batch  # an access-log message arrived with this many entries
        # signs the charges this replica hands out and checks those other replicas made; without
        # a shared key (--charge-key-file) a random one: only this replica's own charges verify
        self.charge_key = charge_key if charge_key is not None else secrets.token_bytes(32)
        self.grace = grace
        self.clock = clock
        self.prefix = prefix
        self.on_ignored = on_ignored
        self.open: dict[str, Charge] = {}
        self.settled = 0
        # ids dropped as unreported, oldest first (bounded): their late reports still settle
        self.unreported: OrderedDict[str, None] = OrderedDict()
        self.remember = remember
        self._invalid_logged = False

    def expect(self, charge: Charge) -> None:
        self.open[charge.rid] = charge

    def finished(self, rid: str) -> None:
        charge = self.open.get(rid)
        if charge is not None and charge.finished_at is None:
            charge.finished_at = self.clock()

    def cancel(self, rid: str) -> Charge | None:
        return self.open.pop(rid, None)

    def report(
        self, rid: str, fields: dict[str, Any], status: int, charge_text: str | None = None
    ) -> Usage | None:
        """Settle the request ``rid`` from its access-log entry: ``fields`` of the ``matrixinfer``
        metadata, the response ``status`` and the ``matrixinfer_charge`` string (if any)."""
        charge = self.open.pop(rid, None)
        if charge is None:
            charge = self._rebuild(rid, charge_text)
            if charge is None:
                return None
        usage = usage_from_fields(charge, fields, status)
        if usage.source == "aborted":  # no usage in the answer: say what the report held
            log.info(
                "request %s (%s): status %s, no usage in the answer (report fields %s): charged "
                "the estimate and %d output tokens",
                rid, charge.kind, status, sorted(fields), usage.completion,
                extra={"request_id": rid},
            )  # fmt: skip
        self._settle(charge, usage)
        return usage

    def _rebuild(self, rid: str, charge_text: str | None) -> Charge | None:
        if self.prefix and rid.startswith(self.prefix):
            if rid not in self.unreported:  # ours, settled already: a second report
                self._ignore("duplicate")
                return None
            del self.unreported[rid]  # a late report: settled from its metadata below
        if not charge_text:
            self._ignore("no_charge")
            return None
        try:
            return decode_charge(rid, charge_text, self.charge_key)
        except ValueError as exc:
            if not self._invalid_logged:  # once: every report of an incompatible replica fails
                self._invalid_logged = True
                log.warning("usage report of request %s: its charge metadata %s", rid, exc)
            self._ignore("invalid")
            return None

    def _ignore(self, reason: str) -> None:
        if self.on_ignored is not None:
            self.on_ignored(reason)

    def sweep(self) -> int:
        """Drop charges whose request ended ``grace`` seconds ago without a report here."""
        now = self.clock()
        late = [
            c
            for c in self.open.values()
            if c.finished_at is not None and now - c.finished_at > self.grace
        ]
        for charge in late:
            del self.open[charge.rid]
            self.unreported[charge.rid] = None
            self._settle(charge, Usage(charge.estimate, 0, False, "unreported"))
        while len(self.unreported) > self.remember:
            self.unreported.popitem(last=False)
        return len(late)

    def _settle(self, charge: Charge, usage: Usage) -> None:
        self.settled += 1
        try:
            self.settle_cb(charge, usage)
        except Exception:
            log.exception("settling the usage of request %s failed", charge.rid)


_USAGE_FIELDS = ("prompt", "completion", "events")  # what usage.lua / json_to_metadata write


def _usage_fields(struct: Any) -> dict[str, float]:
    """The numbers of an entry's ``matrixinfer`` metadata (looked up by key: half the cost of
    walking the map; a value of another kind reads as 0)."""
    fields = struct.fields
    out: dict[str, float] = {}
    for key in _USAGE_FIELDS:
        value = fields.get(key)
        if value is not None:
            out[key] = value.number_value
    return out


def _servicer_base() -> type:
    from envoy.service.accesslog.v3 import als_pb2_grpc

    base: type = als_pb2_grpc.AccessLogServiceServicer
    return base


def _seconds(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def _address(address: Any) -> str:
    sock = address.socket_address
    return f"{sock.address}:{sock.port_value}" if sock.address else ""


def _first_token(common: Any, usage: Any) -> float:
    """Seconds from the request's start to its first token: usage.lua's ``first_token_us``
    (wall clock, µs) minus the entry's ``start_time`` (the same clock); 0.0 when none came."""
    if usage is None:
        return 0.0
    value = usage.fields.get("first_token_us")
    if value is None:
        return 0.0
    start = common.start_time
    start_us = float(start.seconds * 1_000_000 + start.nanos // 1000)
    seconds = (float(value.number_value) - start_us) / 1e6
    return seconds if seconds > 0.0 else 0.0


def answered(entry: Any) -> Answered:
    """The :class:`Answered` of one ``HTTPAccessLogEntry``."""
    common, request, response = entry.common_properties, entry.request, entry.response
    headers = request.request_headers
    usage = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    completion = prompt = None
    if usage is not None:
        completion = usage.fields.get("completion")
        prompt = usage.fields.get("prompt")
    return Answered(
        request_id=request.request_id,
        status=response.response_code.value,
        details=response.response_code_details,
        upstream=_address(common.upstream_remote_address),
        model=headers.get(MODEL_HEADER, ""),
        route=headers.get(ROUTE_HEADER, ""),
        server=headers.get(SERVER_HEADER, ""),
        lora=headers.get(LORA_HEADER, ""),
        first_byte=_seconds(common.time_to_first_downstream_tx_byte),
        duration=_seconds(common.time_to_last_downstream_tx_byte),
        first_token=_first_token(common, usage),
        prompt_tokens=int(prompt.number_value) if prompt is not None else None,
        completion_tokens=int(completion.number_value) if completion is not None else None,
    )


class AccessLogServicer(_servicer_base()):  # type: ignore[misc]
    """``envoy.service.accesslog.v3.AccessLogService``: Envoy reports every request here once
    its answer is over. Each entry goes to ``on_answer`` (the gateway's status counter, timings,
    logs) as an :class:`Answered`; an entry of a request marked for usage accounting also
    settles its charge in the ``ledger`` (policies)."""

    def __init__(
        self,
        ledger: UsageLedger | None = None,
        on_answer: Callable[[Answered], None] | None = None,
        on_attempt: Callable[[str, str, bool], None] | None = None,
    ):
        self.ledger = ledger
        self.on_answer = on_answer
        # (pod address, ModelServer, failed): each attempt the router's upstream log reports
        self.on_attempt = on_attempt

    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        from envoy.service.accesslog.v3 import als_pb2

        ledger, on_answer = self.ledger, self.on_answer
        on_batch = ledger.on_batch if ledger is not None else None
        log_name = ""
        async for message in request_iterator:
            entries = message.http_logs.log_entry
            if message.HasField("identifier"):  # the stream's first message names its log
                log_name = message.identifier.log_name
            if log_name == ATTEMPTS_LOG_NAME:
                self._attempts(entries)
                continue
            if on_batch is not None:
                on_batch(len(entries))
            for entry in entries:
                if on_answer is not None:
                    try:
                        on_answer(answered(entry))
                    except Exception:  # a bug here must not stop the usage reports
                        log.exception("recording the answer of request %s failed",
                                      entry.request.request_id)  # fmt: skip
                if ledger is None:
                    continue
                filter_md = entry.common_properties.metadata.filter_metadata
                lb = filter_md.get(RID_NAMESPACE)
                if lb is None or RID_KEY not in lb.fields:
                    continue
                rid = lb.fields[RID_KEY].string_value
                md = filter_md.get(METADATA_NAMESPACE)
                fields = _usage_fields(md) if md is not None else {}
                carried = lb.fields.get(CHARGE_KEY)
                ledger.report(
                    rid,
                    fields,
                    entry.response.response_code.value,
                    carried.string_value if carried is not None else None,
                )
        return als_pb2.StreamAccessLogsResponse()

    def _attempts(self, entries: Any) -> None:
        on_attempt = self.on_attempt
        if on_attempt is None:
            return
        for entry in entries:
            upstream = _address(entry.common_properties.upstream_remote_address)
            if not upstream:
                continue
            flags = [
                f.name for f, v in entry.common_properties.response_flags.ListFields() if v is True
            ]
            failed = attempt_failed(entry.response.response_code.value, flags)
            if failed is None:
                continue
            server = entry.request.request_headers.get(SERVER_HEADER, "")
            try:
                on_attempt(upstream, server, failed)
            except Exception:  # a bug here must not stop the reports
                log.exception("recording an attempt at %s failed", upstream)
