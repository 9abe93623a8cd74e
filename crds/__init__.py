"""The MatrixInfer API (v1alpha1) as pydantic models — the one source of truth for the CRDs.

Kinds: ModelRoute, ModelServer (networking.matrixinfer.ai), ModelInfer (workload.matrixinfer.ai),
Model, AutoscalingPolicy (registry.matrixinfer.ai). Attributes are snake_case; JSON/YAML names are
camelCase. ``parse_object`` / ``load_documents`` validate documents and raise ``InvalidObject``
with the source, kind, name and field path of every problem. ``python -m crds`` regenerates the
CRD YAML next to this file; ``python -m crds --check`` reports drift.
"""

from crds.common import (
    ApiModel,
    CelRule,
    Condition,
    ObjectMeta,
    StringMatch,
    parse_duration,
    resolve_int_or_percent,
)
from crds.loading import (
    KINDS,
    InvalidObject,
    Resource,
    dump_documents,
    load_documents,
    parse_object,
    to_dict,
)
from crds.networking import (
    Access,
    ModelRoute,
    ModelRouteSpec,
    ModelServer,
    ModelServerSpec,
    RateLimit,
    RouteRule,
    RouteTarget,
    SchedulerPlugin,
)
from crds.registry import AutoscalingPolicy, AutoscalingPolicySpec, Model, ModelSpec
from crds.workload import ModelInfer, ModelInferSpec, Role

__all__ = [
    "KINDS",
    "Access",
    "ApiModel",
    "AutoscalingPolicy",
    "AutoscalingPolicySpec",
    "CelRule",
    "Condition",
    "InvalidObject",
    "Model",
    "ModelInfer",
    "ModelInferSpec",
    "ModelRoute",
    "ModelRouteSpec",
    "ModelServer",
    "ModelServerSpec",
    "ModelSpec",
    "ObjectMeta",
    "RateLimit",
    "Resource",
    "Role",
    "RouteRule",
    "RouteTarget",
    "SchedulerPlugin",
    "StringMatch",
    "dump_documents",
    "load_documents",
    "parse_duration",
    "parse_object",
    "resolve_int_or_percent",
    "to_dict",
]
