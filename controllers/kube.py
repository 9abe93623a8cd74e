"""A small asyncio Kubernetes API client for the controllers' writes (aiohttp).

Kopf watches and indexes; this client creates, patches and deletes children. Creating treats 409
AlreadyExists as success and deleting treats 404 as success: with deterministic names that is what
makes every action idempotent.

One source of credentials: the operator loads a :class:`~fleet.kubeconfig.KubeCredentials`
(``--server`` / ``--kubeconfig`` / ``--context`` / in-cluster), logs Kopf in with it
(:func:`connection_info`, again after every 401 Kopf meets), and this client sends its requests
through the same object — so a token that expires or rotates is re-read for both, and a 401 here
reloads it and retries once. A bare ``kopf.ConnectionInfo`` (from another login handler) works
too, with its credentials as they are.
"""

from __future__ import annotations

import base64
import dataclasses
import ssl
import tempfile
from typing import Any

import aiohttp
import kopf

from fleet.kubeconfig import KubeCredentials


class ApiError(RuntimeError):
    """The API server refused a request; `status` is the HTTP status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:300]}")
        self.status = status


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    if not (info.ca_path or info.ca_data or info.certificate_path or info.certificate_data):
        return True
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=str(info.ca_path))
    elif info.ca_data:
        data = info.ca_data
        text = data.decode() if isinstance(data, bytes) else data
        if "BEGIN CERTIFICATE" not in text:
            text = base64.b64decode(text).decode()
        ctx.load_verify_locations(cadata=text)
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".crt") as fc:
            cd = info.certificate_data
            fc.write(cd if isinstance(cd, bytes) else cd.encode())
        with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".key") as fk:
            kd = info.private_key_data
            fk.write(kd if isinstance(kd, bytes) else kd.encode())
        cert, key = fc.name, fk.name
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclasses.dataclass(frozen=True)
class CredentialsConnectionInfo(kopf.ConnectionInfo):
    """What Kopf logs in with, carrying the credentials it was made from (for :class:`KubeClient`
    built from it by a controller's ``connect(info)``)."""

    credentials: KubeCredentials | None = dataclasses.field(default=None, compare=False, repr=False)


async def connection_info(credentials: KubeCredentials) -> CredentialsConnectionInfo:
    """Kopf's view of ``credentials`` as they are now (token, TLS files, expiry)."""
    header = (await credentials.headers()).get("Authorization", "")
    scheme, _, token = header.partition(" ")
    tls = credentials.tls
    return CredentialsConnectionInfo(
        server=credentials.base,
        ca_path=tls.ca_file,
        insecure=not tls.verify,
        scheme=scheme or None,
        token=token or None,
        certificate_path=tls.cert_file,
        private_key_path=tls.key_file,
        expiration=credentials.expiry,
        credentials=credentials,
    )


class KubeClient:
    """create / patch / delete / get / list against one API server."""

    def __init__(self, info: kopf.ConnectionInfo | KubeCredentials, timeout: float = 30.0) -> None:
        if isinstance(info, KubeCredentials):
            self.credentials = info
        elif isinstance(info, CredentialsConnectionInfo) and info.credentials is not None:
            self.credentials = info.credentials
        else:  # someone else's login: its credentials as they are
            self.credentials = KubeCredentials.static(
                info.server, info.as_http_headers(), _ssl_context(info)
            )
        self.base = self.credentials.base
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = self.credentials.session(timeout=self._timeout, limit=32)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.credentials.request(
            self._sess(), method, self.base + path, json=body, headers=headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                return resp.status, text
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, text

    async def create(self, path: str, body: dict[str, Any]) -> bool:
        """POST; False when it already existed (409), True when created."""
        return await self.create_object(path, body) is not None

    async def create_object(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST; the object as created (its uid among it), None when it already existed (409)."""
        status, out = await self._call("POST", path, body)
        if status == 409:
            return None
        if status >= 400:
            raise ApiError("POST", path, status, str(out))
        return out if isinstance(out, dict) else {}

    async def delete(self, path: str) -> bool:
        """DELETE; False when it was already gone (404)."""
        status, out = await self._call("DELETE", path)
        if status == 404:
            return False
        if status >= 400:
            raise ApiError("DELETE", path, status, str(out))
        return True

    async def patch(self, path: str, body: dict[str, Any]) -> Any:
        status, out = await self._call("PATCH", path, body, "application/merge-patch+json")
        if status >= 400:
            raise ApiError("PATCH", path, status, str(out))
        return out

    async def get(self, path: str) -> Any | None:
        status, out = await self._call("GET", path)
        if status == 404:
            return None
        if status >= 400:
            raise ApiError("GET", path, status, str(out))
        return out

    async def resource_served(self, group_version: str, plural: str) -> bool:
        """Discovery: does the API server serve `plural` in `group_version`?"""
        prefix = "/api/" if "/" not in group_version else "/apis/"
        try:
            doc = await self.get(prefix + group_version)
        except (ApiError, aiohttp.ClientError):
            return False
        if not isinstance(doc, dict):
            return False
        return any(r.get("name") == plural for r in doc.get("resources") or [])
