"""The decision path's shortcuts give exactly what the plain code gave.

- ``scheduler._rank`` returns the sorted order without drawing from the rng when no tie matters;
  with the same rng state it must pick what the loop-only version picks (and leave the rng in the
  same state).
- ``RouteTable.decide`` keeps its (immutable) decisions: repeated calls give equal decisions, and
  weighted draws still follow the rng.
"""

from __future__ import annotations

import random
from random import Random

from extproc.gateway import Immediate, Routed
from extproc.routing import RouteTable
from extproc.scheduling.scheduler import _rank
from fleet.pods import Pod
from tests.extproc.helpers import objects, server_yaml


def _rank_reference(pods: list[Pod], totals: list[float], k: int, rng: Random) -> list[Pod]:
    """The ranking loop as it was before the shortcut (the specification)."""
    n = len(pods)
    if n == 1:
        return pods
    order = sorted(range(n), key=totals.__getitem__, reverse=True)
    k = min(k, n)
    ranked: list[Pod] = []
    i = 0
    while len(ranked) < k:
        t = totals[order[i]]
        j = i + 1
        while j < n and totals[order[j]] == t:
            j += 1
        need = k - len(ranked)
        group = order[i:j] if j - i == 1 else rng.sample(order[i:j], min(need, j - i))
        ranked.extend(pods[g] for g in group[:need])
        i = j
    return ranked


def test_rank_matches_the_reference_and_consumes_the_rng_alike() -> None:
    gen = random.Random(11)
    for case in range(3000):
        n = gen.randint(1, 9)
        pods = [Pod(f"p{i}", f"10.0.0.{i}:80") for i in range(n)]
        # few distinct values -> many ties; sometimes all distinct
        pool = [gen.choice([0.0, 0.5, 1.0, 1.5]) for _ in range(n)]
        totals = pool if case % 3 else [gen.random() for _ in range(n)]
        k = gen.randint(1, 10)
        a, b = Random(case), Random(case)
        got = _rank(pods, list(totals), k, a)
        want = _rank_reference(pods, list(totals), k, b)
        assert [p.name for p in got] == [p.name for p in want], (totals, k)
        assert a.random() == b.random()  # the same draws were taken


ROUTES = """apiVersion: networking.matrixinfer.ai/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  modelName: chat
  loraAdapters: [sql]
  rules:
  - name: pinned
    match: {headers: {x-pin: {exact: b}}}
    targets: [{modelServerName: b}]
  - targets: [{modelServerName: a, weight: 30}, {modelServerName: b, weight: 70}]
"""


def _table() -> RouteTable:
    objs = objects(
        server_yaml("a", {"app": "a"}, model="up/a")
        + "---\n"
        + server_yaml("b", {"app": "b"})
        + "---\n"
        + ROUTES
    )
    servers = {f"default/{o.metadata.name}": o.spec.model for o in objs if o.kind == "ModelServer"}
    return RouteTable([o for o in objs if o.kind == "ModelRoute"], servers)


def test_route_decisions_are_kept_but_draws_still_follow_the_rng() -> None:
    table = _table()
    rng = Random(5)
    picks = [table.decide("chat", {}, "/v1/chat/completions", rng).server for _ in range(2000)]
    assert 500 < picks.count("a") < 700  # 30 % of 2000, within ~4.5 sigma
    fresh = _table()
    rng1, rng2 = Random(9), Random(9)
    for model, headers in [
        ("chat", {}),
        ("sql", {}),
        ("chat", {"x-pin": "b"}),
        ("sql", {"x-pin": "b"}),
    ]:
        for _ in range(20):
            kept = table.decide(model, headers, "/v1/chat/completions", rng1)
            first = _table().decide(model, headers, "/v1/chat/completions", rng2)
            assert kept == first
    a = fresh.decide("chat", {"x-pin": "b"}, "/", Random(1))
    assert (a.rule, a.server, a.lora, a.upstream_model, a.rewritten) == (
        "pinned",
        "b",
        None,
        "chat",
        False,
    )
    lora = fresh.decide("sql", {}, "/", Random(1))
    assert lora.lora == "sql" and not lora.rewritten and lora.upstream_model == "sql"
    to_a = next(
        d for d in (fresh.decide("chat", {}, "/", Random(s)) for s in range(50)) if d.server == "a"
    )
    assert to_a.rewritten and to_a.upstream_model == "up/a"


async def test_kept_request_lines_and_pod_headers_answer_as_fresh_ones() -> None:
    """The gateway keeps classified request lines and the headers towards the pod: each request
    gets its own header dict, and a bad request line is refused every time."""
    from tests.extproc.test_gateway_core import BODY, HEADERS, make

    gw, _ = make()
    seen = []
    for i in range(3):
        state, answer = gw.start({**HEADERS, "x-request-id": f"r{i}"}, end_of_stream=False)
        assert answer is None
        routed = await gw.decide(state, BODY)
        assert isinstance(routed, Routed)
        assert "x-changed-by-a-caller" not in routed.headers  # the previous request's change
        seen.append(dict(routed.headers))
        routed.headers["x-changed-by-a-caller"] = "yes"
        gw.finish(state)
    fresh, _ = make()
    state, _ = fresh.start(HEADERS, end_of_stream=False)
    first = await fresh.decide(state, BODY)
    assert isinstance(first, Routed)
    assert seen[2] == first.headers
    for _ in range(2):
        _, refused = gw.start({**HEADERS, ":path": "/v1/nope?x=1"}, end_of_stream=False)
        assert isinstance(refused, Immediate) and refused.status == 404
