"""The deployment view of a Model (pure): phase from conditions, pods by ModelInfer label,
events of the Model, its children and its pods only; the form's Model."""

from __future__ import annotations

from typing import Any

import pytest

from console.deployments import DeploymentForm, deployment_view, form_to_model, validate_model

MODEL: dict[str, Any] = {
    "apiVersion": "registry.matrixinfer.ai/v1alpha1",
    "kind": "Model",
    "metadata": {"name": "m", "namespace": "ns"},
    "spec": {"backends": [{"name": "a", "type": "vLLM", "modelURI": "hf://x/y"}]},
}


def with_conditions(*conds: tuple[str, str]) -> dict[str, Any]:
    status = {"conditions": [{"type": t, "status": s, "message": f"{t} says"} for t, s in conds]}
    return {**MODEL, "status": status}


WAITING = "waiting for the Model controller"


@pytest.mark.parametrize(
    ("conds", "phase", "message"),
    [
        ((), "Pending", WAITING),
        ((("Initialized", "True"), ("Active", "False")), "Deploying", "Initialized says"),
        ((("Initialized", "True"), ("Active", "True")), "Ready", "Active says"),
        ((("Active", "True"), ("Failed", "True")), "Failed", "Failed says"),
        ((("Failed", "False"), ("Active", "Unknown")), "Pending", WAITING),
    ],
)
def test_phase_from_conditions(
    conds: tuple[tuple[str, str], ...], phase: str, message: str
) -> None:
    view = deployment_view(with_conditions(*conds), [], [])
    assert (view.phase, view.message) == (phase, message)


def test_pods_and_events_belong_to_the_model() -> None:
    pods = [
        {"metadata": {"name": n, "labels": {"workload.matrixinfer.ai/model-infer": mi}}}
        for n, mi in (("m-a-0", "m-a"), ("mm-a-0", "mm-a"), ("x", "other"))
    ]
    events = [
        {"involvedObject": {"kind": k, "name": n}, "reason": n, "lastTimestamp": f"t{i}"}
        for i, (k, n) in enumerate(
            (("Model", "m"), ("ModelInfer", "m-a"), ("Pod", "m-a-0"), ("Pod", "mm-a-0"))
        )
    ]
    view = deployment_view(MODEL, pods, events)
    assert [p.name for p in view.backends[0].pods] == ["m-a-0"]
    assert [e.reason for e in view.events] == ["m", "m-a", "m-a-0"]


def test_the_form_becomes_a_valid_model() -> None:
    form = DeploymentForm.model_validate(
        {"name": "big", "modelURI": "hf://a/b", "backendType": "vLLMDisaggregated", "gpus": 4,
         "replicas": 2, "maxReplicas": 4, "loraAdapters": {"sql": "hf://a/sql"}}
    )  # fmt: skip
    doc = form_to_model(form, "ns")
    model = validate_model(doc)
    backend = model.spec.backends[0]
    assert backend.type == "vLLMDisaggregated"
    assert [w.type for w in backend.workers or []] == ["prefill", "decode"]
    assert (backend.min_replicas, backend.max_replicas) == (2, 4)
    assert backend.config == {"tensor-parallel-size": 4}
    assert [(a.name, a.uri) for a in model.spec.lora_adapters or []] == [("sql", "hf://a/sql")]
