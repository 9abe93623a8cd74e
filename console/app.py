"""The console's HTTP edge (FastAPI): the REST API under /api, its OpenAPI document at
/api/openapi.json, and the web UI's files at /. Handlers translate and delegate: decisions live
in `deployments`, `recommend`, `rules`, `gpus` and `auth`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path as FilePath
from typing import Annotated, Any

import aiohttp
import yaml
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import ConfigDict, Field

from console.auth import ACTIONS, Authenticator, CachedAuth, KubeAuth, StaticTokenAuth, User
from console.base import ApiType
from console.catalog import Catalog, Dtype, ModelCard, load_catalog
from console.deployments import (
    MODEL_INFER_LABEL,
    DeploymentForm,
    DeploymentView,
    deployment_view,
    form_to_model,
    model_document,
    model_from_yaml,
    validate_model,
)
from console.gpus import GpuPool, PriceTable, gpu_pools, load_prices
from console.kube import KubeClient, KubeError
from console.metrics import (
    ModelMetrics,
    PrometheusAnswerError,
    metrics_from_prometheus,
    model_metrics,
    prometheus_queries,
    query_value,
)
from console.recommend import Recommendation, recommend
from console.rules import EngineRules, EngineSpec, load_rules
from crds import InvalidObject
from crds.common import DNS1123_LABEL, DNS1123_SUBDOMAIN
from fleet.kubeconfig import KubeAccess

__all__ = ["ConsoleConfig", "ConsoleError", "create_app"]


@dataclass
class ConsoleConfig:
    kube: KubeAccess = field(default_factory=KubeAccess)  # where the API server is, how to log in
    namespace: str = "default"
    token: str | None = None  # a fixed token (local stack) instead of TokenReview
    auth_cache_seconds: float = 10.0  # how long TokenReview/SubjectAccessReview answers hold
    gateway_url: str | None = None  # where models are served (OpenAI API)
    gateway_metrics_url: str | None = None  # the gateway's Prometheus /metrics
    prometheus_url: str | None = None  # a Prometheus server (instant queries); before the above
    hf_endpoint: str | None = field(default_factory=lambda: os.environ.get("HF_ENDPOINT"))
    catalog_file: FilePath | None = None
    rules_file: FilePath | None = None
    prices_file: FilePath | None = None


class ConsoleError(Exception):
    """An error the API answers with: HTTP status, message, and the fields it concerns."""

    def __init__(
        self, status: int, message: str, fields: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields or []


class FieldError(ApiType):
    path: str
    message: str


class ErrorBody(ApiType):
    message: str
    fields: list[FieldError] = Field(default_factory=list)


class ErrorResponse(ApiType):
    error: ErrorBody


class DeploymentRequest(ApiType):
    """A deployment to create or replace: the wizard's form, or a whole Model in YAML."""

    model_config = ConfigDict(extra="forbid")

    form: DeploymentForm | None = None
    yaml: str | None = Field(default=None, description="A Model document (YAML or JSON).")


class Preview(ApiType):
    """What would be sent to the API server (`dryRun`)."""

    model: dict[str, Any]
    yaml: str


class Runtime(ApiType):
    name: str
    backend_type: str
    description: str
    features: list[str]
    requires: list[str] = Field(description="The rules' messages: what the engine needs.")


class ModelHit(ApiType):
    id: str
    source: str
    downloads: int | None = None
    likes: int | None = None


class ModelsAnswer(ApiType):
    catalog: list[ModelCard]
    huggingface: list[ModelHit]
    huggingface_error: str | None = Field(default=None)


class ChatMessage(ApiType):
    role: str
    content: str


class ChatRequest(ApiType):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)


_SUBDOMAIN = DNS1123_SUBDOMAIN
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No or invalid bearer token."},
    403: {"model": ErrorResponse, "description": "RBAC does not allow the action."},
}


class ConsoleMetrics:
    """The console's own series (``matrixinfer_console_*``), in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "matrixinfer_console_requests",
            "REST API requests by method, route (the path template) and HTTP status.",
            ["method", "route", "code"],
            registry=self.registry,
        )


class State:
    def __init__(self, cfg: ConsoleConfig) -> None:
        self.cfg = cfg
        self.metrics = ConsoleMetrics()
        self.kube = KubeClient(cfg.kube)
        self.catalog: Catalog = load_catalog(cfg.catalog_file)
        self.rules: EngineRules = load_rules(cfg.rules_file)
        self.prices: PriceTable = load_prices(cfg.prices_file)
        self.auth: Authenticator
        if cfg.token:
            self.auth = StaticTokenAuth(cfg.token)
        elif cfg.auth_cache_seconds > 0:
            self.auth = CachedAuth(KubeAuth(self.kube), ttl=cfg.auth_cache_seconds)
        else:
            self.auth = KubeAuth(self.kube)
        self.http: aiohttp.ClientSession | None = None


def _state(request: Request) -> State:
    st: State = request.app.state.console
    return st


Namespace = Annotated[
    str | None,
    Query(description="Namespace; absent: the console's.", pattern=DNS1123_LABEL, max_length=63),
]
Name = Annotated[
    str, Path(description="The deployment (Model) name.", pattern=DNS1123_LABEL, max_length=63)
]


def authorize(action: str) -> Callable[..., Awaitable[User]]:
    """A dependency: the caller's bearer token is valid and RBAC allows `action`."""
    act = ACTIONS[action]

    async def check(request: Request, namespace: Namespace = None) -> User:
        st = _state(request)
        user = await authenticated(request)
        ns = namespace or st.cfg.namespace
        name = request.path_params.get("name")
        ok, reason = await st.auth.allowed(user, act, ns, name)
        if not ok:
            what = f"{act.verb} {act.resource}" + (f"/{act.subresource}" if act.subresource else "")
            raise ConsoleError(
                403,
                f"user {user.name!r} may not {what} in namespace {ns!r}"
                + (f": {reason}" if reason else ""),
            )
        return user

    return check


async def authenticated(request: Request) -> User:
    """A dependency: a valid bearer token (enough for the catalog and the runtimes, which are not
    cluster data); `authorize` adds the RBAC check."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ConsoleError(401, "a bearer token is required (Authorization: Bearer <token>)")
    user = await _state(request).auth.authenticate(token.strip())
    if user is None:
        raise ConsoleError(401, "the bearer token is not valid")
    return user


def _from_kube(exc: KubeError, what: str) -> ConsoleError:
    status = exc.status if exc.status in (400, 403, 404, 409, 422) else 502
    return ConsoleError(status, f"{what}: {exc.message}")


def _model_of(body: DeploymentRequest, namespace: str) -> Any:
    if (body.form is None) == (body.yaml is None):
        raise ConsoleError(422, "give exactly one of form or yaml", [("", "form or yaml")])
    try:
        if body.form is not None:
            return validate_model(form_to_model(body.form, namespace), "form")
        assert body.yaml is not None
        return model_from_yaml(body.yaml, "yaml")
    except InvalidObject as exc:
        raise ConsoleError(422, str(exc), exc.errors) from None


async def _view(st: State, ns: str, raw: dict[str, Any], events: bool) -> DeploymentView:
    pods = await st.kube.list_pods(ns, MODEL_INFER_LABEL)
    evs = await st.kube.list_events(ns) if events else []
    return deployment_view(raw, pods, evs)


def create_app(cfg: ConsoleConfig) -> FastAPI:
    st = State(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await st.kube.start()
        st.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        try:
            yield
        finally:
            await st.http.close()
            await st.kube.close()

    app = FastAPI(
        title="MatrixInfer console",
        version="v1",
        description="Deploy, watch and use models: a deployment is a registry.matrixinfer.ai"
        " Model. Every /api call but /api/health needs `Authorization: Bearer <token>`; the"
        " console checks it with a Kubernetes TokenReview and each action with a"
        " SubjectAccessReview.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.console = st

    @app.exception_handler(ConsoleError)
    async def console_error(request: Request, exc: ConsoleError) -> JSONResponse:
        body = ErrorResponse(
            error=ErrorBody(
                message=exc.message, fields=[FieldError(path=p, message=m) for p, m in exc.fields]
            )
        )
        return JSONResponse(body.model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            FieldError(path=".".join(str(p) for p in e["loc"]), message=str(e["msg"]))
            for e in exc.errors()
        ]
        msg = "; ".join(f"{f.path}: {f.message}" for f in fields)
        body = ErrorResponse(error=ErrorBody(message=f"invalid request: {msg}", fields=fields))
        return JSONResponse(body.model_dump(), status_code=422)

    @app.exception_handler(KubeError)
    async def kube_error(request: Request, exc: KubeError) -> JSONResponse:
        return await console_error(request, _from_kube(exc, "Kubernetes API"))

    @app.get("/api/health", tags=["console"])
    async def health() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get(
        "/api/ready",
        tags=["console"],
        responses={503: {"model": ErrorResponse, "description": "The API server is unreachable."}},
    )
    async def ready() -> dict[str, str]:
        """Readiness: the Kubernetes API answers (a list of the default namespace's Models)."""
        try:
            await st.kube.list_models(cfg.namespace)
        except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
            raise ConsoleError(503, f"the Kubernetes API does not answer: {exc!s}") from None
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_page() -> Response:
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        if path.startswith("/api"):
            st.metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        return response

    @app.get("/api/deployments", tags=["deployments"], responses=ERRORS)
    async def list_deployments(
        user: Annotated[User, Depends(authorize("deployments.list"))], namespace: Namespace = None
    ) -> list[DeploymentView]:
        """Every Model of the namespace with its backends and pods (no events)."""
        ns = namespace or cfg.namespace
        models = await st.kube.list_models(ns)
        pods = await st.kube.list_pods(ns, MODEL_INFER_LABEL) if models else []
        return [deployment_view(m, pods, []) for m in models]

    @app.get("/api/deployments/{name}", tags=["deployments"], responses=ERRORS)
    async def get_deployment(
        name: Name,
        user: Annotated[User, Depends(authorize("deployments.get"))],
        namespace: Namespace = None,
    ) -> DeploymentView:
        """One Model with its status, backends, pods and events."""
        ns = namespace or cfg.namespace
        try:
            raw = await st.kube.get_model(ns, name)
        except KubeError as exc:
            raise _from_kube(exc, f"deployment {name!r}") from None
        return await _view(st, ns, raw, events=True)

    @app.post(
        "/api/deployments",
        tags=["deployments"],
        status_code=201,
        responses={**ERRORS, 422: {"model": ErrorResponse, "description": "Invalid Model."}},
    )
    async def create_deployment(
        body: DeploymentRequest,
        user: Annotated[User, Depends(authorize("deployments.create"))],
        namespace: Namespace = None,
        dry_run: Annotated[bool, Query(alias="dryRun")] = False,
    ) -> DeploymentView | Preview:
        """Create a Model from the wizard's form or from YAML. With `dryRun` nothing is
        created: the Model is validated and returned (the wizard's YAML preview)."""
        ns = namespace or cfg.namespace
        model = _model_of(body, ns)
        doc = model_document(model)
        doc["metadata"]["namespace"] = doc["metadata"].get("namespace") or ns
        if doc["metadata"]["namespace"] != ns:
            raise ConsoleError(
                422,
                f"metadata.namespace {doc['metadata']['namespace']!r} is not the request's"
                f" namespace {ns!r}",
                [("metadata.namespace", "must be the request's namespace")],
            )
        if dry_run:
            return Preview(model=doc, yaml=yaml.safe_dump(doc, sort_keys=False))
        try:
            raw = await st.kube.create_model(ns, doc)
        except KubeError as exc:
            raise _from_kube(exc, f"create deployment {model.metadata.name!r}") from None
        return deployment_view(raw, [], [])

    @app.put(
        "/api/deployments/{name}",
        tags=["deployments"],
        responses={**ERRORS, 422: {"model": ErrorResponse, "description": "Invalid Model."}},
    )
    async def update_deployment(
        name: Name,
        body: DeploymentRequest,
        user: Annotated[User, Depends(authorize("deployments.update"))],
        namespace: Namespace = None,
    ) -> DeploymentView:
        """Replace the Model's spec (and labels/annotations) with the form's or the YAML's."""
        ns = namespace or cfg.namespace
        model = _model_of(body, ns)
        if model.metadata.name != name:
            raise ConsoleError(
                422,
                f"metadata.name {model.metadata.name!r} is not the deployment {name!r}",
                [("metadata.name", "must be the deployment's name")],
            )
        try:
            raw = await st.kube.replace_model(ns, name, model_document(model))
        except KubeError as exc:
            raise _from_kube(exc, f"update deployment {name!r}") from None
        return await _view(st, ns, raw, events=False)

    @app.delete("/api/deployments/{name}", tags=["deployments"], responses=ERRORS)
    async def delete_deployment(
        name: Name,
        user: Annotated[User, Depends(authorize("deployments.delete"))],
        namespace: Namespace = None,
    ) -> dict[str, str]:
        """Delete the Model (its children go with it: they are owned by it)."""
        ns = namespace or cfg.namespace
        try:
            await st.kube.delete_model(ns, name)
        except KubeError as exc:
            raise _from_kube(exc, f"delete deployment {name!r}") from None
        return {"deleted": name, "namespace": ns}

    @app.get(
        "/api/deployments/{name}/logs",
        tags=["deployments"],
        responses={**ERRORS, 200: {"content": {"text/plain": {}}}},
        response_class=StreamingResponse,
    )
    async def deployment_logs(
        name: Name,
        user: Annotated[User, Depends(authorize("deployments.logs"))],
        namespace: Namespace = None,
        pod: Annotated[
            str | None,
            Query(description="A pod of the deployment; absent: its first.", pattern=_SUBDOMAIN),
        ] = None,
        container: Annotated[str | None, Query(pattern=DNS1123_LABEL)] = None,
        follow: bool = False,
        tail_lines: Annotated[int | None, Query(alias="tailLines", ge=0)] = None,
    ) -> StreamingResponse:
        """A pod's log through the Kubernetes API (`follow`: streamed as it grows)."""
        ns = namespace or cfg.namespace
        try:
            raw = await st.kube.get_model(ns, name)
        except KubeError as exc:
            raise _from_kube(exc, f"deployment {name!r}") from None
        view = await _view(st, ns, raw, events=False)
        pods = [p.name for b in view.backends for p in b.pods]
        if not pods:
            raise ConsoleError(404, f"deployment {name!r} has no pods yet")
        chosen = pod or pods[0]
        if chosen not in pods:
            raise ConsoleError(
                404, f"pod {chosen!r} is not a pod of deployment {name!r} (its pods: {pods})"
            )
        stream = st.kube.pod_log(ns, chosen, container, follow, tail_lines)
        try:
            first = await anext(stream, b"")
        except KubeError as exc:
            raise _from_kube(exc, f"log of pod {chosen!r}") from None

        async def body() -> AsyncIterator[bytes]:
            if first:
                yield first
            async for chunk in stream:
                yield chunk

        return StreamingResponse(body(), media_type="text/plain; charset=utf-8")

    @app.get("/api/deployments/{name}/metrics", tags=["deployments"], responses=ERRORS)
    async def deployment_metrics(
        name: Name,
        user: Annotated[User, Depends(authorize("deployments.metrics"))],
        namespace: Namespace = None,
    ) -> ModelMetrics:
        """Requests, errors, mean time to first token and output tokens/s of the deployment's
        model name, from Prometheus (instant queries, every gateway replica) when the console
        has a Prometheus URL, else from the gateway's /metrics."""
        if cfg.prometheus_url:
            return await _prometheus_metrics(st, cfg.prometheus_url, name)
        if not cfg.gateway_metrics_url:
            raise ConsoleError(
                503, "no metrics source configured (--prometheus or --gateway-metrics)"
            )
        assert st.http is not None
        try:
            async with st.http.get(
                cfg.gateway_metrics_url, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise ConsoleError(502, f"gateway metrics: HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConsoleError(502, f"gateway metrics unreachable: {exc!r}") from None
        return model_metrics(text, name)

    @app.post(
        "/api/deployments/{name}/chat",
        tags=["deployments"],
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
        response_class=StreamingResponse,
    )
    async def chat(
        name: Name,
        body: ChatRequest,
        user: Annotated[User, Depends(authorize("deployments.chat"))],
        namespace: Namespace = None,
    ) -> StreamingResponse:
        """A streamed chat completion from the deployment, through the gateway (the OpenAI
        API's server-sent events, passed on as they come)."""
        if not cfg.gateway_url:
            raise ConsoleError(503, "no gateway URL configured (--gateway)")
        assert st.http is not None
        payload: dict[str, Any] = {
            "model": name,
            "messages": [m.model_dump() for m in body.messages],
            "stream": True,
        }
        if body.max_tokens:
            payload["max_tokens"] = body.max_tokens
        url = cfg.gateway_url.rstrip("/") + "/v1/chat/completions"
        try:
            resp = await st.http.post(url, json=payload)
        except aiohttp.ClientError as exc:
            raise ConsoleError(502, f"gateway unreachable: {exc!r}") from None
        if resp.status != 200:
            text = await resp.text()
            resp.release()
            raise ConsoleError(resp.status, f"gateway: {text[:500]}")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        return StreamingResponse(relay(), media_type="text/event-stream")

    @app.get("/api/models", tags=["catalog"], responses=ERRORS)
    async def models(
        user: Annotated[User, Depends(authenticated)],
        q: Annotated[str, Query(description="Search text; empty: the whole catalog.")] = "",
    ) -> ModelsAnswer:
        """The catalog's models matching `q`, plus Hugging Face search results when
        HF_ENDPOINT is set and reachable."""
        cards = st.catalog.search(q) if q else list(st.catalog.models.values())
        hits: list[ModelHit] = []
        error = None
        if q and cfg.hf_endpoint:
            assert st.http is not None
            try:
                async with st.http.get(
                    cfg.hf_endpoint.rstrip("/") + "/api/models",
                    params={"search": q, "limit": "20"},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as resp:
                    found = await resp.json(content_type=None) if resp.status == 200 else []
                    if resp.status != 200:
                        error = f"HTTP {resp.status}"
                hits = [
                    ModelHit(
                        id=str(h.get("id") or h.get("modelId")),
                        source="huggingface",
                        downloads=h.get("downloads"),
                        likes=h.get("likes"),
                    )
                    for h in found
                    if isinstance(h, dict) and (h.get("id") or h.get("modelId"))
                ]
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = f"{cfg.hf_endpoint} unreachable: {exc!r}"
        return ModelsAnswer(catalog=cards, huggingface=hits, huggingface_error=error)

    @app.get("/api/runtimes", tags=["catalog"], responses=ERRORS)
    async def runtimes(user: Annotated[User, Depends(authenticated)]) -> list[Runtime]:
        """The engines the rule file defines and what each needs."""
        return [_runtime(e) for e in st.rules.engines]

    @app.get("/api/gpus", tags=["catalog"], responses=ERRORS)
    async def gpus(
        user: Annotated[User, Depends(authorize("recommendations"))],
    ) -> list[GpuPool]:
        """The cluster's GPU shapes, from node labels and allocatable resources."""
        return gpu_pools(await st.kube.list_nodes(), st.prices)

    @app.get("/api/recommendations", tags=["catalog"], responses=ERRORS)
    async def recommendations(
        user: Annotated[User, Depends(authorize("recommendations"))],
        model: Annotated[str, Query(description="Catalog id, e.g. Qwen/Qwen2.5-7B-Instruct.")],
        dtype: Dtype | None = None,
        context_length: Annotated[int | None, Query(alias="contextLength", gt=0)] = None,
        concurrency: Annotated[int, Query(gt=0, le=4096)] = 16,
        lora: bool = False,
    ) -> Recommendation:
        """Which engines and GPU shapes fit the model, with the memory arithmetic and the
        hourly cost of one replica."""
        card = st.catalog.get(model)
        if card is None:
            raise ConsoleError(
                404, f"model {model!r} is not in the catalog", [("model", "unknown model")]
            )
        pools = gpu_pools(await st.kube.list_nodes(), st.prices)
        return recommend(
            card,
            pools,
            st.rules,
            dtype=dtype,
            context_length=context_length,
            concurrency=concurrency,
            lora=lora,
            currency=st.prices.currency,
        )

    web = resources.files("console").joinpath("web")

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/ui/index.html")

    app.mount("/ui", StaticFiles(directory=str(web), html=True), name="ui")
    return app


async def _prometheus_metrics(st: State, base: str, model: str) -> ModelMetrics:
    """The figures of ``model`` from the Prometheus HTTP API at ``base`` (one instant query per
    figure, at once); an unreachable server or a failed query is a 502 naming it."""
    assert st.http is not None
    url = base.rstrip("/") + "/api/v1/query"
    queries = prometheus_queries(model)

    async def one(field_name: str, query: str) -> tuple[str, float | None]:
        try:
            async with st.http.get(  # type: ignore[union-attr]
                url, params={"query": query}, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ConsoleError(502, f"Prometheus at {base} unreachable: {exc!r}") from None
        try:
            return field_name, query_value(answer)
        except PrometheusAnswerError as exc:
            raise ConsoleError(502, f"Prometheus query {query!r}: {exc}") from None

    values = await asyncio.gather(*(one(f, q) for f, q in queries.items()))
    return metrics_from_prometheus(model, dict(values))


def _runtime(e: EngineSpec) -> Runtime:
    return Runtime(
        name=e.name,
        backend_type=e.backend_type,
        description=e.description,
        features=e.features,
        requires=[r.message or r.rule for r in e.requires],
    )
