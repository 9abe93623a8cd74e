"""Kopf admission handlers for the five kinds: translate a request to a ``rules`` call and its
:class:`~controllers.webhooks.rules.Review` to Kopf's answer (``kopf.AdmissionError`` to deny,
``warnings`` to warn, the ``patch`` to mutate).

The other objects a rule needs (routes' claims, Models' LoRA adapters, ModelServer and
ModelInfer names) are listed from the API server per request (:class:`Reader`). Two objects
admitted at the same moment may both pass a cross-object rule (neither is stored yet); the
ModelRoute status controller still reports the loser (``Accepted=False``, ``ModelNameTaken``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import kopf

from controllers.kube import ApiError, KubeClient
from controllers.metrics import ControllerMetrics
from controllers.webhooks import rules
from controllers.webhooks.certs import self_signed
from crds import AutoscalingPolicy, Model, ModelInfer, ModelRoute, ModelServer

__all__ = ["Reader", "WebhookConfig", "configure", "register"]

MANAGED = "matrixinfer.ai"
"""Name of the ValidatingWebhookConfiguration and MutatingWebhookConfiguration Kopf manages."""

DENIED = 422  # the HTTP code of a denial: the object is unprocessable as written

KINDS: dict[str, tuple[str, str]] = {  # kind -> (group, plural)
    "Model": ("registry.matrixinfer.ai", "models"),
    "AutoscalingPolicy": ("registry.matrixinfer.ai", "autoscalingpolicies"),
    "ModelInfer": ("workload.matrixinfer.ai", "modelinfers"),
    "ModelServer": ("networking.matrixinfer.ai", "modelservers"),
    "ModelRoute": ("networking.matrixinfer.ai", "modelroutes"),
}
VERSION = "v1alpha1"
OPERATIONS: tuple[Literal["CREATE"], Literal["UPDATE"]] = ("CREATE", "UPDATE")


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Where the webhook server listens and how the API server reaches it."""

    port: int
    addr: str = "0.0.0.0"  # listening address
    host: str | None = None  # the host name in the webhooks' URL (and the certificate)
    cert_dir: str | None = None  # tls.crt + tls.key given (e.g. cert-manager); None: self-signed
    managed: str | None = MANAGED  # None: the webhook configurations are made by someone else


def configure(settings: kopf.OperatorSettings, config: WebhookConfig) -> None:
    """Serve admission on ``config.port`` over HTTPS and let Kopf keep the webhook
    configurations named ``config.managed`` up to date."""
    if config.cert_dir:
        certfile, keyfile = Path(config.cert_dir, "tls.crt"), Path(config.cert_dir, "tls.key")
        for f in (certfile, keyfile):
            if not f.is_file():
                raise ValueError(f"--webhook-cert-dir: {f} is missing")
    else:
        names = [config.host or "", config.addr, "localhost", "127.0.0.1"]
        cert = self_signed(n for n in names if n not in ("", "0.0.0.0", "::"))
        certfile, keyfile = cert.certfile, cert.keyfile
    settings.admission.server = kopf.WebhookServer(
        addr=config.addr,
        port=config.port,
        host=config.host,
        certfile=str(certfile),
        pkeyfile=str(keyfile),
    )
    settings.admission.managed = config.managed


def _answer(review: rules.Review, warnings: list[str]) -> None:
    warnings.extend(review.warnings)
    if not review.allowed:
        raise kopf.AdmissionError(review.message(), code=DENIED)


def _skip(body: Mapping[str, Any], kwargs: Mapping[str, Any]) -> bool:
    """An update that leaves the spec as it was is allowed unchecked (``rules.needs_review``)."""
    return not rules.needs_review(body, kwargs.get("old"))


def _parsed(body: Mapping[str, Any]) -> Any:
    obj = rules.parse(body)
    if isinstance(obj, rules.Review):
        raise kopf.AdmissionError(obj.message(), code=DENIED)
    return obj


class Reader:
    """The other objects the rules need, read from the API server when a request comes.

    Read per request rather than from Kopf indices: a paused peer (``--peering``) stops its
    watches while its webhook server keeps answering, so an index there would go stale.
    Namespaced kinds are read in the namespaces the operator watches (all when cluster-wide)."""

    def __init__(self, namespaces: Sequence[str] = ()) -> None:
        self.namespaces = list(namespaces)
        self.client: KubeClient | None = None

    def connect(self, info: kopf.ConnectionInfo) -> None:
        self.client = KubeClient(info)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def items(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace`` (None: every watched namespace)."""
        group, plural = KINDS[kind]
        base = f"/apis/{group}/{VERSION}"
        if namespace is not None:
            paths = [f"{base}/namespaces/{namespace}/{plural}"]
        elif self.namespaces:
            paths = [f"{base}/namespaces/{ns}/{plural}" for ns in self.namespaces]
        else:
            paths = [f"{base}/{plural}"]
        if self.client is None:
            raise kopf.AdmissionError(f"cannot read {kind}s yet: not logged in", code=503)
        out: list[dict[str, Any]] = []
        for path in paths:
            try:
                doc = await self.client.get(path)
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                message = f"cannot read {kind}s to check the object: {exc}"
                raise kopf.AdmissionError(message, code=503) from None
            out.extend(i for i in (doc or {}).get("items") or () if isinstance(i, dict))
        return out


def _names(items: Iterable[Mapping[str, Any]]) -> list[str]:
    return [str((i.get("metadata") or {}).get("name")) for i in items]


Handler = Callable[..., Any]


def measured(metrics: ControllerMetrics | None, handler_id: str) -> Callable[[Handler], Handler]:
    """Count each answer of the handler by result (allowed, denied, error: a 5xx denial or an
    exception) and time it (``matrixinfer_controller_admission_*``)."""

    def decorate(fn: Handler) -> Handler:
        if metrics is None:
            return fn

        async def answer(**kwargs: Any) -> None:
            began = time.perf_counter()
            result = "allowed"
            try:
                out = fn(**kwargs)
                if inspect.isawaitable(out):
                    await out
            except kopf.AdmissionError as exc:
                result = "error" if (exc.code or 0) >= 500 else "denied"
                raise
            except Exception:
                result = "error"
                raise
            finally:
                metrics.admission_reviews.labels(handler_id, result).inc()
                metrics.admission_duration.labels(handler_id).observe(time.perf_counter() - began)

        return answer

    return decorate


def register(
    registry: kopf.OperatorRegistry, reader: Reader, metrics: ControllerMetrics | None = None
) -> None:
    """One validating handler per kind, plus the ModelServer defaulting handler; ``metrics``
    counts and times their answers."""

    def on(kind: str) -> dict[str, Any]:
        group, plural = KINDS[kind]
        return {"group": group, "version": VERSION, "plural": plural, "registry": registry}

    # -- validation ----------------------------------------------------------------------------
    @kopf.on.validate(**on("ModelRoute"), id="validate-modelroute", operations=OPERATIONS)
    @measured(metrics, "validate-modelroute")
    async def validate_route(body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
        if _skip(body, kwargs):
            return
        route: ModelRoute = _parsed(body)
        held = rules.held_names((), await reader.items("ModelRoute"))
        ns = route.metadata.namespace or "default"
        servers = _names(await reader.items("ModelServer", ns))
        _answer(rules.check_model_route(route, held.claims, servers), warnings)

    @kopf.on.validate(**on("Model"), id="validate-model", operations=OPERATIONS)
    @measured(metrics, "validate-model")
    async def validate_model(body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
        if _skip(body, kwargs):
            return
        model: Model = _parsed(body)
        held = rules.held_names(await reader.items("Model"), await reader.items("ModelRoute"))
        _answer(rules.check_model(model, held.adapters, held.claims), warnings)

    @kopf.on.validate(**on("ModelServer"), id="validate-modelserver", operations=OPERATIONS)
    @measured(metrics, "validate-modelserver")
    def validate_server(body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
        if _skip(body, kwargs):
            return
        server: ModelServer = _parsed(body)
        _answer(rules.check_model_server(server), warnings)

    @kopf.on.validate(**on("ModelInfer"), id="validate-modelinfer", operations=OPERATIONS)
    @measured(metrics, "validate-modelinfer")
    def validate_infer(body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
        if _skip(body, kwargs):
            return
        new: ModelInfer = _parsed(body)
        old: kopf.Body | None = kwargs.get("old")
        before: ModelInfer | None = None
        live = 0
        if old:
            parsed = rules.parse(old)
            before = parsed if isinstance(parsed, ModelInfer) else None
            live = int((old.get("status") or {}).get("replicas") or 0)
        _answer(rules.check_model_infer(new, before, live), warnings)

    @kopf.on.validate(
        **on("AutoscalingPolicy"), id="validate-autoscalingpolicy", operations=OPERATIONS
    )
    @measured(metrics, "validate-autoscalingpolicy")
    async def validate_policy(body: kopf.Body, warnings: list[str], **kwargs: Any) -> None:
        if _skip(body, kwargs):
            return
        policy: AutoscalingPolicy = _parsed(body)
        ns = policy.metadata.namespace or "default"
        infers = _names(await reader.items("ModelInfer", ns))
        _answer(rules.check_autoscaling_policy(policy, infers), warnings)

    # -- defaulting ----------------------------------------------------------------------------
    @kopf.on.mutate(**on("ModelServer"), id="default-modelserver", operations=OPERATIONS)
    @measured(metrics, "default-modelserver")
    def default_server(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        for path, value in rules.defaults(body):
            target: Any = patch
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = value
