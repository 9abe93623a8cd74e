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
    loop.expect.uids[pod.name] = "u1"  # its create answered
    assert [p.name for p in loop.expect.overlay({}, 1.0)] == [pod.name]
    # its ADDED and DELETED coalesced: the index never showed it; the event still drops it
    controller.pod_event(KEY, pod.name, "u1")
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


def test_an_event_of_an_earlier_pod_of_the_name_does_not_hide_the_new_one() -> None:
    """A group recreated: its pods are created again under the same names while the events of
    the deleted ones still come (Kopf may handle an old pod's DELETED after the new pod's
    ADDED, and drop the name from its index). Taken for the new pod, such an event hid it: the
    group looked broken and was recreated again, in a loop (seen beside stress-ng: 200 pods
    created and deleted in 45 s)."""
    from dataclasses import replace

    controller = ModelInferController()
    loop = controller.loops[KEY] = _Loop()
    pod = pod_from_json(POD, 0.0)
    assert pod is not None
    loop.expect.created[pod.name] = (pod, 0.0)
    controller.pod_event(KEY, pod.name, "old")  # before the create answered: not known as ours
    assert [p.name for p in loop.expect.overlay({}, 1.0)] == [pod.name]
    loop.expect.uids[pod.name] = "new"  # the create answered
    controller.pod_event(KEY, pod.name, "old")  # the earlier pod's DELETED, late
    assert [p.name for p in loop.expect.overlay({}, 1.0)] == [pod.name]
    # the index still shows the earlier pod, terminating: the new one is what counts
    old = replace(pod, uid="old", terminating=True)
    (shown,) = loop.expect.overlay({pod.name: old}, 1.0)
    assert not shown.terminating and shown.uid == ""
    # the index shows the new pod: the expectation has done its work
    new = replace(pod, uid="new", phase="Running")
    assert loop.expect.overlay({pod.name: new}, 1.0) == [new]
    assert pod.name not in loop.expect.created and pod.name not in loop.expect.uids


def test_before_its_create_answered_a_live_indexed_pod_is_taken_as_the_new_one() -> None:
    from dataclasses import replace

    loop = _Loop()
    pod = pod_from_json(POD, 0.0)
    assert pod is not None
    loop.expect.created[pod.name] = (pod, 0.0)
    live = replace(pod, uid="u9", phase="Running")
    assert loop.expect.overlay({pod.name: live}, 1.0) == [live]
    assert pod.name not in loop.expect.created
