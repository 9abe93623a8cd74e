"""The Model's status: per-backend replicas, conditions and the Events of their transitions."""

from __future__ import annotations

from typing import Any

from controllers.model.status import child_problems, model_status
from controllers.model.types import ChildRef, ObservedChild, Problem, StatusPlan


def infer(name: str, replicas: int = 1, ready: int = 0, **status: Any) -> ObservedChild:
    return ObservedChild(
        ref=ChildRef("ModelInfer", name),
        labels={},
        controller_uid="u",
        owner_refs=(),
        spec={"replicas": replicas},
        status={"replicas": replicas, "readyReplicas": ready, **status},
    )


def status(
    previous: dict[str, Any] | None = None,
    infers: dict[str, ObservedChild | None] | None = None,
    missing: tuple[ChildRef, ...] = (),
    problems: tuple[Problem, ...] = (),
    spec_valid: bool = True,
) -> StatusPlan:
    infers = infers if infers is not None else {"a": infer("m-a", 1, 1)}
    return model_status(
        generation=3,
        backends=list(infers),
        infers=infers,
        missing=missing,
        problems=problems,
        spec_valid=spec_valid,
        previous=previous or {},
        now="T1",
    )


def conds(sp: StatusPlan) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in sp.status["conditions"]}


def test_all_ready_is_initialized_and_active() -> None:
    sp = status()
    assert conds(sp) == {
        "Initialized": ("True", "ChildrenCreated", "every child exists"),
        "Active": ("True", "BackendsReady", "every backend has a ready InferGroup"),
        "Failed": ("False", "NoProblems", ""),
    }
    assert sp.status["observedGeneration"] == 3
    assert sp.status["backends"] == [{"name": "a", "replicas": 1, "readyReplicas": 1}]
    assert sp.state == "Active"
    assert [(e.type, e.reason) for e in sp.events] == [
        ("Normal", "ChildrenCreated"),
        ("Normal", "BackendsReady"),
    ]


def test_missing_children_are_named() -> None:
    sp = status(missing=(ChildRef("ModelRoute", "m"),), infers={"a": None})
    c = conds(sp)
    assert c["Initialized"] == ("False", "CreatingChildren", "waiting for ModelRoute m")
    assert c["Active"][0:2] == ("False", "NotInitialized")
    assert sp.state == "Initializing"
    assert sp.events == ()  # nothing is announced before something becomes true


def test_backends_not_ready_name_the_backend_and_modelinfer() -> None:
    sp = status(infers={"a": infer("m-a", 2, 1), "b": infer("m-b", 2, 0)})
    assert conds(sp)["Active"] == (
        "False",
        "BackendsNotReady",
        "backend b: 0 of 2 InferGroups ready (ModelInfer m-b)",
    )
    zero = status(infers={"a": infer("m-a", 0, 0)})
    assert conds(zero)["Active"][:2] == ("True", "ScaledToZero")


def test_failed_names_the_problem_and_warns() -> None:
    p = Problem("ChildConflict", "ModelServer m-a exists and belongs to Model other; not touched")
    sp = status(problems=(p,))
    assert conds(sp)["Failed"] == ("True", "ChildConflict", p.message)
    assert sp.state == "Failed"
    assert ("Warning", "ChildConflict") in [(e.type, e.reason) for e in sp.events]


def test_transitions_keep_times_and_announce_once() -> None:
    first = status()
    again = model_status(
        generation=3,
        backends=["a"],
        infers={"a": infer("m-a", 1, 1)},
        missing=(),
        problems=(),
        spec_valid=True,
        previous=first.status,
        now="T2",
    )
    assert again.events == ()
    assert {c["lastTransitionTime"] for c in again.status["conditions"]} == {"T1"}
    down = status(previous=first.status, infers={"a": infer("m-a", 1, 0)})
    assert [(e.type, e.reason) for e in down.events] == [("Warning", "BackendsNotReady")]
    recovered = status(previous=status(problems=(Problem("X", "x"),)).status)
    assert ("Normal", "NoProblems") in [(e.type, e.reason) for e in recovered.events]


def test_invalid_spec() -> None:
    sp = status(
        spec_valid=False,
        problems=(Problem("InvalidSpec", "spec.backends[0].modelURI: bad"),),
        infers={},
    )
    c = conds(sp)
    assert c["Initialized"][:2] == ("False", "InvalidSpec")
    assert c["Failed"] == ("True", "InvalidSpec", "spec.backends[0].modelURI: bad")


def test_child_problems_from_child_conditions() -> None:
    bad = infer(
        "m-a",
        conditions=[
            {"type": "SpecValid", "status": "False", "reason": "NameTooLong", "message": "x"}
        ],
    )
    assert child_problems([bad, infer("m-b")]) == [
        Problem("ChildFailed", "ModelInfer m-a: SpecValid is False (NameTooLong): x")
    ]
