"""The admission rules (controllers.webhooks.rules), pure: each rule allowed and denied."""

from __future__ import annotations

from typing import Any

from controllers.status.compute import route_claims
from controllers.webhooks import rules
from crds import AutoscalingPolicy, Model, ModelInfer, ModelRoute, ModelServer
from tests.controllers import webhook_objects as w


def parsed(doc: dict[str, Any]) -> Any:
    obj = rules.parse(doc)
    assert not isinstance(obj, rules.Review), obj
    return obj


def test_parse_denies_invalid_field_by_path() -> None:
    doc = w.server()
    doc["spec"]["workloadPort"]["port"] = 70000
    review = rules.parse(doc)
    assert isinstance(review, rules.Review)
    assert review.denials[0][0] == "spec.workloadPort.port"
    assert "spec.workloadPort.port: " in review.message()


def test_parse_runs_the_cel_rules() -> None:
    doc = w.server(kvConnector={"type": "nixl"})
    review = rules.parse(doc)
    assert isinstance(review, rules.Review)
    assert "kvConnector requires workloadSelector.pdGroup" in review.message()


def test_parse_ignores_status() -> None:
    doc = w.route()
    doc["status"] = {"bogus": 1}
    assert isinstance(rules.parse(doc), ModelRoute)


def test_route_claiming_a_taken_model_name_is_denied() -> None:
    other = route_claims(w.route("old", model="llama"))
    review = rules.check_model_route(parsed(w.route("new", model="llama")), other, ["ms1"])
    assert review.denials == (
        (
            "spec.modelName",
            "model name 'llama' is already served by ModelRoute ns/old: two routes cannot "
            "claim the same name",
        ),
    )


def test_route_with_own_or_free_names_is_allowed() -> None:
    mine = route_claims(w.route("r1", model="llama", loras=["sql"]))
    other = route_claims(w.route("r2", model="mistral", loras=["chat"]))
    route = parsed(w.route("r1", model="llama", loras=["sql"]))
    review = rules.check_model_route(route, mine + other, ["ms1"])
    assert review.allowed and review.warnings == ()


def test_route_lora_names_and_model_names_are_apart() -> None:
    other = route_claims(w.route("old", model="sql"))  # a model name, not an adapter
    route = parsed(w.route("new", model="llama", loras=["sql"]))
    assert rules.check_model_route(route, other, ["ms1"]).allowed
    other = route_claims(w.route("old", model="x", loras=["sql"]))
    review = rules.check_model_route(route, other, ["ms1"])
    assert review.denials[0][0] == "spec.loraAdapters[0]"
    assert "LoRA adapter 'sql' is already served by ModelRoute ns/old" in review.message()


def test_route_target_missing_model_server_is_a_warning() -> None:
    review = rules.check_model_route(parsed(w.route(server="nope")), [], ["ms1"])
    assert review.allowed
    assert review.warnings == (
        "spec.rules[0].targets[0].modelServerName: ModelServer 'nope' does not exist in "
        "namespace ns (yet); the target gets no traffic until it does",
    )


def test_model_lora_adapter_of_another_model_is_denied() -> None:
    m: Model = parsed(w.model("m2", loras=["sql", "chat"]))
    review = rules.check_model(m, {"sql": "ns/m1", "chat": "ns/m2"})
    assert review.denials == (
        ("spec.loraAdapters[0].name", "LoRA adapter 'sql' is already served by Model ns/m1"),
    )
    assert rules.check_model(m, {"chat": "ns/m2", "other": "ns/m1"}).allowed


def test_held_names_gathers_adapters_and_route_claims() -> None:
    bare = {"metadata": {"name": "bare"}, "spec": {"loraAdapters": ["not-an-object"]}}
    models = [w.model("m1", loras=["sql"]), w.model("m2", loras=["sql", "chat"]), bare]
    routes = [w.route("r1", model="llama", loras=["sql"]), w.route("r2", model="mistral")]
    held = rules.held_names(models, routes)
    assert held.adapters == {"sql": "ns/m1", "chat": "ns/m2"}  # the first Model keeps a name
    assert [(k, c.name, c.route) for k, c in held.claims] == [
        ("model", "llama", "ns/r1"),
        ("lora", "sql", "ns/r1"),
        ("model", "mistral", "ns/r2"),
    ]
    m: Model = parsed(w.model("m3", loras=["chat"]))
    review = rules.check_model(m, held.adapters, held.claims)
    assert review.message() == (
        "spec.loraAdapters[0].name: LoRA adapter 'chat' is already served by Model ns/m2"
    )


def test_model_server_unknown_plugin_is_denied() -> None:
    ms: ModelServer = parsed(w.server(scheduler={"scorers": [{"name": "no-such-plugin"}]}))
    review = rules.check_model_server(ms)
    assert review.denials[0][0] == "spec.scheduler"
    assert "no-such-plugin" in review.message()
    ok: ModelServer = parsed(w.server(scheduler={"scorers": [{"name": "kv-cache", "weight": 2}]}))
    assert rules.check_model_server(ok).allowed


def test_model_server_bad_plugin_argument_is_denied() -> None:
    bad = w.server(scheduler={"scorers": [{"name": "prefix-cache", "args": {"nope": 1}}]})
    review = rules.check_model_server(parsed(bad))
    assert not review.allowed and "nope" in review.message()


def test_defaults_pd_group_for_kv_connector() -> None:
    doc = w.server(kvConnector={"type": "nixl"})
    ((path, value),) = rules.defaults(doc)
    assert path == ("spec", "workloadSelector", "pdGroup")
    assert value == {
        "groupKey": "workload.matrixinfer.ai/group",
        "prefillLabels": {"workload.matrixinfer.ai/role": "prefill"},
        "decodeLabels": {"workload.matrixinfer.ai/role": "decode"},
    }
    doc["spec"]["workloadSelector"]["pdGroup"] = value
    assert isinstance(rules.parse(doc), ModelServer)  # now valid
    assert rules.defaults(doc) == []  # an explicit pdGroup is kept
    assert rules.defaults(w.server()) == []  # no kvConnector: nothing to default


def test_model_infer_role_change_on_live_partitioned_is_denied() -> None:
    old: ModelInfer = parsed(w.model_infer(partition=1, roles=["a", "b"]))
    new: ModelInfer = parsed(w.model_infer(partition=1, roles=["a", "c"]))
    review = rules.check_model_infer(new, old, live_groups=2)
    assert review.denials == (
        (
            "spec.template.roles",
            "roles ['a', 'b'] cannot become ['a', 'c'] while 2 InferGroup(s) exist and "
            "rolloutStrategy.partition is 1: set the partition to 0 first, or scale to 0 "
            "replicas",
        ),
    )


def test_model_infer_role_change_allowed_without_partition_or_groups() -> None:
    old: ModelInfer = parsed(w.model_infer(partition=1, roles=["a", "b"]))
    new: ModelInfer = parsed(w.model_infer(partition=1, roles=["a", "c"]))
    assert rules.check_model_infer(new, old, live_groups=0).allowed  # nothing runs
    new0: ModelInfer = parsed(w.model_infer(roles=["a", "c"]))
    assert rules.check_model_infer(new0, old, live_groups=2).allowed  # a full rollout
    same: ModelInfer = parsed(w.model_infer(partition=1, roles=["a", "b"]))
    assert rules.check_model_infer(same, old, live_groups=2).allowed  # roles unchanged


def test_model_infer_names_the_controller_cannot_generate_are_denied() -> None:
    mi: ModelInfer = parsed(w.model_infer(name="x" * 60))
    review = rules.check_model_infer(mi, None, 0)
    assert review.denials[0][0] == "metadata.name"
    assert "more than" in review.message()
    assert rules.check_model_infer(parsed(w.model_infer()), None, 0).allowed


def test_autoscaling_policy_missing_target_is_a_warning() -> None:
    p: AutoscalingPolicy = parsed(w.policy(target="gone"))
    review = rules.check_autoscaling_policy(p, ["llama"])
    assert review.allowed
    assert review.warnings == (
        "spec.homogeneousTarget.targetRef.name: ModelInfer 'gone' does not exist in namespace "
        "ns (yet); nothing is scaled until it does",
    )
    ok: AutoscalingPolicy = parsed(w.policy(target="llama"))
    assert rules.check_autoscaling_policy(ok, ["llama"]) == rules.Review()


def test_only_spec_changes_are_reviewed() -> None:
    doc = w.route()
    assert rules.needs_review(doc, None)  # create
    relabelled = {**doc, "metadata": {**doc["metadata"], "finalizers": ["x"]}}
    assert not rules.needs_review(relabelled, doc)
    changed = w.route(model="other")
    assert rules.needs_review(changed, doc)


def test_model_names_taken_by_another_route_are_denied() -> None:
    m: Model = parsed(w.model("llama", loras=["sql"]))
    own = route_claims(w.route("llama", model="llama", loras=["sql"]))  # its generated route
    assert rules.check_model(m, {}, own).allowed
    other = route_claims(w.route("hand", model="llama", loras=["sql"]))
    review = rules.check_model(m, {}, other)
    assert review.denials == (
        (
            "metadata.name",
            "the Model serves model name 'llama', already served by ModelRoute ns/hand",
        ),
        (
            "spec.loraAdapters[0].name",
            "LoRA adapter 'sql' is already served by ModelRoute ns/hand",
        ),
    )
