"""The console's Kubernetes API client (aiohttp): Models, pods, events, logs, nodes and the
authentication/authorization reviews. Credentials as every MatrixInfer program loads them
(:mod:`fleet.kubeconfig`: ``--server``, ``--kubeconfig``/``--context``, ``$KUBECONFIG``,
in-cluster), tokens refreshed on expiry or a 401."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from fleet.kubeconfig import KubeAccess, KubeCredentials

__all__ = ["MODELS", "KubeClient", "KubeError"]

MODELS = "/apis/registry.matrixinfer.ai/v1alpha1/namespaces/{ns}/models"


class KubeError(Exception):
    """The API server refused or failed a request: its status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class KubeClient:
    def __init__(self, access: KubeAccess | None = None) -> None:
        self._access = access or KubeAccess()
        self._session: aiohttp.ClientSession | None = None
        self._credentials: KubeCredentials | None = None

    async def start(self) -> None:
        """Load the credentials (KubeConfigError, one line, when there are none) and connect."""
        self._credentials = await self._access.load()
        self.base = self._credentials.base
        self._session = self._credentials.session(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )

    @property
    def credentials(self) -> KubeCredentials:
        assert self._credentials is not None, "KubeClient.start() was not called"
        return self._credentials

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "KubeClient.start() was not called"
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        kwargs: dict[str, Any] = {"params": dict(params or {})}
        if body is not None:
            kwargs["json"] = body
            kwargs["headers"] = {"Content-Type": content_type}
        timeout = aiohttp.ClientTimeout(total=30)
        async with self.credentials.request(
            self.session, method, self.base + path, timeout=timeout, **kwargs
        ) as resp:
            if resp.status >= 400:
                raise KubeError(resp.status, await _message(resp))
            return await resp.json(content_type=None)

    # Models
    async def list_models(self, ns: str) -> list[dict[str, Any]]:
        return list((await self.request("GET", MODELS.format(ns=ns))).get("items") or [])

    async def get_model(self, ns: str, name: str) -> dict[str, Any]:
        return dict(await self.request("GET", MODELS.format(ns=ns) + f"/{name}"))

    async def create_model(self, ns: str, doc: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.request("POST", MODELS.format(ns=ns), doc))

    async def replace_model(self, ns: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        """Replace spec, labels and annotations (a JSON patch: fields left out are removed)."""
        meta = doc.get("metadata") or {}
        ops: list[dict[str, Any]] = [{"op": "replace", "path": "/spec", "value": doc["spec"]}]
        for key in ("labels", "annotations"):
            if key in meta:
                ops.append({"op": "add", "path": f"/metadata/{key}", "value": meta[key]})
        path = MODELS.format(ns=ns) + f"/{name}"
        patch = "application/json-patch+json"
        return dict(await self.request("PATCH", path, ops, content_type=patch))

    async def delete_model(self, ns: str, name: str) -> None:
        await self.request("DELETE", MODELS.format(ns=ns) + f"/{name}")

    # what a Model runs
    async def list_pods(self, ns: str, label_selector: str) -> list[dict[str, Any]]:
        out = await self.request(
            "GET", f"/api/v1/namespaces/{ns}/pods", params={"labelSelector": label_selector}
        )
        return list(out.get("items") or [])

    async def list_events(self, ns: str) -> list[dict[str, Any]]:
        out = await self.request("GET", f"/api/v1/namespaces/{ns}/events")
        return list(out.get("items") or [])

    async def list_nodes(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/api/v1/nodes")).get("items") or [])

    async def pod_log(
        self, ns: str, pod: str, container: str | None, follow: bool, tail_lines: int | None
    ) -> AsyncIterator[bytes]:
        """The pod's log, chunk by chunk (``follow``: until the pod or the client stops)."""
        params = {"follow": "true" if follow else "false"}
        if container:
            params["container"] = container
        if tail_lines is not None:
            params["tailLines"] = str(tail_lines)
        async with self.credentials.request(
            self.session,
            "GET",
            self.base + f"/api/v1/namespaces/{ns}/pods/{pod}/log",
            params=params,
        ) as resp:
            if resp.status >= 400:
                raise KubeError(resp.status, await _message(resp))
            async for chunk in resp.content.iter_any():
                yield chunk

    # authentication and authorization
    async def token_review(self, token: str) -> dict[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        out = await self.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body)
        return dict(out.get("status") or {})

    async def subject_access_review(self, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": spec,
        }
        out = await self.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
        return dict(out.get("status") or {})


async def _message(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text()
    try:
        doc = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return text[:500]
