"""Configuration from a directory of multi-document YAML files, watched for changes.

Kinds read (one directory, any number of ``*.yaml`` / ``*.yml`` files, ``---``-separated):

- ``networking.matrixinfer.ai/v1alpha1`` ``ModelRoute`` and ``ModelServer`` — validated by ``crds``;
- ``gateway.matrixinfer.ai/v1alpha1`` ``Endpoints`` — the pods a standalone gateway serves::

      apiVersion: gateway.matrixinfer.ai/v1alpha1
      kind: Endpoints
      metadata: {name: my-vllm}
      spec:
        endpoints:
        - name: vllm-0                 # pod name (metrics, logs, x-inference-pod)
          address: 10.0.0.5:8000       # host:port, or host (then the ModelServer's workloadPort)
          labels: {app: llama}         # matched by ModelServer.spec.workloadSelector.matchLabels
          ready: true                  # optional, default true

- ``gateway.matrixinfer.ai/v1alpha1`` ``GatewayConfig`` — gateway-wide settings; today
  ``spec.scheduler`` (the default scheduler profile: ``filters`` / ``scorers`` of
  ``{name, weight, args}``), used by ModelServers that set no ``scheduler`` of their own.

A directory is applied whole or not at all: one bad document rejects the change, the error names
the file, the document, the object and the field, and the last good configuration stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.config import GatewayConfig, StaticEndpoint
from fleet.plugins import check_profile
from fleet.profile import Profile, SchedulerProfile

__all__ = [
    "ConfigError",
    "ConfigWatcher",
    "EndpointEntry",
    "Endpoints",
    "GatewayConfigDocument",
    "load_directory",
]

log = logging.getLogger("matrixinfer.extproc.config")


class ConfigError(Exception):
    """A configuration directory that cannot be applied; the message names file, object, field."""


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str | None = None


class EndpointEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=253, description="Pod name.")
    address: str = Field(min_length=1, description="host:port, or host with the server's port.")
    labels: dict[str, str] = Field(default_factory=dict)
    ready: bool = True


class _EndpointsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    endpoints: list[EndpointEntry] = Field(default_factory=list)


class Endpoints(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["gateway.matrixinfer.ai/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Endpoints"]
    metadata: _Meta
    spec: _EndpointsSpec


class _GatewaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheduler: SchedulerProfile | None = None


class GatewayConfigDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["gateway.matrixinfer.ai/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GatewayConfig"]
    metadata: _Meta
    spec: _GatewaySpec = Field(default_factory=_GatewaySpec)


_OWN_KINDS: dict[str, type[BaseModel]] = {
    "Endpoints": Endpoints,
    "GatewayConfig": GatewayConfigDocument,
}


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(exc: ValidationError, where: str, kind: str, name: str) -> str:
    parts = [f"{_field_path(err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()]
    return f'{where}: {kind} "{name}": ' + "; ".join(parts)


def _documents(path: Path) -> list[tuple[int, Any]]:
    """(line where it starts, content) of each YAML document of ``path``; raises OSError or
    ``yaml.YAMLError``."""
    loader = yaml.SafeLoader(path.read_text())
    loader.name = str(path)
    out: list[tuple[int, Any]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                out.append((node.start_mark.line + 1, loader.construct_document(node)))
    finally:
        loader.dispose()
    return out


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        column = mark.column + 1
        return f"{path}:{mark.line + 1}: not readable YAML: {exc.problem} (column {column})"
    return f"{path}: not readable YAML: {exc}"


def _config_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))


def load_directory(directory: Path | str) -> GatewayConfig:
    """Read and validate every document; raise :class:`ConfigError` listing every problem."""
    import crds

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"configuration directory {directory} does not exist")
    config = GatewayConfig(source=str(directory))
    errors: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for path in _config_files(directory):
        try:
            documents = _documents(path)
        except OSError as exc:
            errors.append(f"{path}: not readable: {exc}")
            continue
        except yaml.YAMLError as exc:
            errors.append(_yaml_error(path, exc))
            continue
        for index, (line, doc) in enumerate(documents, start=1):
            if doc is None:
                continue
            where = f"{path}:{line} (document {index})"
            if not isinstance(doc, dict):
                errors.append(f"{where}: a document must be a mapping with apiVersion and kind")
                continue
            kind = str(doc.get("kind", ""))
            name = str((doc.get("metadata") or {}).get("name", "?"))
            if kind in _OWN_KINDS:
                try:
                    obj = _OWN_KINDS[kind].model_validate(doc)
                except ValidationError as exc:
                    errors.append(_describe(exc, where, kind, name))
                    continue
                objects: list[Any] = [obj]
            else:
                try:
                    objects = list(crds.load_documents(yaml.safe_dump(doc), where))
                except crds.InvalidObject as exc:
                    errors.append(str(exc))
                    continue
            for obj in objects:
                obj_kind = getattr(obj, "kind", kind)
                key = (obj_kind, f"{obj.metadata.namespace or 'default'}/{obj.metadata.name}")
                if key in seen:
                    errors.append(
                        f"{where}: {obj_kind} '{obj.metadata.name}' is defined twice "
                        f"(also in {seen[key]})"
                    )
                    continue
                seen[key] = where
                if isinstance(obj, Endpoints):
                    config.endpoints.extend(
                        StaticEndpoint(e.name, e.address, dict(e.labels), e.ready, where)
                        for e in obj.spec.endpoints
                    )
                elif isinstance(obj, GatewayConfigDocument):
                    if config.scheduler_profile is not None:
                        errors.append(f"{where}: only one GatewayConfig may set a scheduler")
                    config.scheduler_profile = obj.spec.scheduler
                elif obj_kind == "ModelRoute":
                    config.routes.append(obj)
                elif obj_kind == "ModelServer":
                    config.servers.append(obj)
                else:
                    log.warning(
                        "%s: %s '%s' is not used by the gateway (it reads ModelRoute, ModelServer,"
                        " Endpoints and GatewayConfig); ignored",
                        where,
                        obj_kind,
                        obj.metadata.name,
                    )
    errors.extend(_check_profiles(config, seen))
    names: dict[str, str] = {}
    for endpoint in config.endpoints:
        if endpoint.name in names:
            errors.append(
                f"{endpoint.source}: endpoint '{endpoint.name}' is listed twice "
                f"(also in {names[endpoint.name]})"
            )
        names[endpoint.name] = endpoint.source
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def _check_profiles(config: GatewayConfig, seen: dict[tuple[str, str], str]) -> list[str]:
    """Scheduler profiles are checked at load against the plugin catalogue (unknown plugins or
    arguments, :func:`fleet.plugins.check_profile`), not on a request."""
    errors: list[str] = []
    checks: list[tuple[str, str, Profile]] = []
    for (kind, key), where in seen.items():
        if kind == "GatewayConfig" and config.scheduler_profile is not None:
            checks.append(
                (where, f'GatewayConfig "{key.split("/", 1)[1]}"', config.scheduler_profile)
            )
    for server in config.servers:
        if server.spec.scheduler is not None:
            key = f"{server.metadata.namespace or 'default'}/{server.metadata.name}"
            where = seen.get(("ModelServer", key), "?")
            checks.append((where, f'ModelServer "{server.metadata.name}"', server.spec.scheduler))
    for where, who, checked in checks:
        try:
            check_profile(checked)
        except ValueError as exc:
            errors.append(f"{where}: {who}: spec.{exc}")
    return errors


def _fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        return tuple(
            (p.name, st.st_mtime_ns, st.st_size)
            for p in _config_files(directory)
            for st in (p.stat(),)
        )
    except OSError:
        return ()


@dataclass(slots=True)
class ReloadStatus:
    applied: int = 0
    rejected: int = 0
    last_error: str | None = None


class ConfigWatcher:
    """Polls a directory's file names, sizes and mtimes; loads and applies on change."""

    def __init__(
        self,
        directory: Path | str,
        apply: Callable[[GatewayConfig], None],
        *,
        interval: float = 1.0,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.apply = apply
        self.interval = interval
        self.on_result = on_result
        self.status = ReloadStatus()
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self._task: asyncio.Task[None] | None = None

    def load_now(self) -> bool:
        """Load synchronously (used at start-up); True when the configuration was applied."""
        self._fingerprint = _fingerprint(self.directory)
        try:
            config = load_directory(self.directory)
        except ConfigError as exc:
            return self._rejected(str(exc))
        return self._applied(config)

    def _applied(self, config: GatewayConfig) -> bool:
        self.apply(config)
        self.status.applied += 1
        self.status.last_error = None
        log.info(
            "configuration from %s applied: %d ModelRoutes, %d ModelServers, %d endpoints",
            self.directory,
            len(config.routes),
            len(config.servers),
            len(config.endpoints),
        )
        if self.on_result:
            self.on_result(True)
        return True

    def _rejected(self, message: str) -> bool:
        self.status.rejected += 1
        self.status.last_error = message
        log.error("configuration rejected, the last good configuration stays:\n%s", message)
        if self.on_result:
            self.on_result(False)
        return False

    async def check(self) -> bool | None:
        """Reload when the files changed; None when nothing changed."""
        fingerprint = await asyncio.to_thread(_fingerprint, self.directory)
        if fingerprint == self._fingerprint:
            return None
        self._fingerprint = fingerprint
        try:
            config = await asyncio.to_thread(load_directory, self.directory)
        except ConfigError as exc:
            return self._rejected(str(exc))
        return self._applied(config)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # never let the watcher die
                log.exception("configuration check failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="config-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
