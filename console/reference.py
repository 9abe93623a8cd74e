"""The REST API reference in Markdown, generated from the OpenAPI document (pure), so
docs/console.md cannot drift from the API: ``python -m console.reference`` prints it and a test
compares it with the docs (``python -m console.reference rbac``: the RBAC table)."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown", "rbac_markdown"]

_METHODS = ("get", "post", "put", "delete")


def _params(op: dict[str, Any]) -> str:
    out = []
    for p in op.get("parameters") or []:
        if p.get("in") == "path":
            continue
        required = " (required)" if p.get("required") else ""
        out.append(f"`{p['name']}`{required}")
    body = (op.get("requestBody") or {}).get("content", {}).get("application/json")
    if body:
        ref = str(body.get("schema", {}).get("$ref", "")).rsplit("/", 1)[-1]
        out.append(f"body: `{ref}`" if ref else "JSON body")
    return ", ".join(out) or "-"


def markdown(openapi: dict[str, Any]) -> str:
    """One table row per operation: method, path, query parameters and body, what it does."""
    rows = ["| method | path | parameters | what it does |", "|---|---|---|---|"]
    for path, item in openapi["paths"].items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            doc = " ".join(str(op.get("description") or op.get("summary") or "").split())
            rows.append(f"| {method.upper()} | `{path}` | {_params(op)} | {doc} |")
    return "\n".join(rows) + "\n"


def rbac_markdown(actions: dict[str, Any]) -> str:
    """The RBAC each console action needs (``console.auth.ACTIONS``)."""
    rows = ["| action | verb | API group | resource |", "|---|---|---|---|"]
    for name, a in actions.items():
        resource = a.resource + (f"/{a.subresource}" if a.subresource else "")
        rows.append(f"| {name} | {a.verb} | {a.group or '(core)'} | {resource} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys

    from console.app import ConsoleConfig, create_app
    from console.auth import ACTIONS
    from fleet.kubeconfig import KubeAccess

    if sys.argv[1:] == ["rbac"]:
        print(rbac_markdown(ACTIONS), end="")
    else:
        app = create_app(ConsoleConfig(kube=KubeAccess(server="http://unused")))
        print(markdown(app.openapi()), end="")
