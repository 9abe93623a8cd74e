"""The admission webhooks served by the real operator (against the emulated API server): real
AdmissionReview requests over HTTPS, sent where the managed webhook configurations say, trusting
the CA bundle they carry — as the API server would."""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from controllers.webhooks.handlers import MANAGED, WebhookConfig
from matrixinfer.process import free_port
from matrixinfer.testing.kube import Api, emulator, eventually, operator
from tests.controllers import webhook_objects as w

pytestmark = pytest.mark.timeout(180)

VALIDATING = "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
MUTATING = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
PLURALS = {
    "Model": "models",
    "AutoscalingPolicy": "autoscalingpolicies",
    "ModelInfer": "modelinfers",
    "ModelServer": "modelservers",
    "ModelRoute": "modelroutes",
}


def webhooks(api: Api, path: str) -> list[dict[str, Any]]:
    config = api.objects(path, ns=None).get(MANAGED) or {}
    return list(config.get("webhooks") or [])


@dataclass
class Webhooks:
    """The API server's side: send an object to the webhook the configuration names."""

    api: Api
    session: aiohttp.ClientSession

    def _hook(self, path: str, kind: str) -> dict[str, Any]:
        plural = PLURALS[kind]
        for hook in webhooks(self.api, path):
            if any(plural in rule["resources"] for rule in hook["rules"]):
                return hook
        raise AssertionError(f"no webhook for {kind} in {path}")

    async def review(
        self,
        obj: dict[str, Any],
        old: dict[str, Any] | None = None,
        path: str = VALIDATING,
    ) -> dict[str, Any]:
        hook = self._hook(path, obj["kind"])
        ca = base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
        tls = ssl.create_default_context(cadata=ca)
        group, version = obj["apiVersion"].split("/")
        request = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": group, "version": version, "kind": obj["kind"]},
                "resource": {"group": group, "version": version, "resource": PLURALS[obj["kind"]]},
                "namespace": w.NS,
                "name": obj["metadata"]["name"],
                "operation": "UPDATE" if old is not None else "CREATE",
                "userInfo": {"username": "alice"},
                "object": obj,
                "oldObject": old,
                "dryRun": False,
            },
        }
        url = hook["clientConfig"]["url"]
        async with self.session.post(url, json=request, ssl=tls) as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
        assert body["response"]["uid"] == request["request"]["uid"]
        return body["response"]

    async def create(self, obj: dict[str, Any]) -> None:
        group_version = obj["apiVersion"]
        path = f"/apis/{group_version}/namespaces/{w.NS}/{PLURALS[obj['kind']]}"
        await self.api.request("POST", path, obj)


def denied(response: dict[str, Any]) -> str:
    assert response["allowed"] is False, response
    message: str = response["status"]["message"]
    assert response["status"]["code"] == 422
    return message


@pytest.fixture
async def hooks() -> AsyncIterator[Webhooks]:
    async with emulator() as api:
        port = free_port()
        config = WebhookConfig(port=port, addr="127.0.0.1", host="127.0.0.1")
        async with operator(api, webhooks=config), aiohttp.ClientSession() as session:
            await eventually(
                lambda: webhooks(api, VALIDATING) and webhooks(api, MUTATING),
                30,
                "the operator to write its webhook configurations",
            )
            yield Webhooks(api, session)


async def test_managed_webhook_configurations(hooks: Webhooks) -> None:
    validating = {h["name"]: h for h in webhooks(hooks.api, VALIDATING)}
    assert sorted(validating) == sorted(f"validate-{k.lower()}.{MANAGED}" for k in PLURALS), (
        validating
    )
    for hook in validating.values():
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:")
        assert hook["clientConfig"]["caBundle"]
        assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    (mutating,) = webhooks(hooks.api, MUTATING)
    assert mutating["name"] == f"default-modelserver.{MANAGED}"
    assert mutating["rules"][0]["resources"] == ["modelservers"]
    assert mutating["failurePolicy"] == "Fail"


async def test_schema_validation_names_the_field(hooks: Webhooks) -> None:
    assert (await hooks.review(w.server()))["allowed"] is True
    bad = w.server()
    bad["spec"]["workloadPort"]["port"] = 70000
    message = denied(await hooks.review(bad))
    assert message.startswith("spec.workloadPort.port: "), message


async def test_model_route_name_claims(hooks: Webhooks) -> None:
    await hooks.create(w.server("ms1"))
    await hooks.create(w.route("old", model="llama", loras=["sql"]))
    assert (await hooks.review(w.route("new", model="mistral")))["allowed"] is True
    message = denied(await hooks.review(w.route("new", model="llama")))
    assert message == (
        "spec.modelName: model name 'llama' is already served by ModelRoute ns/old: two routes "
        "cannot claim the same name"
    )
    message = denied(await hooks.review(w.route("new", model="x", loras=["sql"])))
    assert message.startswith("spec.loraAdapters[0]: LoRA adapter 'sql' is already served")
    # the holder itself may be updated
    old = w.route("old", model="llama", loras=["sql"])
    assert (await hooks.review(old, old=old))["allowed"] is True
    # a route stored in conflict (before the webhooks) still takes metadata patches (Kopf's
    # finalizers and annotations), but no spec change while it conflicts
    clash = w.route("clash", model="llama")
    patched = {**clash, "metadata": {**clash["metadata"], "annotations": {"a": "b"}}}
    assert (await hooks.review(patched, old=clash))["allowed"] is True
    edited = w.route("clash", model="llama", server="ms2")
    assert denied(await hooks.review(edited, old=clash)).startswith("spec.modelName: ")


async def test_model_route_missing_target_warns(hooks: Webhooks) -> None:
    await hooks.create(w.server("ms1"))
    r = await hooks.review(w.route(server="ms1"))
    assert r["allowed"] is True and "warnings" not in r
    r = await hooks.review(w.route(server="missing"))
    assert r["allowed"] is True
    assert r["warnings"] == [
        "spec.rules[0].targets[0].modelServerName: ModelServer 'missing' does not exist in "
        "namespace ns (yet); the target gets no traffic until it does"
    ]


async def test_model_lora_collision(hooks: Webhooks) -> None:
    await hooks.create(w.model("m1", loras=["sql"]))
    assert (await hooks.review(w.model("m2", loras=["chat"])))["allowed"] is True
    message = denied(await hooks.review(w.model("m2", loras=["chat", "sql"])))
    assert message == (
        "spec.loraAdapters[1].name: LoRA adapter 'sql' is already served by Model ns/m1"
    )
    await hooks.create(w.route("hand", model="m3"))
    message = denied(await hooks.review(w.model("m3")))
    assert message == (
        "metadata.name: the Model serves model name 'm3', already served by ModelRoute ns/hand"
    )


async def test_model_server_profile(hooks: Webhooks) -> None:
    good = w.server(scheduler={"scorers": [{"name": "kv-cache", "weight": 2}]})
    assert (await hooks.review(good))["allowed"] is True
    bad = w.server(scheduler={"scorers": [{"name": "no-such-plugin"}]})
    message = denied(await hooks.review(bad))
    assert message.startswith("spec.scheduler: ") and "no-such-plugin" in message, message


async def test_model_server_pd_group_defaulted(hooks: Webhooks) -> None:
    r = await hooks.review(w.server(kvConnector={"type": "nixl"}), path=MUTATING)
    assert r["allowed"] is True and r["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(r["patch"]))
    assert patch == [
        {
            "op": "add",
            "path": "/spec/workloadSelector/pdGroup",
            "value": {
                "groupKey": "workload.matrixinfer.ai/group",
                "prefillLabels": {"workload.matrixinfer.ai/role": "prefill"},
                "decodeLabels": {"workload.matrixinfer.ai/role": "decode"},
            },
        }
    ], patch
    r = await hooks.review(w.server(), path=MUTATING)
    assert r["allowed"] is True and "patch" not in r


async def test_model_infer_role_change(hooks: Webhooks) -> None:
    old = w.model_infer(partition=1, roles=["a", "b"], live=2)
    new = w.model_infer(partition=1, roles=["a", "c"])
    message = denied(await hooks.review(new, old=old))
    assert message.startswith(
        "spec.template.roles: roles ['a', 'b'] cannot become ['a', 'c'] while 2 InferGroup(s) exist"
    ), message
    allowed = w.model_infer(roles=["a", "c"])  # no partition: every group rolls to the new roles
    assert (await hooks.review(allowed, old=old))["allowed"] is True


async def test_autoscaling_policy_missing_target_warns(hooks: Webhooks) -> None:
    await hooks.create(w.model_infer("llama"))
    r = await hooks.review(w.policy(target="llama"))
    assert r["allowed"] is True and "warnings" not in r
    r = await hooks.review(w.policy(target="gone"))
    assert r["allowed"] is True
    assert r["warnings"] == [
        "spec.homogeneousTarget.targetRef.name: ModelInfer 'gone' does not exist in namespace "
        "ns (yet); nothing is scaled until it does"
    ]
    bad = w.policy()
    bad["spec"]["homogeneousTarget"]["maxReplicas"] = 0
    message = denied(await hooks.review(bad))
    assert message.startswith("spec.homogeneousTarget.maxReplicas: "), message


async def test_webhooks_removed_when_the_operator_stops() -> None:
    async with emulator() as api:
        config = WebhookConfig(port=free_port(), addr="127.0.0.1", host="127.0.0.1")
        async with operator(api, webhooks=config):
            await eventually(lambda: webhooks(api, VALIDATING), 30, "the webhooks")
        # a stopped operator must not leave failurePolicy=Fail webhooks behind
        assert MANAGED in api.objects(VALIDATING, ns=None)
        assert webhooks(api, VALIDATING) == [] and webhooks(api, MUTATING) == []
