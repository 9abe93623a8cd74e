"""``matrixinfer-runtime``: the sidecar next to each engine (vLLM or SGLang), one HTTP API for both.

matrixinfer-runtime --engine vllm --engine-url http://127.0.0.1:8000 [--port 8100]
                    [--lora-adapters FILE] [--cache DIR] [source flags of matrixinfer-downloader]

- ``GET /health``: 200 when the engine's ``/health`` answers 200, else 503 naming what failed.
- ``GET /ready``: 200 when the engine is healthy and every adapter of the adapters file is loaded;
  else 503 with the reasons, one per line.
- ``GET /metrics``: the engine's metrics under the ``matrixinfer_engine_*`` names
  (:mod:`runtime.metrics`).
- ``GET /v1/lora_adapters``: the adapters the sidecar loaded (name, uri, path, managed).
- ``POST /v1/lora_adapters`` ``{"name": ..., "uri": ...}``: fetch the adapter with the downloader's
  code (into the cache, or in place for pvc:// and file://), then load it through the engine's own
  API (vLLM ``/v1/load_lora_adapter``, SGLang ``/load_lora_adapter``).
- ``DELETE /v1/lora_adapters/{name}``: unload it (vLLM ``/v1/unload_lora_adapter``, SGLang
  ``/unload_lora_adapter``).

The adapters file holds the Model's ``loraAdapters`` (a YAML list of ``{name, uri}``, or a mapping
with a ``loraAdapters`` key); it is read at start and every ``--sync-interval`` seconds, so a
mounted ConfigMap that changes with the Model keeps the engine in sync: new adapters are loaded,
removed ones unloaded (only those the file brought; adapters loaded through the API stay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from crds.registry import LoraAdapter
from fleet.artefacts import parse_uri
from fleet.service import HelpFormatter, add_service_args, configure_logging, duration
from runtime.artefacts import (
    ArtefactError,
    AuthError,
    DiskFullError,
    MissingError,
)
from runtime.downloader import add_source_flags, settings_from
from runtime.fetch import Settings, fetch
from runtime.metrics import ENGINE_KINDS, unify

__all__ = ["EngineError", "SidecarConfig", "build_app", "main", "plan_sync", "read_adapters"]

log = logging.getLogger("matrixinfer.runtime")

_ADAPTERS = TypeAdapter(list[LoraAdapter])

# the engines' own LoRA paths: (load, unload)
LORA_PATHS = {
    "vllm": ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"),
    "sglang": ("/load_lora_adapter", "/unload_lora_adapter"),
}


FIRST_SYNC_POLL = 0.1  # seconds between two looks at a starting engine, before the first sync


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    engine: str  # vllm | sglang
    engine_url: str
    settings: Settings
    adapters_file: Path | None = None
    sync_interval: float = 5.0
    engine_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"unknown engine {self.engine!r} (known: {', '.join(ENGINE_KINDS)})")


class EngineError(Exception):
    """The engine refused or could not be reached; the message says which call and why."""


def read_adapters(path: Path) -> dict[str, str]:
    """The adapters file as name -> URI; ValueError names what is wrong in it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"adapters file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"adapters file {path}: not YAML: {exc}") from exc
    if isinstance(raw, dict):
        raw = raw.get("loraAdapters")
    try:
        adapters = _ADAPTERS.validate_python(raw or [])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"adapters file {path}: [{where}]: {first['msg']}") from exc
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapters file {path}: adapter names must be unique")
    return {a.name: a.uri for a in adapters}


def plan_sync(desired: dict[str, str], managed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(names to load, names to unload) that make the file-managed adapters ``managed`` (name ->
    URI) equal ``desired``; an adapter whose URI changed is unloaded and loaded again."""
    unload = sorted(n for n, uri in managed.items() if desired.get(n) != uri)
    load = sorted(n for n, uri in desired.items() if managed.get(n) != uri)
    return load, unload


@dataclass(slots=True)
class _Loaded:
    uri: str
    path: str
    managed: bool  # brought by the adapters file (the sync may unload it)


@dataclass(slots=True)
class _State:
    loaded: dict[str, _Loaded] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # adapter name or "file" -> reason
    synced: bool = False  # the adapters file was applied at least once
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


_ARTEFACT_STATUS: dict[type[ArtefactError], int] = {
    MissingError: 404,
    AuthError: 403,
    DiskFullError: 507,
}


class Sidecar:
    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.state = _State()
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ engine calls

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.cfg.engine_timeout)
            self._session = aiohttp.ClientSession(self.cfg.engine_url, timeout=timeout)
        return self._session

    async def engine_health(self) -> str | None:
        """None when the engine is healthy, else why not."""
        try:
            async with self.session.get("/health") as resp:
                if resp.status == 200:
                    return None
                text = (await resp.text()).strip()
                return f"engine at {self.cfg.engine_url}: /health answered {resp.status} {text}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"engine at {self.cfg.engine_url} is unreachable: {_reason(exc)}"

    async def _engine_post(self, path: str, body: dict[str, str]) -> tuple[int, str]:
        try:
            async with self.session.post(path, json=body) as resp:
                return resp.status, (await resp.text()).strip()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineError(f"{self.cfg.engine_url}{path}: {_reason(exc)}") from exc

    async def load(self, name: str, uri: str, *, managed: bool) -> _Loaded:
        """Fetch the adapter, then load it into the engine (ArtefactError, EngineError)."""
        parsed = parse_uri(uri)
        path = await asyncio.to_thread(fetch, parsed, self.cfg.settings)
        load_path = LORA_PATHS[self.cfg.engine][0]
        status, text = await self._engine_post(
            load_path, {"lora_name": name, "lora_path": str(path)}
        )
        if status != 200 and not (status == 400 and "already" in text):
            raise EngineError(f"{self.cfg.engine_url}{load_path} {name}: {status} {text}")
        loaded = _Loaded(uri, str(path), managed)
        self.state.loaded[name] = loaded
        log.info("loaded LoRA adapter %s from %s (%s)", name, uri, path)
        return loaded

    async def unload(self, name: str) -> None:
        unload_path = LORA_PATHS[self.cfg.engine][1]
        status, text = await self._engine_post(unload_path, {"lora_name": name})
        if status not in (200, 404):  # 404: the engine no longer has it (restarted)
            raise EngineError(f"{self.cfg.engine_url}{unload_path} {name}: {status} {text}")
        self.state.loaded.pop(name, None)
        log.info("unloaded LoRA adapter %s", name)

    # ------------------------------------------------------------------ the adapters file

    async def sync(self) -> None:
        """Make the engine's file-managed adapters match the adapters file."""
        if self.cfg.adapters_file is None:
            self.state.synced = True
            return
        try:
            desired = read_adapters(self.cfg.adapters_file)
        except ValueError as exc:
            if self.state.problems.get("file") != str(exc):
                log.error("%s", exc)
            self.state.problems["file"] = str(exc)
            return
        self.state.problems.pop("file", None)
        async with self.state.lock:
            managed = {n: a.uri for n, a in self.state.loaded.items() if a.managed}
            load, unload = plan_sync(desired, managed)
            for name in unload:
                try:
                    await self.unload(name)
                except EngineError as exc:
                    self._problem(name, f"unload: {exc}")
            for name in load:
                if name in self.state.loaded:  # loaded through the API: the file takes it over
                    self.state.loaded[name].managed = True
                    if self.state.loaded[name].uri == desired[name]:
                        continue
                    await self.unload(name)
                try:
                    await self.load(name, desired[name], managed=True)
                except (ArtefactError, EngineError, ValueError) as exc:
                    self._problem(name, str(exc))
                else:
                    self.state.problems.pop(name, None)
            for name in list(self.state.problems):
                if name != "file" and name not in desired:
                    del self.state.problems[name]
            self.state.synced = True

    def _problem(self, name: str, reason: str) -> None:
        if self.state.problems.get(name) != reason:
            log.error("LoRA adapter %s: %s", name, reason)
        self.state.problems[name] = reason

    async def _sync_loop(self) -> None:
        while True:
            if await self.engine_health() is None:
                try:
                    await self.sync()
                except Exception:  # keep syncing; the next round may succeed
                    log.exception("LoRA adapter sync failed")
            # until the first sync (the pod's readiness waits for it), look at the engine often:
            # a starting engine's pod turns Ready as soon as it is healthy, not a period later
            first = min(self.cfg.sync_interval, FIRST_SYNC_POLL)
            await asyncio.sleep(self.cfg.sync_interval if self.state.synced else first)

    # ------------------------------------------------------------------ HTTP handlers

    async def health(self, request: web.Request) -> web.Response:
        reason = await self.engine_health()
        return web.Response(text="ok") if reason is None else web.Response(status=503, text=reason)

    async def ready(self, request: web.Request) -> web.Response:
        reasons = []
        engine = await self.engine_health()
        if engine is not None:
            reasons.append(engine)
        elif not self.state.synced:
            reasons.append("LoRA adapters not loaded yet")
        reasons += [f"LoRA adapter {n}: {r}" if n != "file" else r
                    for n, r in sorted(self.state.problems.items())]  # fmt: skip
        if reasons:
            return web.Response(status=503, text="\n".join(reasons))
        return web.Response(text="ready")

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            async with self.session.get("/metrics") as resp:
                text = await resp.text()
                if resp.status != 200:
                    return web.Response(status=503, text=f"engine /metrics: HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.Response(status=503, text=f"engine /metrics: {_reason(exc)}")
        try:
            body = unify(text, self.cfg.engine)
        except ValueError as exc:
            return web.Response(status=502, text=f"engine /metrics is not Prometheus text: {exc}")
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def list_adapters(self, request: web.Request) -> web.Response:
        data = [{"name": n, "uri": a.uri, "path": a.path, "managed": a.managed}
                for n, a in sorted(self.state.loaded.items())]  # fmt: skip
        return web.json_response({"adapters": data})

    async def add_adapter(self, request: web.Request) -> web.Response:
        try:
            adapter = LoraAdapter.model_validate_json(await request.read())
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return _error(400, f"invalid adapter: {first['msg']}", "invalid_request_error", param)
        async with self.state.lock:
            if adapter.name in self.state.loaded:
                return _error(409, f"LoRA adapter {adapter.name!r} is already loaded",
                              "invalid_request_error", "name")  # fmt: skip
            try:
                loaded = await self.load(adapter.name, adapter.uri, managed=False)
            except ValueError as exc:
                return _error(400, str(exc), "invalid_request_error", "uri")
            except ArtefactError as exc:
                status = _ARTEFACT_STATUS.get(type(exc), 502)
                return _error(status, str(exc), "artefact_error", "uri")
            except EngineError as exc:
                return _error(502, str(exc), "engine_error")
        return web.json_response({"name": adapter.name, "uri": loaded.uri, "path": loaded.path})

    async def remove_adapter(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        async with self.state.lock:
            loaded = self.state.loaded.get(name)
            if loaded is None:
                return _error(404, f"LoRA adapter {name!r} is not loaded", "not_found", "name")
            if loaded.managed:
                return _error(409, f"LoRA adapter {name!r} comes from the adapters file; remove"
                              " it there", "invalid_request_error", "name")  # fmt: skip
            try:
                await self.unload(name)
            except EngineError as exc:
                return _error(502, str(exc), "engine_error")
        return web.json_response({"name": name, "unloaded": True})

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._sync_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._session is not None:
            await self._session.close()


def build_app(cfg: SidecarConfig) -> web.Application:
    sidecar = Sidecar(cfg)
    app = web.Application()
    r = app.router
    r.add_get("/health", sidecar.health)
    r.add_get("/ready", sidecar.ready)
    r.add_get("/metrics", sidecar.metrics)
    r.add_get("/v1/lora_adapters", sidecar.list_adapters)
    r.add_post("/v1/lora_adapters", sidecar.add_adapter)
    r.add_delete("/v1/lora_adapters/{name}", sidecar.remove_adapter)
    app.cleanup_ctx.append(sidecar._lifecycle)
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matrixinfer-runtime",
        formatter_class=HelpFormatter,
        description="The sidecar beside an engine: readiness, LoRA adapters, unified metrics.",
    )
    p.add_argument(
        "--engine", choices=ENGINE_KINDS, default="vllm", help="engine kind (default vllm)"
    )
    p.add_argument(
        "--engine-url",
        metavar="URL",
        default="http://127.0.0.1:8000",
        help="the engine's base URL (default http://127.0.0.1:8000)",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8100, help="port to listen on (default 8100)")
    p.add_argument(
        "--lora-adapters",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML list of {name, uri} (the Model's loraAdapters), loaded at start and kept in"
        " sync",
    )
    p.add_argument(
        "--sync-interval",
        type=duration,
        default="5s",
        metavar="DURATION",
        help="time between reads of the adapters file (default 5s)",
    )
    add_source_flags(p)
    add_service_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    configure_logging(ns.log_level, ns.log_format)
    try:
        cfg = SidecarConfig(
            engine=ns.engine,
            engine_url=ns.engine_url.rstrip("/"),
            settings=settings_from(ns),
            adapters_file=ns.lora_adapters,
            sync_interval=ns.sync_interval,
        )
    except ValueError as exc:
        print(f"matrixinfer-runtime: {exc}", file=sys.stderr)
        return 2
    web.run_app(build_app(cfg), host=ns.host, port=ns.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
