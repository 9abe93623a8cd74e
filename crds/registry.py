"""registry.matrixinfer.ai/v1alpha1: Model (one object that stands up a whole served model) and
AutoscalingPolicy (how replicas follow load)."""

from __future__ import annotations

import zoneinfo
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from crds.common import (
    DNS1035_LABEL,
    ApiModel,
    CelRule,
    Duration,
    EnvVars,
    ObjectMeta,
    ResourceRequirements,
    StatusBase,
    unique,
)
from crds.cron import CRON_PATTERN, parse_cron
from crds.networking import Access, RateLimit, RouteMatch

__all__ = [
    "REGISTRY_GROUP",
    "AutoscalingBehavior",
    "AutoscalingPolicy",
    "AutoscalingPolicyRef",
    "AutoscalingPolicySpec",
    "AutoscalingPolicyStatus",
    "AutoscalingRules",
    "AutoscalingTargetStatus",
    "Backend",
    "BackendStatus",
    "BackendWorker",
    "DisaggregatedTarget",
    "GatewayMetricSource",
    "HeterogeneousParam",
    "HeterogeneousTarget",
    "HomogeneousTarget",
    "LoraAdapter",
    "MetricSource",
    "MetricTarget",
    "Model",
    "ModelAutoscaling",
    "ModelSpec",
    "ModelStatus",
    "PanicPolicy",
    "PodMetricSource",
    "PrometheusMetricSource",
    "RatioConstraint",
    "ReplicaBounds",
    "ScaleDownBehavior",
    "ScalePolicy",
    "ScaleUpBehavior",
    "ScheduledMinimum",
    "TargetRef",
]

REGISTRY_GROUP = "registry.matrixinfer.ai"
API_VERSION: Literal["registry.matrixinfer.ai/v1alpha1"] = "registry.matrixinfer.ai/v1alpha1"

_MIN_LE_MAX = "minReplicas must not exceed maxReplicas"


def _min_le_max(s: Any) -> bool:
    return s.max_replicas is None or s.min_replicas <= s.max_replicas


_MIN_LE_MAX_RULE = CelRule(
    rule="!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
    message=_MIN_LE_MAX,
    check=_min_le_max,
    field_path=".minReplicas",
)


# --------------------------------------------------------------------------------------------
# AutoscalingPolicy


class MetricTarget(ApiModel):
    """A metric and the per-replica value the autoscaler aims for."""

    name: str = Field(
        description="Metric name as the sources report it, e.g. vllm:num_requests_waiting or"
        " gateway_queue_length.",
        min_length=1,
        max_length=256,
    )
    target_value: float = Field(description="Desired value per replica (> 0).", gt=0)


class ScalePolicy(ApiModel):
    """How fast replicas may change: at most `instances` or `percent` per `period`."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.instances) || has(self.percent)",
            message="a scaling policy needs instances or percent",
            check=lambda s: s.instances is not None or s.percent is not None,
        ),
    )

    instances: int | None = Field(
        default=None, description="Replicas that may be added/removed per period.", ge=1
    )
    percent: int | None = Field(
        default=None, description="Percent of current replicas that may change per period.", ge=1
    )
    period: Duration = Field(default="15s", description="Window the limits apply to.")
    select_policy: Literal["Or", "And"] = Field(
        default="Or",
        description="Or: the larger of the instances/percent limits applies; And: the smaller.",
    )
    stabilization_window: Duration | None = Field(
        default=None,
        description="Recommendations over this window are considered before acting (the"
        " most conservative wins).",
    )


class PanicPolicy(ApiModel):
    """Fast scale-up when load jumps past the panic threshold."""

    percent: int = Field(
        default=1000, description="Percent of current replicas that may be added per period.", ge=1
    )
    period: Duration = Field(default="1s", description="Window the limit applies to.")
    panic_threshold_percent: int = Field(
        default=200,
        description="Load (percent of target) that enters panic mode.",
        ge=110,
        le=1000,
    )
    panic_mode_hold: Duration = Field(
        default="60s", description="How long panic mode lasts after load falls back."
    )


class ScaleUpBehavior(ApiModel):
    """Scale-up policies."""

    stable_policy: ScalePolicy | None = Field(
        default=None, description="The normal scale-up limit."
    )
    panic_policy: PanicPolicy | None = Field(
        default=None, description="Panic mode; absent: no panic mode."
    )


class ScaleDownBehavior(ScalePolicy):
    """Scale-down limit."""


class AutoscalingBehavior(ApiModel):
    """Rate limits on replica changes."""

    scale_up: ScaleUpBehavior | None = Field(default=None, description="Scale-up behaviour.")
    scale_down: ScaleDownBehavior | None = Field(default=None, description="Scale-down behaviour.")


class TargetRef(ApiModel):
    """The workload whose replicas are scaled."""

    kind: Literal["ModelInfer"] = Field(default="ModelInfer", description="Kind of the target.")
    name: str = Field(description="Name of the target.", min_length=1, max_length=253)


class PodMetricSource(ApiModel):
    """Scrape the target's pods."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.name) || has(self.port)",
            message="a pod metric source needs a port or a port name",
            check=lambda s: s.name is not None or s.port is not None,
        ),
    )

    name: str | None = Field(
        default=None, description="Name of the container port to scrape.", max_length=15
    )
    port: int | None = Field(default=None, description="Port number to scrape.", ge=1, le=65535)
    path: str = Field(default="/metrics", description="HTTP path of the metrics.", max_length=1024)


class PrometheusMetricSource(ApiModel):
    """Ask a Prometheus server."""

    server_url: str = Field(
        alias="serverURL",
        description="Base URL of the Prometheus server.",
        min_length=1,
        max_length=2048,
        pattern=r"^https?://",
    )
    query: str = Field(
        description="PromQL query returning one value per target.", min_length=1, max_length=4096
    )


class GatewayMetricSource(ApiModel):
    """Queue length and in-flight requests reported by the gateway (extproc) — the signal that
    wakes a model scaled to zero."""

    model_server_name: str | None = Field(
        default=None,
        description="ModelServer whose queue and in-flight counts are read; absent: the one"
        " selecting the target's pods.",
        max_length=253,
    )


class MetricSource(ApiModel):
    """Where metric values come from: exactly one of pod, prometheus, gateway."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="(has(self.pod) ? 1 : 0) + (has(self.prometheus) ? 1 : 0)"
            " + (has(self.gateway) ? 1 : 0) == 1",
            message="a metric source needs exactly one of pod, prometheus or gateway",
            check=lambda s: sum(x is not None for x in (s.pod, s.prometheus, s.gateway)) == 1,
        ),
    )

    pod: PodMetricSource | None = Field(default=None, description="Scrape the pods.")
    prometheus: PrometheusMetricSource | None = Field(default=None, description="Query Prometheus.")
    gateway: GatewayMetricSource | None = Field(
        default=None, description="Use the gateway's queue and in-flight counts."
    )


_METRIC_SOURCES_DOC = "Where metric values come from; absent: the target's pods on /metrics."


class HomogeneousTarget(ApiModel):
    """Scale one ModelInfer."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (_MIN_LE_MAX_RULE,)

    target_ref: TargetRef = Field(description="The ModelInfer to scale.")
    metric_sources: list[MetricSource] | None = Field(
        default=None, description=_METRIC_SOURCES_DOC, max_length=4
    )
    min_replicas: int = Field(
        default=1, description="Fewest replicas; 0 allows scale to zero.", ge=0
    )
    max_replicas: int = Field(description="Most replicas.", ge=1)


class HeterogeneousParam(ApiModel):
    """One of several ModelInfers serving the same model at different costs."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (_MIN_LE_MAX_RULE,)

    target: TargetRef = Field(description="The ModelInfer.")
    cost: float = Field(description="Relative cost of one replica (> 0).", gt=0)
    min_replicas: int = Field(default=0, description="Fewest replicas of this target.", ge=0)
    max_replicas: int = Field(description="Most replicas of this target.", ge=1)


class HeterogeneousTarget(ApiModel):
    """Scale several ModelInfers together, filling the cheapest first."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.params.all(p, self.params.exists_one(q, q.target.name == p.target.name))",
            message="each target may appear only once in params",
            check=lambda s: unique([p.target.name for p in s.params]),
            field_path=".params",
        ),
    )

    params: list[HeterogeneousParam] = Field(
        description="The ModelInfers and their costs and bounds.", min_length=1, max_length=8
    )
    metric_sources: list[MetricSource] | None = Field(
        default=None, description=_METRIC_SOURCES_DOC, max_length=4
    )
    cost_expansion_rate_percent: int = Field(
        default=200,
        description="How far (percent of the cheapest cost) pricier targets may be filled"
        " before the cheapest is full.",
        ge=100,
    )


class ReplicaBounds(ApiModel):
    """Bounds on one role's replicas."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (_MIN_LE_MAX_RULE,)

    min_replicas: int = Field(default=1, description="Fewest role instances.", ge=0)
    max_replicas: int = Field(description="Most role instances.", ge=1)


class RatioConstraint(ApiModel):
    """prefill:decode role instances are kept near this ratio."""

    prefill: int = Field(description="Prefill part of the ratio.", ge=1)
    decode: int = Field(description="Decode part of the ratio.", ge=1)


class DisaggregatedTarget(ApiModel):
    """Scale the prefill and decode roles of one ModelInfer."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.prefillRole != self.decodeRole",
            message="prefillRole and decodeRole must differ",
            check=lambda s: s.prefill_role != s.decode_role,
            field_path=".decodeRole",
        ),
    )

    target_ref: TargetRef = Field(description="The ModelInfer whose roles are scaled.")
    metric_sources: list[MetricSource] | None = Field(
        default=None, description=_METRIC_SOURCES_DOC, max_length=4
    )
    prefill_role: str = Field(
        default="prefill", description="Name of the prefill role.", max_length=12
    )
    decode_role: str = Field(
        default="decode", description="Name of the decode role.", max_length=12
    )
    prefill: ReplicaBounds = Field(description="Bounds of the prefill role.")
    decode: ReplicaBounds = Field(description="Bounds of the decode role.")
    ratio_constraint: RatioConstraint | None = Field(
        default=None, description="prefill:decode ratio to keep; absent: independent."
    )


class AutoscalingRules(ApiModel):
    """Metrics, tolerance and behaviour: the part of a policy a Model can carry inline."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.metrics.all(m, self.metrics.exists_one(n, n.name == m.name))",
            message="metric names must be unique",
            check=lambda s: unique([m.name for m in s.metrics]),
            field_path=".metrics",
        ),
    )

    metrics: list[MetricTarget] = Field(
        description="Metrics and their per-replica targets; the largest demand wins.",
        min_length=1,
        max_length=8,
    )
    tolerance_percent: int = Field(
        default=10,
        description="No scaling while the load is within this percent of the target.",
        ge=0,
        le=100,
    )
    behavior: AutoscalingBehavior | None = Field(
        default=None, description="Limits on how fast replicas change."
    )


def _check_cron(value: str) -> str:
    try:
        parse_cron(value)
    except ValueError as exc:
        raise PydanticCustomError("cron", "{error}", {"error": str(exc)}) from None
    return value


def _check_time_zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError(
            "time_zone",
            "unknown time zone {value}: use an IANA name such as UTC or Europe/Paris",
            {"value": repr(value)},
        ) from None
    return value


def _at_most_a_day(s: Any) -> bool:
    from crds.common import parse_duration

    return parse_duration(s.duration) <= 86400


class ScheduledMinimum(ApiModel):
    """Warm capacity before a known peak: at least `minReplicas` for `duration` from every time
    `schedule` matches (in the policy's `timeZone`)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="duration(self.duration) <= duration('24h')",
            message="duration must be at most 24h",
            check=_at_most_a_day,
            field_path=".duration",
        ),
    )

    schedule: Annotated[
        str,
        AfterValidator(_check_cron),
        WithJsonSchema({"type": "string", "pattern": CRON_PATTERN, "maxLength": 128}),
    ] = Field(
        description="Five-field cron expression (minute hour day-of-month month day-of-week)"
        ' of the window starts, e.g. "30 7 * * MON-FRI".',
    )
    duration: Duration = Field(description="How long each window lasts (at most 24h).")
    min_replicas: int = Field(
        description="Fewest replicas during the window (the total over a heterogeneous or"
        " disaggregated target; still capped by the maximum).",
        ge=0,
    )


class AutoscalingPolicySpec(AutoscalingRules):
    """How replicas follow load, and the one target they belong to."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        *AutoscalingRules.cel_rules,
        CelRule(
            rule="(has(self.homogeneousTarget) ? 1 : 0) + (has(self.heterogeneousTarget) ? 1 : 0)"
            " + (has(self.disaggregatedTarget) ? 1 : 0) == 1",
            message="exactly one of homogeneousTarget, heterogeneousTarget or disaggregatedTarget",
            check=lambda s: (
                sum(
                    x is not None
                    for x in (s.homogeneous_target, s.heterogeneous_target, s.disaggregated_target)
                )
                == 1
            ),
        ),
    )

    homogeneous_target: HomogeneousTarget | None = Field(
        default=None, description="Scale one ModelInfer."
    )
    heterogeneous_target: HeterogeneousTarget | None = Field(
        default=None, description="Scale several ModelInfers by cost."
    )
    disaggregated_target: DisaggregatedTarget | None = Field(
        default=None, description="Scale the prefill and decode roles of one ModelInfer."
    )
    scheduled_minimums: list[ScheduledMinimum] | None = Field(
        default=None,
        description="Windows with a higher minimum (warm capacity before known peaks); the"
        " largest active one applies.",
        max_length=16,
    )
    time_zone: Annotated[
        str, AfterValidator(_check_time_zone), WithJsonSchema({"type": "string", "maxLength": 64})
    ] = Field(default="UTC", description="IANA time zone of scheduledMinimums.")


class AutoscalingTargetStatus(ApiModel):
    """What the autoscaler last decided for one target."""

    name: str = Field(description="Target ModelInfer (and role, as name/role).")
    current_replicas: int | None = Field(default=None, description="Replicas now.", ge=0)
    desired_replicas: int | None = Field(default=None, description="Replicas wanted.", ge=0)
    mode: Literal["Stable", "Panic"] | None = Field(default=None, description="Scaling mode.")
    last_scale_time: str | None = Field(
        default=None,
        description="When the replicas were last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    last_scale_reason: str | None = Field(
        default=None,
        description="Why the replicas were last changed: ScaleUp, ScaleDown, PanicScaleUp,"
        " WakeUp, ScaleToZero, Bounds, Scheduled or Rebalance.",
        max_length=64,
    )


class AutoscalingPolicyStatus(StatusBase):
    """Observed state of an AutoscalingPolicy."""

    targets: list[AutoscalingTargetStatus] | None = Field(
        default=None, description="Per target, the last decision.", max_length=16
    )


class AutoscalingPolicy(ApiModel):
    """An AutoscalingPolicy makes replicas follow load."""

    api_version: Literal["registry.matrixinfer.ai/v1alpha1"] = Field(
        default=API_VERSION, description="API version of the object."
    )
    kind: Literal["AutoscalingPolicy"] = Field(
        default="AutoscalingPolicy", description="Kind of the object."
    )
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard metadata.")
    spec: AutoscalingPolicySpec = Field(description="Desired behaviour.")
    status: AutoscalingPolicyStatus | None = Field(default=None, description="Observed state.")


# --------------------------------------------------------------------------------------------
# Model


class BackendWorker(ApiModel):
    """One role of a backend's InferGroup."""

    type: Literal["server", "prefill", "decode"] = Field(
        default="server", description="What the role does."
    )
    replicas: int = Field(default=1, description="Role instances per group.", ge=0, le=1024)
    pods: int = Field(
        default=1, description="Pods per role instance (entry pod plus workers).", ge=1, le=1025
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Resources of each pod of the role; absent: the backend's."
    )


def _disaggregated_workers(s: Backend) -> bool:
    if s.type != "vLLMDisaggregated":
        return True
    kinds = {w.type for w in s.workers or []}
    return "prefill" in kinds and "decode" in kinds


class Backend(ApiModel):
    """One way of serving the model (an engine, an image, a hardware shape)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        _MIN_LE_MAX_RULE,
        CelRule(
            rule="self.type != 'vLLMDisaggregated' || (has(self.workers)"
            " && self.workers.exists(w, w.type == 'prefill')"
            " && self.workers.exists(w, w.type == 'decode'))",
            message="a vLLMDisaggregated backend needs prefill and decode workers",
            check=_disaggregated_workers,
            field_path=".workers",
        ),
    )

    name: str = Field(
        description="Backend name (DNS-1035 label, at most 32 characters), unique in the Model.",
        min_length=1,
        max_length=32,
        pattern=DNS1035_LABEL,
    )
    type: Literal["vLLM", "SGLang", "vLLMDisaggregated"] = Field(description="Engine and topology.")
    model_uri: str = Field(
        alias="modelURI",
        description="Where the weights are: hf://org/name, s3://bucket/path, pvc://claim/path or"
        " file:///path.",
        min_length=6,
        max_length=2048,
        pattern=r"^(hf|s3|pvc|file)://.+$",
    )
    cache_uri: str | None = Field(
        default=None,
        alias="cacheURI",
        description="Where downloaded weights are cached (pvc://claim/path or hostpath:///dir);"
        " absent: an emptyDir.",
        max_length=2048,
        pattern=r"^(pvc|hostpath)://.+$",
    )
    image: str | None = Field(
        default=None,
        description="Engine image; absent: the platform default for the type.",
        max_length=1024,
    )
    command: list[str] | None = Field(
        default=None,
        description="The engine's command in place of the type's (vLLM: vllm serve, SGLang:"
        " python3 -m sglang.launch_server), e.g. the simulator's [matrixinfer-sim] with image set"
        " to the MatrixInfer image. With a command no engine arguments are derived: the container"
        " runs command, then config, then args, and its env names what would have been derived"
        " (MATRIXINFER_MODEL_PATH, MATRIXINFER_SERVED_MODEL_NAME, MATRIXINFER_PORT) for $(VAR)"
        " references in args.",
        min_length=1,
        max_length=16,
    )
    args: list[str] | None = Field(
        default=None, description="Extra engine command-line arguments.", max_length=256
    )
    config: dict[str, Any] | None = Field(
        default=None,
        description="Engine arguments as a map (key → value), rendered as --key value.",
    )
    env: EnvVars | None = Field(
        default=None, description="Environment variables of the engine container.", max_length=128
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Resources of each engine pod."
    )
    workers: list[BackendWorker] | None = Field(
        default=None,
        description="Roles of the InferGroup; absent: one server role of one pod.",
        max_length=4,
    )
    min_replicas: int = Field(default=1, description="Fewest InferGroups (0: scale to zero).", ge=0)
    max_replicas: int | None = Field(
        default=None, description="Most InferGroups; absent: minReplicas (no autoscaling).", ge=1
    )
    cost: float | None = Field(
        default=None,
        description="Relative cost of one replica, for heterogeneous scaling (> 0).",
        gt=0,
    )
    route_weight: int | None = Field(
        default=None,
        description="Share of traffic (0-100) in the generated ModelRoute; set on all backends"
        " or on none.",
        ge=0,
        le=100,
    )


class LoraAdapter(ApiModel):
    """A LoRA adapter served with the model."""

    name: str = Field(description="Name requests use as `model`.", min_length=1, max_length=256)
    uri: str = Field(
        description="Where the adapter is (hf://, s3://, pvc://, file://).",
        min_length=6,
        max_length=2048,
        pattern=r"^(hf|s3|pvc|file)://.+$",
    )


class AutoscalingPolicyRef(ApiModel):
    """An AutoscalingPolicy in the Model's namespace."""

    name: str = Field(description="Name of the AutoscalingPolicy.", min_length=1, max_length=253)


class ModelAutoscaling(ApiModel):
    """The Model's autoscaling: a reference to a policy, or the policy's rules inline (the
    targets come from the backends)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.ref) != has(self.spec)",
            message="autoscalingPolicy needs exactly one of ref or spec",
            check=lambda s: (s.ref is None) != (s.spec is None),
        ),
    )

    ref: AutoscalingPolicyRef | None = Field(
        default=None, description="An existing AutoscalingPolicy."
    )
    spec: AutoscalingRules | None = Field(
        default=None, description="Inline metrics, tolerance and behaviour."
    )


def _route_weights(s: ModelSpec) -> bool:
    set_ = [b.route_weight is not None for b in s.backends]
    return all(set_) or not any(set_)


class ModelSpec(ApiModel):
    """A served model: its backends and how it is routed, limited and scaled."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.backends.all(b, self.backends.exists_one(c, c.name == b.name))",
            message="backend names must be unique",
            check=lambda s: unique([b.name for b in s.backends]),
            field_path=".backends",
        ),
        CelRule(
            rule="self.backends.all(b, has(b.routeWeight))"
            " || self.backends.all(b, !has(b.routeWeight))",
            message="routeWeight must be set on all backends or on none",
            check=_route_weights,
            field_path=".backends",
        ),
        CelRule(
            rule="!has(self.loraAdapters) || self.loraAdapters.all(a,"
            " self.loraAdapters.exists_one(b, b.name == a.name))",
            message="LoRA adapter names must be unique",
            check=lambda s: unique([a.name for a in s.lora_adapters or []]),
            field_path=".loraAdapters",
        ),
    )

    backends: list[Backend] = Field(
        description="Ways of serving the model (1-8).", min_length=1, max_length=8
    )
    lora_adapters: list[LoraAdapter] | None = Field(
        default=None, description="LoRA adapters served with the model.", max_length=32
    )
    model_match: RouteMatch | None = Field(
        default=None, description="Extra match conditions copied into the generated ModelRoute."
    )
    rate_limit: RateLimit | None = Field(
        default=None, description="Copied into the generated ModelRoute."
    )
    access: Access | None = Field(default=None, description="Copied into the generated ModelRoute.")
    autoscaling_policy: ModelAutoscaling | None = Field(
        default=None, description="Autoscaling; absent: fixed minReplicas per backend."
    )


class BackendStatus(ApiModel):
    """Observed state of one backend."""

    name: str = Field(description="Backend name.")
    replicas: int | None = Field(default=None, description="InferGroups that exist.", ge=0)
    ready_replicas: int | None = Field(default=None, description="InferGroups ready.", ge=0)


class ModelStatus(StatusBase):
    """Observed state of a Model (conditions Initialized, Active, Failed)."""

    backends: list[BackendStatus] | None = Field(
        default=None, description="Per backend replicas and readiness.", max_length=8
    )


class Model(ApiModel):
    """A Model stands up a whole served model: ModelInfers, ModelServers, a ModelRoute and an
    AutoscalingPolicy, all owned by it."""

    api_version: Literal["registry.matrixinfer.ai/v1alpha1"] = Field(
        default=API_VERSION, description="API version of the object."
    )
    kind: Literal["Model"] = Field(default="Model", description="Kind of the object.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard metadata.")
    spec: ModelSpec = Field(description="Desired state.")
    status: ModelStatus | None = Field(default=None, description="Observed state.")
