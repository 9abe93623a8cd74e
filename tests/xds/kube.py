"""Emulated Kubernetes API (kmock, the controllers' harness) with the gateway's kinds, objects
for pods/servers/routes, a TCP proxy that can cut every connection (a dropped watch), and an
HTTP proxy that checks a bearer token read from a file (token rotation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import kmock
from aiohttp import web

from matrixinfer.testing.kube import VERBS, Api, emulator
from tests.conftest import E2E_MESSAGE_TIMEOUT_MS

if TYPE_CHECKING:
    from controllers.xds.main import XdsApp

NS = "ns"
NET = "/apis/networking.matrixinfer.ai/v1alpha1/namespaces/ns"


def declare_gateway_kinds(api: Api) -> None:
    res = api.k.resources
    for plural, kind in (("modelroutes", "ModelRoute"), ("modelservers", "ModelServer")):
        res[f"networking.matrixinfer.ai/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs=VERBS, subresources={"status"}
        )


@contextlib.asynccontextmanager
async def kube() -> AsyncIterator[Api]:
    async with emulator() as api:
        declare_gateway_kinds(api)
        yield api


def kube_xds_app(api: Api, extproc_port: int, listen_port: int) -> XdsApp:
    """The xDS server on the emulated API server (namespace NS), ADS on a free port."""
    from controllers.xds.main import XdsApp, parse_args

    return XdsApp(
        parse_args(
            ["--source", "kubernetes", "--server", api.url, "--namespace", NS,
             "--extproc-port", str(extproc_port), "--port", "0",
             "--listen-port", str(listen_port), "--debounce", "0.02",
             "--message-timeout", f"{E2E_MESSAGE_TIMEOUT_MS}ms"]
        )
    )  # fmt: skip


def meta(api: Api, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": NS,
        "uid": f"uid-{name}",
        "resourceVersion": api.next_rv(),
        "generation": 1,
        **extra,
    }


def pod_status(ip: str, ready: bool) -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }


async def create_pod(api: Api, name: str, ip: str, labels: dict[str, str]) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta(api, name, labels=labels),
        "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
        "status": pod_status(ip, True),
    }
    await api.request("POST", f"/api/v1/namespaces/{NS}/pods", body)


async def set_pod_ready(api: Api, name: str, ip: str, ready: bool) -> None:
    await api.patch_pod_status(name, pod_status(ip, ready), NS)


async def create_server(api: Api, name: str, labels: dict[str, str], port: int) -> None:
    body = {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelServer",
        "metadata": meta(api, name),
        "spec": {
            "model": "demo-model",
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": labels},
            "workloadPort": {"port": port},
            "trafficPolicy": {"retry": {"attempts": 1, "retryOn": ["connect-failure"]}},
        },
    }
    await api.request("POST", f"{NET}/modelservers", body)


async def create_route(
    api: Api, name: str, model: str, servers: list[str], created: str | None = None
) -> None:
    extra = {"creationTimestamp": created} if created else {}
    body = {
        "apiVersion": "networking.matrixinfer.ai/v1alpha1",
        "kind": "ModelRoute",
        "metadata": meta(api, name, **extra),
        "spec": {
            "modelName": model,
            "rules": [{"targets": [{"modelServerName": s} for s in servers]}],
        },
    }
    await api.request("POST", f"{NET}/modelroutes", body)


async def create_service(api: Api, name: str, selector: dict[str, str], port: int) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(api, name),
        "spec": {"selector": selector, "ports": [{"name": "grpc", "port": port}]},
    }
    await api.request("POST", f"/api/v1/namespaces/{NS}/services", body)


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to the API server; ``cut()`` closes every connection and refuses
    new ones until ``resume()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.open = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)

    def cut(self) -> None:
        self.open = False
        for w in list(self._writers):
            w.close()

    def resume(self) -> None:
        self.open = True

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class TokenProxy:
    """A real HTTP hop in front of the emulator (which checks no credentials) that admits only
    ``Authorization: Bearer <the token file's content now>``: rotating the file expires the old
    token. ``cut()`` closes the open (watch) connections, as an API server restart would."""

    def __init__(self, upstream: str, token_file: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.token_file = token_file
        self.refused = 0
        self.admitted: dict[str, int] = {}  # token -> requests let through
        self._open: dict[asyncio.Task[Any], asyncio.BaseTransport | None] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = self.token_file.read_text().strip()
        if request.headers.get("Authorization") != f"Bearer {token}":
            self.refused += 1
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                      "reason": "Unauthorized", "message": "Unauthorized", "code": 401}  # fmt: skip
            return web.json_response(status, status=401)
        self.admitted[token] = self.admitted.get(token, 0) + 1
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k in ("Content-Type", "Accept")}
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = request.transport
        try:
            async with self._session.request(
                request.method, self.upstream + request.path_qs, data=body or None, headers=headers
            ) as up:
                resp = web.StreamResponse(
                    status=up.status,
                    headers={"Content-Type": up.headers.get("Content-Type", "application/json")},
                )
                await resp.prepare(request)
                with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                return resp
        finally:
            self._open.pop(task, None)

    def cut(self) -> None:
        for task, transport in list(self._open.items()):
            if transport is not None:
                transport.close()
            task.cancel()  # and the upstream watch with it

    async def stop(self) -> None:
        self.cut()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


EXEC_PLUGIN = """
import json, sys
token = open(sys.argv[1]).read().strip()
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                  "kind": "ExecCredential", "status": {"token": token}}))
"""


def write_kubeconfig(
    path: Path,
    server: str,
    token_file: Path,
    user: str = "tokenFile",
    plugin: str = EXEC_PLUGIN,
    plugin_args: tuple[str, ...] = (),
) -> Path:
    """A kubeconfig for ``server`` whose user reads ``token_file``: directly (``tokenFile``) or
    through an exec credential plugin (``exec``: ``plugin`` run with the file and
    ``plugin_args``)."""
    if user == "tokenFile":
        user_spec: dict[str, Any] = {"tokenFile": str(token_file)}
    else:
        user_spec = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": sys.executable,
                "args": ["-c", plugin, str(token_file), *plugin_args],
            }
        }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulated", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": user_spec}],
        "contexts": [{"name": "test", "context": {"cluster": "emulated", "user": "tester"}}],
        "current-context": "test",
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path
