"""How a MatrixInfer program reaches the Kubernetes API: the flags, the configuration, the token.

Every program that talks to the API (``matrixinfer-extproc --source kubernetes``,
``matrixinfer-xds --source kubernetes``, ``matrixinfer-controllers``) takes the same flags
(:func:`add_kube_args`) and resolves them the same way (:meth:`KubeAccess.load`), first match wins:

1. ``--server URL``: that API server, no credentials (emulators, ``kubectl proxy``);
2. ``--kubeconfig PATH``, else ``$KUBECONFIG`` (``:``-separated files, merged), else
   ``~/.kube/config`` — with ``--context NAME`` or the file's ``current-context``;
3. the in-cluster service account (``$KUBERNETES_SERVICE_HOST`` and the mounted token).

Loading, TLS settings and every kind of kubeconfig user (token, ``tokenFile``, client
certificates, ``exec`` plugins, OIDC) are ``kubernetes_asyncio``'s loaders; this module keeps
the result fresh: the in-cluster token is re-read by the library every minute, an ``exec``
plugin's token is fetched again before its ``expirationTimestamp``, and any request the API
server answers with 401 loads the configuration again (token files re-read, plugins re-run)
and is retried once. A missing or broken configuration is a :class:`KubeConfigError` whose
message is one line naming what is wrong; the programs print it and exit with code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = [
    "DEFAULT_KUBECONFIG",
    "NO_CONFIGURATION",
    "KubeAccess",
    "KubeConfigError",
    "KubeCredentials",
    "add_kube_args",
]

log = logging.getLogger("matrixinfer.kube")

DEFAULT_KUBECONFIG = "~/.kube/config"
NO_CONFIGURATION = "no Kubernetes configuration: set --kubeconfig, $KUBECONFIG or run in a cluster"
_EXPIRY_MARGIN = datetime.timedelta(seconds=30)  # fetch an exec plugin's token this much early


class KubeConfigError(Exception):
    """No usable Kubernetes configuration; the message is one line naming what is wrong."""


def add_kube_args(parser: argparse.ArgumentParser) -> None:
    """``--kubeconfig``, ``--context`` and ``--server``, spelled the same in every program."""
    group = parser.add_argument_group("Kubernetes API")
    group.add_argument(
        "--kubeconfig",
        metavar="PATH",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else the in-cluster "
        "service account)",
    )
    group.add_argument(
        "--context",
        metavar="NAME",
        default=None,
        help="kubeconfig context (default: the kubeconfig's current-context)",
    )
    group.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="API server URL used without credentials (emulators, kubectl proxy)",
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        what = f"{exc.filename}: " if exc.filename else ""
        text = f"{what}no such file or command (a file it names, or its exec plugin)"
    elif isinstance(exc, TypeError | KeyError | AttributeError | AssertionError):
        text = f"not a valid kubeconfig ({type(exc).__name__}: {exc})"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _library_quiet() -> Iterator[None]:
    """The library logs its loading errors itself; ours say the same in one line."""
    library = logging.getLogger("kubernetes_asyncio.config.kube_config")
    was = library.disabled
    library.disabled = True
    try:
        yield
    finally:
        library.disabled = was


@dataclass(frozen=True, slots=True)
class _Tls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext | bool:
        if not (self.ca_file or self.cert_file or not self.verify):
            return True  # the system's trust store
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


@dataclass(slots=True)
class _Loaded:
    """One load of the configuration: the library's ``Configuration`` and what we read off it."""

    configuration: Any  # kubernetes_asyncio.client.Configuration
    tls: _Tls
    expiry: datetime.datetime | None = None  # an exec plugin's token: fetch again before


class KubeCredentials:
    """Where the API server is and how to authenticate to it, kept fresh.

    :meth:`request` is how every client here sends a request: it adds the current
    ``Authorization`` and, on a 401, loads the credentials again and retries once.
    """

    def __init__(
        self,
        base: str,
        origin: str,
        *,
        loaded: _Loaded | None = None,
        reload: Callable[[], Awaitable[_Loaded]] | None = None,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self.base = base.rstrip("/")
        self.origin = origin  # for log lines: "--server URL", "kubeconfig PATH (context X)", ...
        self._loaded = loaded
        self._reload = reload
        self._static_headers = dict(headers or {})
        self._ssl = loaded.tls.context() if loaded is not None else ssl_context
        self.generation = 0  # +1 per reload
        self._lock = asyncio.Lock()

    @classmethod
    def static(
        cls,
        base: str,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> KubeCredentials:
        """Fixed credentials (a ``--server`` URL, or a connection someone else refreshes)."""
        return cls(base, f"server {base}", headers=headers, ssl_context=ssl_context)

    @property
    def ssl(self) -> ssl.SSLContext | bool:
        return self._ssl

    @property
    def tls(self) -> _Tls:
        return self._loaded.tls if self._loaded is not None else _Tls()

    @property
    def expiry(self) -> datetime.datetime | None:
        return self._loaded.expiry if self._loaded is not None else None

    @property
    def refreshable(self) -> bool:
        return self._reload is not None

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An aiohttp session with this API server's TLS settings (no auth headers: those are
        added per request by :meth:`request`, as the token changes)."""
        limit = kwargs.pop("limit", 100)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=limit), **kwargs
        )

    async def headers(self) -> dict[str, str]:
        """The current ``Authorization`` header (empty without credentials)."""
        loaded = self._loaded
        if loaded is None:
            return dict(self._static_headers)
        if loaded.expiry is not None and _now() >= loaded.expiry - _EXPIRY_MARGIN:
            await self.refresh(self.generation)
            loaded = self._loaded
            assert loaded is not None
        # runs the library's refresh hook (the in-cluster token file is re-read every minute)
        token = await loaded.configuration.get_api_key_with_prefix("BearerToken")
        # strip: a token file written by hand ends in a newline (client-go trims it too)
        return {"Authorization": str(token).strip()} if token else {}

    async def refresh(self, seen: int | None = None) -> None:
        """Load the configuration again (token files re-read, exec plugins re-run).

        ``seen``: the :attr:`generation` the caller's failed request used; when another task
        has reloaded since, nothing is done (one reload per expired token, not one per task).
        """
        if self._reload is None:
            return
        async with self._lock:
            if seen is not None and seen != self.generation:
                return
            try:
                loaded = await self._reload()
            except KubeConfigError as exc:
                log.error("loading the Kubernetes credentials again failed: %s", exc)
                return  # the old ones stay; the next 401 tries again
            self._loaded = loaded
            self._ssl = loaded.tls.context()
            self.generation += 1
            log.info("Kubernetes credentials loaded again from %s", self.origin)

    @contextlib.asynccontextmanager
    async def request(
        self, session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``session.request`` with the current credentials; a 401 reloads them and retries."""
        extra: dict[str, str] = dict(kwargs.pop("headers", None) or {})
        for attempt in (0, 1):
            generation = self.generation
            headers = {**extra, **await self.headers()}
            resp = await session.request(method, url, headers=headers, **kwargs)
            if resp.status == 401 and attempt == 0 and self._reload is not None:
                resp.release()
                log.info(
                    "the API server answered 401 to %s %s: loading credentials again", method, url
                )
                await self.refresh(generation)
                continue
            try:
                yield resp
            finally:
                resp.release()
            return


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def _aware(moment: datetime.datetime) -> datetime.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


def _tls_of(configuration: Any) -> _Tls:
    return _Tls(
        ca_file=configuration.ssl_ca_cert or None,
        cert_file=configuration.cert_file or None,
        key_file=configuration.key_file or None,
        verify=bool(configuration.verify_ssl),
    )


@dataclass(frozen=True, slots=True)
class KubeAccess:
    """What the flags say about reaching the API server (see the module's docstring)."""

    server: str | None = None
    kubeconfig: str | None = None
    context: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KubeAccess:
        return cls(
            server=getattr(args, "server", None),
            kubeconfig=getattr(args, "kubeconfig", None),
            context=getattr(args, "context", None),
        )

    async def load(self, environ: Mapping[str, str] | None = None) -> KubeCredentials:
        """Resolve and load; :class:`KubeConfigError` (one line) when nothing usable is found."""
        env = os.environ if environ is None else environ
        if self.server:
            if self.kubeconfig or self.context:
                raise KubeConfigError("--server takes no --kubeconfig or --context")
            if not self.server.startswith(("http://", "https://")):
                raise KubeConfigError(f"--server {self.server}: not an http:// or https:// URL")
            return KubeCredentials.static(self.server)
        files = self._kubeconfig_files(env)
        if files is not None:
            return await self._from_kubeconfig(files)
        if self.context:
            raise KubeConfigError(
                f"--context {self.context}: no kubeconfig (set --kubeconfig or $KUBECONFIG)"
            )
        if env.get("KUBERNETES_SERVICE_HOST"):
            return await self._in_cluster(env)
        raise KubeConfigError(NO_CONFIGURATION)

    def _kubeconfig_files(self, env: Mapping[str, str]) -> tuple[str, str] | None:
        """(files as the library takes them, how they were chosen), or None: no kubeconfig."""
        if self.kubeconfig:
            path = os.path.expanduser(self.kubeconfig)
            if not os.path.isfile(path):
                raise KubeConfigError(f"--kubeconfig {self.kubeconfig}: no such file")
            if os.path.getsize(path) == 0:
                raise KubeConfigError(f"--kubeconfig {self.kubeconfig}: the file is empty")
            return path, f"kubeconfig {self.kubeconfig}"
        listed = env.get("KUBECONFIG", "")
        if listed:
            found = [p for p in listed.split(os.pathsep) if p and os.path.isfile(p)]
            if not found:
                raise KubeConfigError(f"$KUBECONFIG={listed}: no such file")
            return os.pathsep.join(found), f"kubeconfig $KUBECONFIG={listed}"
        default = os.path.expanduser(DEFAULT_KUBECONFIG)
        if os.path.isfile(default):
            return default, f"kubeconfig {DEFAULT_KUBECONFIG}"
        return None

    async def _from_kubeconfig(self, files: tuple[str, str]) -> KubeCredentials:
        path, origin = files
        if self.context:
            origin += f" (context {self.context})"

        async def load() -> _Loaded:
            from kubernetes_asyncio import client, config

            configuration = client.Configuration()
            try:
                with _library_quiet():
                    loader = await config.load_kube_config(
                        config_file=path,
                        context=self.context,
                        client_configuration=configuration,
                        persist_config=False,
                    )
            except Exception as exc:  # the library's errors: ConfigException, YAML, KeyError...
                raise KubeConfigError(f"{origin}: {_one_line(exc)}") from None
            expiry = getattr(loader, "exec_plugin_expiry", None)
            if not str(configuration.host or "").startswith(("http://", "https://")):
                raise KubeConfigError(f"{origin}: the cluster has no server URL")
            return _Loaded(
                configuration, _tls_of(configuration), _aware(expiry) if expiry else None
            )

        loaded = await load()
        return KubeCredentials(str(loaded.configuration.host), origin, loaded=loaded, reload=load)

    async def _in_cluster(self, env: Mapping[str, str]) -> KubeCredentials:
        if self.context:
            raise KubeConfigError(f"--context {self.context}: needs a kubeconfig")
        origin = "in-cluster service account"

        async def load() -> _Loaded:
            from kubernetes_asyncio import client, config

            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration, environ=dict(env))  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise KubeConfigError(f"{origin}: {_one_line(exc)}") from None
            return _Loaded(configuration, _tls_of(configuration))

        loaded = await load()
        return KubeCredentials(str(loaded.configuration.host), origin, loaded=loaded, reload=load)
