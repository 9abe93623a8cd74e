"""Deployments: a deployment is a ``Model``. The form a user fills in, the Model it becomes, and
the view of a Model with its pods and events (pure: objects come in as the API's JSON)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field

from console.base import ApiType
from crds import InvalidObject, Model, parse_object, to_dict
from crds.common import DNS1123_LABEL

__all__ = [
    "GPU_PRODUCT_ANNOTATION",
    "MODEL_INFER_LABEL",
    "BackendView",
    "DeploymentForm",
    "DeploymentView",
    "EventView",
    "PodView",
    "deployment_view",
    "form_to_model",
    "model_document",
    "model_from_yaml",
    "pod_view",
    "related_names",
    "validate_model",
]

MODEL_INFER_LABEL = "workload.matrixinfer.ai/model-infer"  # set on every pod of a ModelInfer
GPU_PRODUCT_ANNOTATION = "console.matrixinfer.ai/gpu-product"
Phase = Literal["Pending", "Deploying", "Ready", "Failed"]
"""A deployment's phase, from the Model's conditions: Failed, else Active (Ready), else
Initialized (Deploying), else Pending."""
_NAME = re.compile(DNS1123_LABEL)
NAME_MAX = 40  # the generated children are named <model>-<backend>; labels stop at 63


class DeploymentForm(ApiType):
    """The deploy wizard's answers: one backend of one engine on one GPU shape."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="Name of the Model (a DNS label); requests use it as `model`.")
    model_uri: str = Field(
        alias="modelURI", description="Weights: hf://org/name, s3://, pvc:// or file://."
    )
    backend_type: Literal["vLLM", "SGLang", "vLLMDisaggregated"] = Field(
        default="vLLM", alias="backendType", description="Engine and topology."
    )
    backend_name: str = Field(default="main", alias="backendName", description="Backend name.")
    gpus: int = Field(default=1, ge=0, le=8, description="GPUs per engine pod (tensor parallel).")
    gpu_product: str | None = Field(
        default=None,
        alias="gpuProduct",
        description="The GPU product the recommendation chose, recorded in the annotation"
        f" {GPU_PRODUCT_ANNOTATION} (a Model backend has no node selector: pods are not pinned).",
    )
    replicas: int = Field(default=1, ge=0, description="InferGroups to run (minReplicas).")
    max_replicas: int | None = Field(
        default=None, alias="maxReplicas", description="Most InferGroups (autoscaling)."
    )
    context_length: int | None = Field(
        default=None, alias="contextLength", gt=0, description="--max-model-len of the engine."
    )
    dtype: str | None = Field(default=None, description="--dtype of the engine.")
    image: str | None = Field(default=None, description="Engine image override.")
    lora_adapters: dict[str, str] | None = Field(
        default=None, alias="loraAdapters", description="Adapter name → URI."
    )
    namespace: str | None = Field(default=None, description="Namespace; absent: the console's.")


def form_to_model(form: DeploymentForm, namespace: str) -> dict[str, Any]:
    """The Model document the form describes (not validated yet: see ``validate_model``)."""
    config: dict[str, Any] = {}
    if form.gpus > 1:
        config["tensor-parallel-size"] = form.gpus
    if form.context_length:
        config["max-model-len"] = form.context_length
    if form.dtype:
        config["dtype"] = form.dtype
    backend: dict[str, Any] = {
        "name": form.backend_name,
        "type": form.backend_type,
        "modelURI": form.model_uri,
        "minReplicas": form.replicas,
    }
    if form.max_replicas is not None:
        backend["maxReplicas"] = form.max_replicas
    if form.image:
        backend["image"] = form.image
    if config:
        backend["config"] = config
    if form.gpus:
        backend["resources"] = {"limits": {"nvidia.com/gpu": form.gpus}}
    if form.backend_type == "vLLMDisaggregated":
        backend["workers"] = [{"type": "prefill"}, {"type": "decode"}]
    spec: dict[str, Any] = {"backends": [backend]}
    if form.lora_adapters:
        spec["loraAdapters"] = [{"name": k, "uri": v} for k, v in form.lora_adapters.items()]
    meta: dict[str, Any] = {"name": form.name, "namespace": form.namespace or namespace}
    if form.gpu_product:
        meta["annotations"] = {GPU_PRODUCT_ANNOTATION: form.gpu_product}
    return {
        "apiVersion": "registry.matrixinfer.ai/v1alpha1",
        "kind": "Model",
        "metadata": meta,
        "spec": spec,
    }


def validate_model(doc: Any, source: str = "request") -> Model:
    """A Model, validated by ``crds`` (the webhook's rules) plus a usable name; raises
    ``InvalidObject`` naming each field."""
    obj = parse_object(doc, source)
    if not isinstance(obj, Model):
        raise InvalidObject(source, obj.kind, obj.metadata.name, [("kind", "must be Model")])
    name = obj.metadata.name
    if not name:
        raise InvalidObject(source, "Model", None, [("metadata.name", "required field is missing")])
    if len(name) > NAME_MAX or not _NAME.match(name):
        raise InvalidObject(
            source,
            "Model",
            name,
            [
                (
                    "metadata.name",
                    f"must be a DNS label (lowercase letters, digits, '-') of at most"
                    f" {NAME_MAX} characters (got {name!r})",
                )
            ],
        )
    return obj


def model_from_yaml(text: str, source: str = "request") -> Model:
    """One Model from YAML text (a single document)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidObject(source, None, None, [("", f"invalid YAML: {exc}")]) from None
    if len(docs) != 1:
        raise InvalidObject(source, None, None, [("", f"expected one document, got {len(docs)}")])
    return validate_model(docs[0], source)


def model_document(model: Model) -> dict[str, Any]:
    """What the console sends to the API server: the given fields only."""
    return to_dict(model, exclude_unset=True)


class PodView(ApiType):
    name: str
    phase: str
    ready: bool
    ip: str | None
    node: str | None
    model_infer: str | None


class BackendView(ApiType):
    name: str
    type: str
    model_uri: str = Field(alias="modelURI")
    replicas: int | None
    ready_replicas: int | None
    pods: list[PodView]


class EventView(ApiType):
    type: str
    reason: str
    message: str
    count: int
    last_timestamp: str | None
    object: str


class DeploymentView(ApiType):
    """A Model as the console shows it."""

    name: str
    namespace: str
    phase: Phase
    message: str
    created: str | None
    backends: list[BackendView]
    events: list[EventView]
    model: dict[str, Any] = Field(description="The Model object as the API server returned it.")


def pod_view(raw: Mapping[str, Any]) -> PodView:
    meta, status = raw.get("metadata") or {}, raw.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return PodView(
        name=str(meta.get("name", "")),
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        ip=status.get("podIP"),
        node=(raw.get("spec") or {}).get("nodeName"),
        model_infer=(meta.get("labels") or {}).get(MODEL_INFER_LABEL),
    )


def _phase(raw: Mapping[str, Any]) -> tuple[Phase, str]:
    conds = {c.get("type"): c for c in (raw.get("status") or {}).get("conditions") or []}
    phases: tuple[tuple[str, Phase], ...] = (
        ("Failed", "Failed"),
        ("Active", "Ready"),
        ("Initialized", "Deploying"),
    )
    for kind, phase in phases:
        c = conds.get(kind)
        if c and c.get("status") == "True":
            return phase, str(c.get("message") or "")
    return "Pending", "waiting for the Model controller"


def deployment_view(
    raw: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]
) -> DeploymentView:
    """The Model ``raw`` with its backends' pods (by the ModelInfer label) and the events of
    the Model, its children and its pods (others in ``events`` are left out)."""
    meta = raw.get("metadata") or {}
    name = str(meta.get("name", ""))
    statuses = {b.get("name"): b for b in (raw.get("status") or {}).get("backends") or []}
    pod_views = [pod_view(p) for p in pods]
    backends = []
    for b in (raw.get("spec") or {}).get("backends") or []:
        bname = str(b.get("name", ""))
        st = statuses.get(bname) or {}
        child = f"{name}-{bname}"
        backends.append(
            BackendView(
                name=bname,
                type=str(b.get("type", "")),
                model_uri=str(b.get("modelURI", "")),
                replicas=st.get("replicas"),
                ready_replicas=st.get("readyReplicas"),
                pods=[p for p in pod_views if p.model_infer == child],
            )
        )
    own = related_names(raw) | {p.name for b in backends for p in b.pods}
    event_views = [
        EventView(
            type=str(e.get("type") or "Normal"),
            reason=str(e.get("reason") or ""),
            message=str(e.get("message") or ""),
            count=int(e.get("count") or 1),
            last_timestamp=e.get("lastTimestamp") or e.get("eventTime"),
            object=f"{(e.get('involvedObject') or {}).get('kind', '')}/"
            f"{(e.get('involvedObject') or {}).get('name', '')}",
        )
        for e in events
        if (e.get("involvedObject") or {}).get("name") in own
    ]
    event_views.sort(key=lambda e: e.last_timestamp or "")
    phase, message = _phase(raw)
    return DeploymentView(
        name=name,
        namespace=str(meta.get("namespace", "")),
        phase=phase,
        message=message,
        created=meta.get("creationTimestamp"),
        backends=backends,
        events=event_views,
        model=dict(raw),
    )


def related_names(raw: Mapping[str, Any]) -> set[str]:
    """Names of the Model and of the children it generates (their events belong to it)."""
    name = str((raw.get("metadata") or {}).get("name", ""))
    out = {name}
    for b in (raw.get("spec") or {}).get("backends") or []:
        out.add(f"{name}-{b.get('name', '')}")
    return out
