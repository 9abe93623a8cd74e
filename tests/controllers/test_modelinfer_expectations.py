"""The ModelInfer controller's expectations: pods it created that the watch has not shown yet
count as present, until an event of that pod shows the index has caught up."""

from __future__ import annotations

from controllers.modelinfer.observe import pod_from_json
from controllers.modelinfer.reconciler import ModelInferController, _Loop
from controllers.modelinfer.types import LABEL_GROUP, LABEL_ROLE, LABEL_ROLE_REPLICA

KEY = ("ns", "llama")
POD = {
    "metadata": {
        "name": "llama-0-server-0-0",
        "labels": {LABEL_GROUP: "0", LABEL_ROLE: "server", LABEL_ROLE_REPLICA: "0"},
    }
}


def test_a_created_pod_counts_until_its_first_event() -> None:
    controller = ModelInferController()
    loop = controller.loops[KEY] = _Loop()
    pod = pod_from_json(POD, 0.0)
    assert pod is not None
    loop.expect.created[pod.name] = (pod, 0.0)
    assert [p.name for p in loop.expect.overlay({}, 1.0)] == [pod.name]
    # its ADDED and DELETED coalesced: the index never showed it; the event still drops it
    controller.pod_event(KEY, pod.name)
    assert loop.wake.is_set()
    assert loop.expect.overlay({}, 1.0) == [], "a deleted pod still counted as present"


def test_an_event_of_another_modelinfer_changes_nothing() -> None:
    controller = ModelInferController()
    loop = controller.loops[KEY] = _Loop()
    pod = pod_from_json(POD, 0.0)
    assert pod is not None
    loop.expect.created[pod.name] = (pod, 0.0)
    controller.pod_event(("ns", "other"), pod.name)
    controller.pod_event(None, pod.name)
    assert not loop.wake.is_set()
    assert [p.name for p in loop.expect.overlay({}, 1.0)] == [pod.name]
