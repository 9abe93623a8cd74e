"""The chart's admission webhooks, checked against the real operator on the emulated API server:

- ``configurations: chart`` (default): the Validating/MutatingWebhookConfiguration the chart
  renders name the same webhooks, rules and settings as the ones the operator writes itself, and
  the chart's certificate (CA in the configurations, Secret mounted in the pods) serves the real
  webhook server for the Service's DNS name; the operator makes no request for the
  configurations, and every request it makes is granted by the chart's Roles.
- ``configurations: operator``: every request the operator makes for its configurations (and the
  per-request reads of the cross-object rules) is granted by the chart's (Cluster)Roles, and
  every grant is used.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controllers.webhooks.handlers import MANAGED, WebhookConfig
from matrixinfer.process import free_port
from matrixinfer.testing.kube import Api, eventually, operator
from tests.controllers import webhook_objects as w
from tests.xds.kube import NS

from .chart import objects
from .test_rbac_recorded import allowed, component_calls, granted, recording_api

pytestmark = pytest.mark.timeout(180)

VALIDATING = "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
MUTATING = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
CHART_MODE = {"watchNamespace": NS}
OPERATOR_MODE = {
    "watchNamespace": NS,
    "controllers": {"replicas": 1, "webhooks": {"configurations": "operator"}},
}
PLURALS = {"Model": "models", "ModelServer": "modelservers", "ModelRoute": "modelroutes"}


def _by_kind(
    values: dict[str, Any], kind: str, rendered: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``rendered``: objects of one rendering (each rendering makes a new CA)."""
    return [o for o in rendered or objects(values, namespace=NS) if o["kind"] == kind]


def controller_roles(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        o
        for o in objects(values, namespace=NS)
        if o["kind"] in ("Role", "ClusterRole") and "-controllers" in o["metadata"]["name"]
    ]


def review_request(obj: dict[str, Any]) -> dict[str, Any]:
    group, version = obj["apiVersion"].split("/")
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": obj["kind"]},
            "resource": {"group": group, "version": version, "resource": PLURALS[obj["kind"]]},
            "namespace": NS,
            "name": obj["metadata"]["name"],
            "operation": "CREATE",
            "userInfo": {"username": "alice"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
        },
    }


async def review(
    session: aiohttp.ClientSession, url: str, tls: ssl.SSLContext, obj: dict[str, Any],
    server_hostname: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    request = review_request(obj)
    async with session.post(url, json=request, ssl=tls, server_hostname=server_hostname) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
    response: dict[str, Any] = body["response"]
    assert response["uid"] == request["request"]["uid"]
    return response


async def listening(port: int, within: float = 30.0) -> None:
    """Wait until the webhook server accepts connections (nothing else says it started when
    the operator does not write configurations)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the webhook server did not listen on {port}") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


def comparable(hook: dict[str, Any]) -> dict[str, Any]:
    """What the API server acts on, without where it sends the request and the CA."""
    client = hook["clientConfig"]
    path = client["service"]["path"] if "service" in client else urlparse(client["url"]).path
    keep = ("name", "rules", "failurePolicy", "sideEffects", "matchPolicy", "timeoutSeconds",
            "admissionReviewVersions")  # fmt: skip
    return {"path": path, **{k: hook.get(k) for k in keep}}


async def test_chart_mode_certificate_serves_the_webhooks_and_needs_no_configuration_rbac(
    tmp_path: Path,
) -> None:
    rendered = objects(CHART_MODE, namespace=NS)
    tls_secrets = _by_kind(CHART_MODE, "Secret", rendered)
    (secret,) = [s for s in tls_secrets if s["type"] == "kubernetes.io/tls"]
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    (config,) = _by_kind(CHART_MODE, "ValidatingWebhookConfiguration", rendered)
    hook = next(h for h in config["webhooks"] if h["name"] == "validate-modelserver.matrixinfer.ai")
    service = hook["clientConfig"]["service"]
    host = f"{service['name']}.{service['namespace']}.svc"
    tls = ssl.create_default_context(
        cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
    )
    deployment = next(
        d
        for d in _by_kind(CHART_MODE, "Deployment")
        if d["metadata"]["name"].endswith("-controllers")
    )
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--webhook-host={host}" in command
    assert "--webhook-configuration=" in command  # the release owns them
    port, metrics_port = free_port(), free_port()
    webhooks = WebhookConfig(port=port, addr="127.0.0.1", host=host, cert_dir=str(tmp_path),
                             managed=None)  # fmt: skip
    async with recording_api() as api, aiohttp.ClientSession() as session:
        async with operator(api, webhooks=webhooks, metrics_port=metrics_port,
                            metrics_host="127.0.0.1"):  # fmt: skip
            await listening(port)
            url = f"https://127.0.0.1:{port}{service['path']}"
            # the API server dials the Service name and checks it against the chart's CA
            ok = await review(session, url, tls, w.server(), server_hostname=host)
            assert ok["allowed"] is True, ok
            bad = w.server()
            bad["spec"]["workloadPort"]["port"] = 70000
            denied = await review(session, url, tls, bad, server_hostname=host)
            assert denied["allowed"] is False
            assert denied["status"]["message"].startswith("spec.workloadPort.port: ")
            route_url = f"https://127.0.0.1:{port}/validate-modelroute"
            assert (await review(session, route_url, tls, w.route(), host))["allowed"] is True
            # a certificate for another name is refused by the client, as the API server would
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await review(session, url, tls, w.server(), server_hostname="other.ns.svc")
            # what the alerts watch (files/alerts.yaml: MatrixInferWebhook*)
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                page = await r.text()
        calls = component_calls(api)
    samples = {
        (s.name, s.labels.get("handler"), s.labels.get("result")): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    reviews = "matrixinfer_controller_admission_reviews_total"
    assert samples[(reviews, "validate-modelserver", "allowed")] == 1
    assert samples[(reviews, "validate-modelserver", "denied")] == 1
    assert samples[(reviews, "validate-modelroute", "allowed")] == 1
    duration = "matrixinfer_controller_admission_duration_seconds_count"
    assert samples[(duration, "validate-modelserver", None)] == 2
    assert not [c for c in calls if "webhookconfigurations" in c.resource], calls
    # the cross-object rule read ModelRoutes and ModelServers (the Reader)
    used = {(c.group, c.resource, c.verb) for c in calls}
    assert ("networking.matrixinfer.ai", "modelroutes", "list") in used
    roles = controller_roles(CHART_MODE)
    denied_calls = sorted({str(c) for c in calls if not allowed(c, roles)})
    assert not denied_calls, f"the chart's controllers RBAC denies: {denied_calls}"
    assert not [r for r in roles if r["kind"] == "ClusterRole"]


async def test_chart_configurations_are_the_ones_the_operator_writes() -> None:
    webhooks = WebhookConfig(port=free_port(), addr="127.0.0.1", host="127.0.0.1")
    async with recording_api() as api:
        async with operator(api, webhooks=webhooks):
            await eventually(
                lambda: _written(api, VALIDATING) and _written(api, MUTATING),
                30,
                "the operator to write its webhook configurations",
            )
            written = {path: _written(api, path) for path in (VALIDATING, MUTATING)}
        calls = component_calls(api)
        after = _written(api, VALIDATING)
    for path, kind in ((VALIDATING, "ValidatingWebhookConfiguration"),
                       (MUTATING, "MutatingWebhookConfiguration")):  # fmt: skip
        (chart,) = _by_kind(CHART_MODE, kind)
        ours = sorted((comparable(h) for h in chart["webhooks"]), key=lambda h: h["name"])
        theirs = sorted((comparable(h) for h in written[path]), key=lambda h: h["name"])
        assert ours == theirs, kind
        # one namespace: only that namespace's objects are sent to the operator
        for hook in chart["webhooks"]:
            assert hook["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NS}}
    # operator mode: the operator's configuration requests are granted, and nothing more
    assert not after, "a stopping operator empties its webhooks (why operator mode needs Recreate)"
    roles = controller_roles(OPERATOR_MODE)
    denied_calls = sorted({str(c) for c in calls if not allowed(c, roles)})
    assert not denied_calls, f"the chart's controllers RBAC (operator mode) denies: {denied_calls}"
    hooks_role = [r for r in roles if r["metadata"]["name"].endswith("-webhooks")]
    assert [r["kind"] for r in hooks_role] == ["ClusterRole"]
    used = {(c.group, c.resource, c.verb) for c in calls}
    assert granted(hooks_role) <= used, sorted(granted(hooks_role) - used)
    # patches only ever name the managed configurations (the rule's resourceNames)
    patched = {c.name for c in calls if "webhookconfigurations" in c.resource and c.verb == "patch"}
    assert patched == {MANAGED}


def _written(api: Api, path: str) -> list[dict[str, Any]]:
    config = api.objects(path, ns=None).get(MANAGED) or {}
    return list(config.get("webhooks") or [])


def test_operator_mode_leaves_no_chart_configuration_and_rolls_with_recreate() -> None:
    assert not _by_kind(OPERATOR_MODE, "ValidatingWebhookConfiguration")
    assert not _by_kind(OPERATOR_MODE, "MutatingWebhookConfiguration")
    deployment = next(
        d for d in _by_kind(OPERATOR_MODE, "Deployment")
        if d["metadata"]["name"].endswith("-controllers")
    )  # fmt: skip
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--webhook-configuration={MANAGED}" in command
    assert not any(a.startswith("--webhook-cert-dir") for a in command)  # self-signed


def test_cert_manager_certificate_and_ca_injection() -> None:
    values = {"controllers": {"webhooks": {"certManager": {"enabled": True}}}}
    (cert,) = _by_kind(values, "Certificate")
    (issuer,) = _by_kind(values, "Issuer")
    assert cert["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
    assert f"mi-matrixinfer-webhook.{NS}.svc" in cert["spec"]["dnsNames"]
    assert not [s for s in _by_kind(values, "Secret") if s["type"] == "kubernetes.io/tls"]
    deployment = next(
        d for d in _by_kind(values, "Deployment") if d["metadata"]["name"].endswith("-controllers")
    )
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": cert["spec"]["secretName"]}} in volumes
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        (config,) = _by_kind(values, kind)
        inject = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert inject == f"{NS}/{cert['metadata']['name']}"
        assert all("caBundle" not in h["clientConfig"] for h in config["webhooks"])
    theirs = {"name": "corp-ca", "kind": "ClusterIssuer"}
    values["controllers"]["webhooks"]["certManager"]["issuerRef"] = theirs
    assert not _by_kind(values, "Issuer")
    assert _by_kind(values, "Certificate")[0]["spec"]["issuerRef"] == theirs
