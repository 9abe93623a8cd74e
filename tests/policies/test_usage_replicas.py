"""Usage reports that reach another extproc replica (issue 5): the charge travels with the request
(``envoy.lb``/``matrixinfer_charge``), the replica the access-log entry reaches settles it, and
the admitting replica's sweep counts nothing twice."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from envoy.service.accesslog.v3 import als_pb2
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extproc.gateway import Gateway, Routed
from extproc.metrics import GatewayMetrics
from extproc.policies.auth import AuthConfig
from extproc.policies.enforce import Policies, PolicySettings
from extproc.policies.ratelimit import UNIT_SECONDS, Limits
from extproc.policies.usage import (
    AccessLogServicer,
    Charge,
    Usage,
    UsageLedger,
    decode_charge,
    encode_charge,
)
from extproc.transport.grpc_servicer import from_decision
from fleet.usage_envoy import CHARGE_KEY, RID_KEY
from matrixinfer.testing.redis import RedisServer
from tests.extproc.helpers import config, server_yaml

KEY = b"charge-key-shared-by-the-replicas"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- encoding --------------------------------------------------------------------------------

names = st.text(max_size=30)  # any text: quotes, "|", "/", non-ASCII
limits_st = st.one_of(
    st.none(),
    st.builds(
        Limits,
        requests=st.none() | st.integers(0, 10**9),
        input=st.none() | st.integers(0, 10**12),
        output=st.none() | st.integers(0, 10**12),
        period=st.sampled_from(sorted(UNIT_SECONDS.values())),
        scope=st.sampled_from(["route", "tenant", "user"]),
        redis=st.none() | st.just("127.0.0.1:6379"),
        password_ref=st.none() | st.tuples(names, names, names),
    ),
)


@given(
    estimate=st.integers(0, 10**9),
    reserved=st.integers(0, 10**9),
    kind=st.sampled_from(["chat", "completions", "embeddings", "oip"]),
    user=names,
    model=names,
    bucket=names,
    where=st.sampled_from(["local", "redis"]),
    limits=limits_st,
)
def test_charge_round_trip(
    estimate: int,
    reserved: int,
    kind: str,
    user: str,
    model: str,
    bucket: str,
    where: str,
    limits: Any,
) -> None:
    charge = Charge(
        "r-1",
        estimate,
        kind,
        user,
        bucket=bucket if limits is not None else None,
        limits=limits,
        model=model,
        where=where,
        output_reserved=reserved,
    )
    text = encode_charge(charge, KEY)
    back = decode_charge("r-1", text, KEY)
    assert back.rebuilt and not charge.rebuilt
    back.rebuilt = False
    assert back == charge


def test_encoded_charge_is_short() -> None:
    limits = Limits(None, 20000, 10000, 3600.0, "user", "10.0.0.5:6379", None)
    charge = Charge("r", 123, "chat", "acme/alice", "acme/chat|u:acme/alice", limits, None, "m")
    charge.where = "redis"
    assert len(encode_charge(charge, KEY)) < 150


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("not json", "not JSON"),
        ("[1, 1]", "version"),  # version 1 (HMAC-SHA256) is not decoded
        ('[2, 5, "chat", "u", "m", null, "local", null]', "version"),  # no reservation
        ('{"a": 1}', "version"),
        ('[3, 5, 0, "chat", "u", "m", null, "local"]', "9 elements"),
        ('[3, -5, 0, "chat", "u", "m", null, "local", null]', "estimate"),
        ('[3, 5, -1, "chat", "u", "m", null, "local", null]', "output reserved"),
        ('[3, 5, 0, "nonsense", "u", "m", null, "local", null]', "kind"),
        ('[3, 5, 0, "chat", 7, "m", null, "local", null]', "user"),
        ('[3, 5, 0, "chat", "u", "m", null, "far", null]', "where"),
        ('[3, 5, 0, "chat", "u", "m", "b", "local", null]', "bucket and limits"),
        ('[3, 5, 0, "chat", "u", "m", "b", "local", [1, 2, 3, 7.0, "user", null, null]]', "period"),
        ('[3, 5, 0, "chat", "u", "m", "b", "local", [1, 2, 3, 60, "all", null, null]]', "scope"),
        (
            '[3, 5, 0, "chat", "u", "m", "b", "local", [1.5, 2, 3, 60, "user", null, null]]',
            "requests",
        ),
        (
            '[3, 5, 0, "chat", "u", "m", "b", "local", [1, 2, 3, 60, "user", null, ["a"]]]',
            "password",
        ),
    ],
)
def test_bad_charge_is_named(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        decode_charge("r", signed("r", text), KEY)


def signed(rid: str, body: str, key: bytes = KEY) -> str:
    """``body`` with the signature the format prescribes: BLAKE2b keyed with ``key``, 16-byte
    digest, over rid, NUL, body; base64url without padding."""
    import base64
    import hashlib

    mac = hashlib.blake2b(rid.encode() + b"\0" + body.encode(), key=key, digest_size=16).digest()
    return f"{body}~{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def test_only_a_charge_signed_with_the_shared_key_for_that_request_decodes() -> None:
    limits = Limits(None, 1000, 500, 60.0, "user", "10.0.0.5:6379", ("ns", "redis", "password"))
    text = encode_charge(Charge("r-1", 40, "chat", "t/u", "b", limits, None, "m", "redis"), KEY)
    body = text.rpartition("~")[0]
    assert text == signed("r-1", body)  # the documented format, computed independently
    assert decode_charge("r-1", text, KEY).limits == limits
    forged = body.replace("10.0.0.5:6379", "203.0.113.9:6379")
    cases = [
        (body, "is not signed"),
        (text.replace("[3,40,", "[3,0,"), "does not match"),  # a smaller estimate: a refund
        (signed("r-1", forged, b"a key of someone else's choosing"), "does not match"),
        (signed("r-1", forged), None),  # (only the holder of the key can do this)
    ]
    for candidate, named in cases:
        if named is None:
            assert decode_charge("r-1", candidate, KEY).limits.redis == "203.0.113.9:6379"  # type: ignore[union-attr]
            continue
        with pytest.raises(ValueError, match=named):
            decode_charge("r-1", candidate, KEY)
    with pytest.raises(ValueError, match="does not match"):  # moved to another request
        decode_charge("r-2", text, KEY)


# ---- the ledger ------------------------------------------------------------------------------


def ledger_of(prefix: str = "") -> tuple[UsageLedger, list[tuple[Charge, Usage]], list[str], Clock]:
    clock = Clock()
    got: list[tuple[Charge, Usage]] = []
    ignored: list[str] = []
    ledger = UsageLedger(
        lambda c, u: got.append((c, u)),
        grace=5,
        clock=clock,
        prefix=prefix,
        on_ignored=ignored.append,
        charge_key=KEY,
    )
    return ledger, got, ignored, clock


def test_unknown_rid_with_charge_is_settled_from_it() -> None:
    limits = Limits(None, 1000, 500, 60.0, "user")
    admitted = Charge("a-7", 40, "chat", "t/u", "r|u:t/u", limits, None, "m", "local")
    ledger, got, ignored, _ = ledger_of("b-")
    usage = ledger.report(
        "a-7", {"prompt": 42.0, "completion": 9.0}, 200, encode_charge(admitted, KEY)
    )
    assert usage == Usage(42, 9, True, "reported")
    charge, settled = got[-1]
    assert settled == usage and charge.rebuilt
    assert (charge.rid, charge.bucket, charge.limits, charge.estimate) == (
        "a-7",
        "r|u:t/u",
        limits,
        40,
    )
    assert ignored == []
    # an aborted stream settled elsewhere: the events count as there
    ledger.report("a-8", {"events": 6.0}, 200, encode_charge(Charge("a-8", 11, "chat", "t/u"), KEY))
    assert got[-1][1] == Usage(11, 5, False, "aborted")


def test_unknown_rid_without_charge_or_with_a_bad_one_is_ignored() -> None:
    ledger, got, ignored, _ = ledger_of("b-")
    assert ledger.report("a-1", {"prompt": 3.0, "completion": 1.0}, 200) is None
    assert ledger.report("a-2", {"prompt": 3.0, "completion": 1.0}, 200, "") is None
    assert ledger.report("a-3", {"prompt": 3.0}, 200, signed("a-3", "[9]")) is None
    other = encode_charge(Charge("a-4", 10, "chat", "t/u"), b"another replica's own key")
    assert ledger.report("a-4", {"prompt": 3.0}, 200, other) is None
    assert got == [] and ignored == ["no_charge", "no_charge", "invalid", "invalid"]


def test_own_request_settles_once_and_late_reports_still_count() -> None:
    ledger, got, ignored, clock = ledger_of("b-")
    text = encode_charge(Charge("b-1", 10, "chat", "t/u"), KEY)
    ledger.expect(Charge("b-1", 10, "chat", "t/u"))
    assert ledger.report("b-1", {"prompt": 12.0, "completion": 3.0}, 200, text) is not None
    # the same report again (never sent by Envoy, but a forged or replayed one): ignored
    assert ledger.report("b-1", {"prompt": 12.0, "completion": 3.0}, 200, text) is None
    assert ignored == ["duplicate"] and len(got) == 1
    # a request whose report came after the grace: dropped as unreported, then settled
    ledger.expect(Charge("b-2", 20, "chat", "t/u"))
    ledger.finished("b-2")
    clock.now += 6
    assert ledger.sweep() == 1
    assert got[-1][1] == Usage(20, 0, False, "unreported")
    text = encode_charge(Charge("b-2", 20, "chat", "t/u"), KEY)
    late = ledger.report("b-2", {"prompt": 21.0, "completion": 4.0}, 200, text)
    assert late == Usage(21, 4, True, "reported") and got[-1][0].rebuilt
    assert ledger.report("b-2", {"prompt": 21.0}, 200, text) is None  # and only once
    assert ignored == ["duplicate", "duplicate"]


def test_unreported_memory_is_bounded() -> None:
    ledger, _, _, clock = ledger_of("b-")
    ledger.remember = 3
    for n in range(5):
        ledger.expect(Charge(f"b-{n}", 1, "chat", "t/u"))
        ledger.finished(f"b-{n}")
    clock.now += 6
    assert ledger.sweep() == 5
    assert list(ledger.unreported) == ["b-2", "b-3", "b-4"]


# ---- two replicas, in process: Gateway.decide on one, the access-log entry on the other -------

ROUTE = """---
apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: r}
spec:
  modelName: m
  rateLimit: {inputTokensPerUnit: 1000, outputTokensPerUnit: 500, unit: hour, scope: user%s}
  rules: [{targets: [{modelServerName: s}]}]
"""
HEADERS = {
    ":method": "POST",
    ":path": "/v1/chat/completions",
    "content-type": "application/json",
    "authorization": "Bearer secret-key",
}


def replica(
    keys: Path, clock: Clock, redis_address: str | None = None, charge_key: bytes = KEY
) -> Gateway:
    from extproc.datastore import Datastore

    extra = f", global: {{redis: {{address: '{redis_address}'}}}}" if redis_address else ""
    ds = Datastore()
    ds.apply(
        config(
            server_yaml("s", {"app": "x"}) + ROUTE % extra,
            [("p0", "10.0.0.1:8000", {"app": "x"})],
        )
    )
    gw = Gateway(ds, GatewayMetrics(CollectorRegistry()))
    settings = PolicySettings(
        auth=AuthConfig(api_keys_file=keys), usage_grace=5, charge_key=charge_key
    )
    gw.policies = Policies(settings, gw.metrics.registry, clock=clock)
    return gw


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    digest = hashlib.sha256(b"secret-key").hexdigest()
    path.write_text(f"keys: [{{sha256: {digest}, tenant: t, user: u}}]\n")
    return path


async def route(gw: Gateway, stream: bool = False) -> tuple[str, Any]:
    """Decide a request on ``gw``; (rid, the envoy.lb Struct Envoy would store)."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x" * 400}],
        "stream": stream,
        "max_tokens": 50,
    }
    state, answer = gw.start(HEADERS, False)
    assert answer is None
    decided = gw.decide(state, json.dumps(body).encode())
    routed = decided if isinstance(decided, Routed) else await decided  # type: ignore[misc]
    assert isinstance(routed, Routed), routed
    gw.finish(state)
    reply = from_decision(routed, b"", duplex=False)
    lb = reply.dynamic_metadata.fields["envoy.lb"].struct_value
    return lb.fields[RID_KEY].string_value, lb


def log_entry(lb: Any, prompt: int, completion: int) -> als_pb2.StreamAccessLogsMessage:
    """The access-log message Envoy sends: the request's envoy.lb metadata and usage.lua's."""
    msg = als_pb2.StreamAccessLogsMessage()
    entry = msg.http_logs.log_entry.add()
    md = entry.common_properties.metadata.filter_metadata
    md["envoy.lb"].CopyFrom(lb)
    md["matrixinfer"].update({"prompt": prompt, "completion": completion, "events": 4})
    entry.response.response_code.value = 200
    return msg


async def deliver(gw: Gateway, *messages: als_pb2.StreamAccessLogsMessage) -> None:
    assert gw.policies is not None

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        for m in messages:
            yield m

    await AccessLogServicer(gw.policies.ledger).StreamAccessLogs(stream(), None)


async def settled(*gws: Gateway) -> None:
    """Write the replicas' queued Redis settlements now (they wait for the next admission or
    the flush timer)."""
    for gw in gws:
        assert gw.policies is not None
        await gw.policies.flush()
        assert all(not r.pending for r in gw.policies.redis.values())


def sample(gw: Gateway, name: str, **labels: str) -> float:
    value = gw.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_report_on_the_other_replica_settles_local_buckets(keys: Path) -> None:
    clock = Clock()
    a, b = replica(keys, clock), replica(keys, clock)
    assert a.policies is not None and b.policies is not None
    rid, lb = await route(a)
    assert CHARGE_KEY in lb.fields
    charge = a.policies.ledger.open[rid]
    bucket = charge.bucket
    assert bucket is not None and charge.limits is not None
    limits = charge.limits
    levels_a = a.policies.local.levels(bucket, limits)
    assert levels_a[1:] == (1000 - charge.estimate, 500 - 50)  # max_tokens 50 reserved
    assert charge.output_reserved == 50

    assert charge.estimate < 150
    await deliver(b, log_entry(lb, prompt=150, completion=30))
    # B settled: its bucket corrected as if it held the reservation (the sum over the replicas is
    # the exact usage; a bucket never refills above its capacity: 50 - 30 output back on a full
    # one), the tokens counted once, there
    assert b.policies.local.levels(bucket, limits)[1:] == (1000.0 + charge.estimate - 150, 500.0)
    assert sample(b, "matrixinfer_gateway_usage_tokens_total", model="m", kind="prompt") == 150
    assert sample(b, "matrixinfer_gateway_usage_tokens_total", model="m", kind="completion") == 30
    assert sample(b, "matrixinfer_gateway_usage_foreign_reports_total", result="settled") == 1
    assert sample(b, "matrixinfer_gateway_usage_reports_total", source="reported") == 1
    assert rid in a.policies.ledger.open  # A never heard of the report

    # A's sweep: the charge is dropped as unreported — no bucket change, no tokens
    clock.now += 6
    levels_a = a.policies.local.levels(bucket, limits)  # refilled for 6 s
    assert a.policies.ledger.sweep() == 1
    assert not a.policies.ledger.open
    assert a.policies.local.levels(bucket, limits) == levels_a
    assert sample(a, "matrixinfer_gateway_usage_reports_total", source="unreported") == 1
    assert sample(a, "matrixinfer_gateway_usage_tokens_total", model="m", kind="prompt") == 0
    assert sample(a, "matrixinfer_gateway_usage_tokens_total", model="m", kind="completion") == 0
    assert a.policies.window.use("t/u") == 0


async def test_report_without_charge_on_the_other_replica_is_counted_and_ignored(
    keys: Path,
) -> None:
    clock = Clock()
    a, b = replica(keys, clock), replica(keys, clock)
    _, lb = await route(a)
    del lb.fields[CHARGE_KEY]  # an entry from an extproc that did not carry the charge
    await deliver(b, log_entry(lb, prompt=90, completion=30))
    assert sample(b, "matrixinfer_gateway_usage_foreign_reports_total", result="no_charge") == 1
    assert sample(b, "matrixinfer_gateway_usage_tokens_total", model="m", kind="prompt") == 0


async def test_shared_redis_budget_is_exact_whichever_replica_settles(
    keys: Path, redis_server: RedisServer
) -> None:
    """Replica A admits 6 requests in Redis; their reports reach B (4) or A (2): the shared
    bucket holds exactly the reported usage, and A's sweep of B's requests changes nothing."""
    clock = Clock()
    a, b = replica(keys, clock, redis_server.address), replica(keys, clock, redis_server.address)
    assert a.policies is not None and b.policies is not None
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=2)
    for key in client.keys("mi:rl:*|u:t/u"):  # this test's bucket, from an earlier test
        client.delete(key)
    began = client.time()
    routed = [await route(a, stream=n % 2 == 1) for n in range(6)]
    try:
        bucket = a.policies.ledger.open[routed[0][0]].bucket
        usage = [(100 + n, 10 + n) for n in range(6)]
        on_b = [log_entry(lb, p, c) for (_, lb), (p, c) in zip(routed[:4], usage[:4], strict=True)]
        on_a = [log_entry(lb, p, c) for (_, lb), (p, c) in zip(routed[4:], usage[4:], strict=True)]
        await deliver(b, *on_b)
        batch = als_pb2.StreamAccessLogsMessage()  # A's two reports in one message, as Envoy does
        for m in on_a:
            batch.http_logs.log_entry.extend(m.http_logs.log_entry)
        await deliver(a, batch)
        await settled(a, b)
        # how Envoy batched the reports is counted
        assert sample(b, "matrixinfer_gateway_usage_log_messages_total") == 4
        assert sample(b, "matrixinfer_gateway_usage_log_entries_total") == 4
        assert sample(a, "matrixinfer_gateway_usage_log_messages_total") == 1
        assert sample(a, "matrixinfer_gateway_usage_log_entries_total") == 2

        def levels() -> tuple[float, float]:
            raw = client.hmget(f"mi:rl:{bucket}", "i", "o")
            return float(raw[0] or "nan"), float(raw[1] or "nan")

        prompt = sum(p for p, _ in usage)
        completion = sum(c for _, c in usage)
        i, o = levels()
        # the buckets refill continuously (1000 and 500 an hour, Redis TIME): allow for that
        now = client.time()
        hours = (now[0] - began[0] + (now[1] - began[1]) / 1e6) / 3600
        assert 0 <= i - (1000 - prompt) <= 1000 * hours + 1e-6, (i, prompt)
        assert 0 <= o - (500 - completion) <= 500 * hours + 1e-6, (o, completion)
        clock.now += 6
        assert a.policies.ledger.sweep() == 4  # B's four: unreported here
        assert all(not r.pending for r in a.policies.redis.values())  # nothing for Redis
        assert levels() == (i, o)
        for kind, total in (("prompt", prompt), ("completion", completion)):
            counted = sum(
                sample(g, "matrixinfer_gateway_usage_tokens_total", model="m", kind=kind)
                for g in (a, b)
            )
            assert counted == total
    finally:
        for gw in (a, b):
            assert gw.policies is not None
            await gw.policies.close()


async def test_a_replica_without_the_shared_key_settles_nothing(keys: Path) -> None:
    """A report whose charge another key signed (a replica started without the shared
    --charge-key-file, or a forger) is refused as invalid: no bucket or token changes."""
    clock = Clock()
    a, b = replica(keys, clock), replica(keys, clock, charge_key=b"not the shared key at all")
    assert a.policies is not None and b.policies is not None
    rid, lb = await route(a)
    charge = a.policies.ledger.open[rid]
    assert charge.bucket is not None and charge.limits is not None
    before = b.policies.local.levels(charge.bucket, charge.limits)
    await deliver(b, log_entry(lb, prompt=150, completion=30))
    assert b.policies.local.levels(charge.bucket, charge.limits) == before
    assert sample(b, "matrixinfer_gateway_usage_foreign_reports_total", result="invalid") == 1
    assert sample(b, "matrixinfer_gateway_usage_tokens_total", model="m", kind="prompt") == 0


def test_charge_key_file_sets_the_shared_key(tmp_path: Path) -> None:
    from extproc.main import build_policies, parse_args

    good, short = tmp_path / "charge.key", tmp_path / "short.key"
    good.write_text("0123456789abcdef0123\n")
    short.write_text("too-short\n")
    metrics = GatewayMetrics(CollectorRegistry())
    args = parse_args(["--config", str(tmp_path), "--policies", "--charge-key-file", str(good)])
    assert build_policies(args, metrics).ledger.charge_key == b"0123456789abcdef0123"
    for path, named in ((short, "9 bytes, at least 16"), (tmp_path / "none", "No such file")):
        args = parse_args(["--config", str(tmp_path), "--policies", "--charge-key-file", str(path)])
        with pytest.raises(SystemExit, match=named):
            build_policies(args, metrics)
