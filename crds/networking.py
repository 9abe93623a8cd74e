"""networking.matrixinfer.ai/v1alpha1: ModelRoute (which requests go where) and ModelServer (a
set of pods that serve one model)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from crds.common import (
    DNS1123_SUBDOMAIN,
    ApiModel,
    CelRule,
    Duration,
    ObjectMeta,
    SecretKeyRef,
    StatusBase,
    StringMatch,
    UniqueNames,
    unique,
)

__all__ = [
    "NETWORKING_GROUP",
    "Access",
    "GlobalRateLimit",
    "KVConnector",
    "KVEvents",
    "ModelRoute",
    "ModelRouteSpec",
    "ModelRouteStatus",
    "ModelServer",
    "ModelServerSpec",
    "ModelServerStatus",
    "PDGroup",
    "ParentReference",
    "PassiveHealth",
    "QueuePolicy",
    "RateLimit",
    "RedisConfig",
    "RetryPolicy",
    "RouteMatch",
    "RouteRule",
    "RouteTarget",
    "SchedulerPlugin",
    "SchedulerProfile",
    "TrafficPolicy",
    "WorkloadPort",
    "WorkloadSelector",
]

NETWORKING_GROUP = "networking.matrixinfer.ai"

Labels = dict[str, Annotated[str, Field(max_length=63)]]
"""Pod labels (values bounded like Kubernetes label values, which also bounds CEL cost)."""
API_VERSION: Literal["networking.matrixinfer.ai/v1alpha1"] = "networking.matrixinfer.ai/v1alpha1"


# --------------------------------------------------------------------------------------------
# ModelRoute


class ParentReference(ApiModel):
    """A Gateway API ParentReference: a gateway (or a listener of it) that serves this route."""

    group: str = Field(
        default="gateway.networking.k8s.io",
        description="API group of the parent.",
        max_length=253,
    )
    kind: str = Field(default="Gateway", description="Kind of the parent.", max_length=63)
    namespace: str | None = Field(
        default=None,
        description="Namespace of the parent; defaults to the route's namespace.",
        max_length=63,
    )
    name: str = Field(description="Name of the parent.", min_length=1, max_length=253)
    section_name: str | None = Field(
        default=None,
        description="A listener of the parent (by name); absent means all listeners.",
        max_length=253,
    )
    port: int | None = Field(
        default=None, description="Listener port of the parent.", ge=1, le=65535
    )


class RouteMatch(ApiModel):
    """Conditions on the request; all given conditions must hold."""

    headers: dict[str, StringMatch] | None = Field(
        default=None,
        description="Request headers (name, case-insensitive) and how each value must match.",
        max_length=16,
    )
    uri: StringMatch | None = Field(default=None, description="How the request path must match.")


class RouteTarget(ApiModel):
    """A ModelServer that receives (a weighted share of) the matched requests."""

    model_server_name: str = Field(
        description="Name of a ModelServer in the route's namespace.",
        min_length=1,
        max_length=253,
        pattern=DNS1123_SUBDOMAIN,
    )
    weight: int | None = Field(
        default=None,
        description="Relative share of requests (0-100). Set on all targets of a rule or on none"
        " (none: equal shares).",
        ge=0,
        le=100,
    )


def _weights_all_or_none(targets: list[RouteTarget]) -> bool:
    set_ = [t.weight is not None for t in targets]
    return all(set_) or not any(set_)


def _weights_positive(targets: list[RouteTarget]) -> bool:
    if not all(t.weight is not None for t in targets):
        return True
    return any((t.weight or 0) > 0 for t in targets)


class RouteRule(ApiModel):
    """One rule of a route: a match and the targets of the requests it matches."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.targets.all(t, has(t.weight)) || self.targets.all(t, !has(t.weight))",
            message="weights must be set on all targets or on none",
            check=lambda s: _weights_all_or_none(s.targets),
            field_path=".targets",
        ),
        CelRule(
            rule="!self.targets.all(t, has(t.weight)) || self.targets.exists(t, t.weight > 0)",
            message="the target weights must add up to more than 0",
            check=lambda s: _weights_positive(s.targets),
            field_path=".targets",
        ),
        CelRule(
            rule="self.targets.all(t, self.targets.exists_one(u,"
            " u.modelServerName == t.modelServerName))",
            message="each modelServerName may appear only once in a rule's targets",
            check=lambda s: unique([t.model_server_name for t in s.targets]),
            field_path=".targets",
        ),
    )

    name: str | None = Field(
        default=None,
        description="Name of the rule (unique in the route), used in logs and metrics.",
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    )
    match: RouteMatch | None = Field(
        default=None, description="Which requests the rule takes; absent matches every request."
    )
    targets: list[RouteTarget] = Field(
        description="ModelServers that serve the matched requests (1-16).",
        min_length=1,
        max_length=16,
    )


class RedisConfig(ApiModel):
    """A Redis server that holds token buckets shared by every gateway replica."""

    address: str = Field(
        description='host:port of the Redis server, e.g. "redis.matrixinfer-system:6379".',
        min_length=1,
        max_length=253,
        pattern=r"^[^\s:]+:[0-9]{1,5}$",
    )
    password_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the Redis password; absent: no AUTH."
    )


class GlobalRateLimit(ApiModel):
    """Shared rate-limit state across gateway replicas."""

    redis: RedisConfig = Field(description="The Redis server that holds the buckets.")


class RateLimit(ApiModel):
    """Token and request budgets; unset limits are unlimited."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.inputTokensPerUnit) || has(self.outputTokensPerUnit)"
            " || has(self.requestsPerUnit)",
            message="rateLimit needs at least one of inputTokensPerUnit, outputTokensPerUnit"
            " or requestsPerUnit",
            check=lambda s: any(
                v is not None
                for v in (s.input_tokens_per_unit, s.output_tokens_per_unit, s.requests_per_unit)
            ),
        ),
    )

    input_tokens_per_unit: int | None = Field(
        default=None,
        description="Prompt tokens allowed per unit (estimated on admission, corrected after).",
        ge=1,
    )
    output_tokens_per_unit: int | None = Field(
        default=None,
        description="Completion tokens allowed per unit. Admission reserves the request's"
        " max_tokens (or max_completion_tokens, else outputTokensEstimate), at most this, and"
        " refuses when the bucket cannot cover it; the exact usage after the response replaces"
        " the reservation (an answer beyond it puts the bucket into debt: later requests get 429).",
        ge=1,
    )
    output_tokens_estimate: int | None = Field(
        default=None,
        description="Output tokens a request without max_tokens or max_completion_tokens reserves"
        " at admission (at most outputTokensPerUnit); absent: the whole outputTokensPerUnit, so"
        " such a request waits for a full bucket.",
        ge=1,
    )
    requests_per_unit: int | None = Field(
        default=None, description="Requests allowed per unit.", ge=1
    )
    unit: Literal["second", "minute", "hour", "day"] = Field(
        default="minute", description="The period the limits are counted over."
    )
    scope: Literal["route", "tenant", "user"] = Field(
        default="route",
        description="route: one budget shared by all callers; tenant/user: one budget each.",
    )
    global_: GlobalRateLimit | None = Field(
        default=None,
        alias="global",
        description="Buckets shared by all gateway replicas; absent: per-replica buckets.",
    )


class Access(ApiModel):
    """Who may call the route: a caller in any of the lists is allowed."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="(has(self.tenants) && size(self.tenants) > 0)"
            " || (has(self.users) && size(self.users) > 0)"
            " || (has(self.groups) && size(self.groups) > 0)",
            message="access must list at least one tenant, user or group",
            check=lambda s: bool(s.tenants or s.users or s.groups),
        ),
    )

    tenants: UniqueNames | None = Field(
        default=None, description="Tenants allowed to call the route.", max_length=256
    )
    users: UniqueNames | None = Field(
        default=None, description="Users (subjects) allowed to call the route.", max_length=256
    )
    groups: UniqueNames | None = Field(
        default=None, description="Groups whose members may call the route.", max_length=256
    )


class QueuePolicy(ApiModel):
    """The fair queue requests wait in while every candidate pod is saturated."""

    max_queued: int = Field(
        default=1000, description="Requests that may wait; more get 429.", ge=0, le=1000000
    )
    max_wait: Duration = Field(
        default="60s",
        description="Longest wait for a pod with room (or, at zero, a ready pod); then 503 "
        "with Retry-After.",
    )
    priority_header: str | None = Field(
        default=None,
        description="Request header carrying an integer priority (higher goes first).",
        max_length=256,
        pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
    )


class ModelRouteSpec(ApiModel):
    """Which requests this route takes and where they go."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="has(self.modelName) || (has(self.loraAdapters) && size(self.loraAdapters) > 0)",
            message="at least one of modelName or loraAdapters is required",
            check=lambda s: s.model_name is not None or bool(s.lora_adapters),
        ),
        CelRule(
            rule="self.rules.all(r, !has(r.name)"
            " || self.rules.exists_one(x, has(x.name) && x.name == r.name))",
            message="rule names must be unique",
            check=lambda s: unique([r.name for r in s.rules if r.name is not None]),
            field_path=".rules",
        ),
    )

    model_name: str | None = Field(
        default=None,
        description="The request `model` this route serves.",
        min_length=1,
        max_length=256,
    )
    lora_adapters: UniqueNames | None = Field(
        default=None,
        description="LoRA adapter names that also match this route (up to 32).",
        max_length=32,
    )
    parent_refs: list[ParentReference] | None = Field(
        default=None,
        description="Gateways that serve this route; absent: every MatrixInfer gateway.",
        max_length=32,
    )
    rules: list[RouteRule] = Field(
        description="Ordered rules (up to 16); the first that matches wins. A request no rule"
        " matches gets 404 naming the route.",
        min_length=1,
        max_length=16,
    )
    rate_limit: RateLimit | None = Field(
        default=None, description="Token and request budgets for this route."
    )
    access: Access | None = Field(
        default=None,
        description="Who may call the route; absent: any authenticated caller (anyone when"
        " authentication is off).",
    )
    queue: QueuePolicy | None = Field(
        default=None, description="Fair-queue settings; absent: the defaults."
    )


class ModelRouteStatus(StatusBase):
    """Observed state of a ModelRoute (conditions Accepted, ResolvedRefs)."""


class ModelRoute(ApiModel):
    """A ModelRoute sends requests for a model (or LoRA adapters) to ModelServers."""

    api_version: Literal["networking.matrixinfer.ai/v1alpha1"] = Field(
        default=API_VERSION, description="API version of the object."
    )
    kind: Literal["ModelRoute"] = Field(default="ModelRoute", description="Kind of the object.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard metadata.")
    spec: ModelRouteSpec = Field(description="Desired routing.")
    status: ModelRouteStatus | None = Field(default=None, description="Observed state.")


# --------------------------------------------------------------------------------------------
# ModelServer


class PDGroup(ApiModel):
    """How prefill and decode pods are paired: pods with the same value of groupKey form a
    group; inside it prefillLabels pick prefill pods and decodeLabels decode pods."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.prefillLabels != self.decodeLabels",
            message="prefillLabels and decodeLabels must differ",
            check=lambda s: s.prefill_labels != s.decode_labels,
        ),
    )

    group_key: str = Field(
        description='Pod label whose value names the group, e.g. "workload.matrixinfer.ai/group".',
        min_length=1,
        max_length=316,
    )
    prefill_labels: Labels = Field(
        description="Labels of the prefill pods.", min_length=1, max_length=16
    )
    decode_labels: Labels = Field(
        description="Labels of the decode pods.", min_length=1, max_length=16
    )


class WorkloadSelector(ApiModel):
    """Which pods of the namespace serve; only Running and Ready pods get requests."""

    match_labels: Labels = Field(
        description="Labels every serving pod carries.", min_length=1, max_length=32
    )
    pd_group: PDGroup | None = Field(
        default=None, description="Prefill/decode pairing; absent: every pod serves whole requests."
    )


class WorkloadPort(ApiModel):
    """The ports the engines listen on; metrics are scraped from /metrics on ``port``."""

    port: int = Field(description="Container port of the engine (1-65535).", ge=1, le=65535)
    protocol: Literal["http", "https"] = Field(
        default="http", description="Protocol spoken on the port."
    )
    grpc_port: int | None = Field(
        default=None,
        description="Container port on which the engine serves the Open Inference Protocol v2"
        " gRPC service (inference.GRPCInferenceService, e.g. Triton's 8001), over HTTP/2"
        " without TLS (1-65535). The gateway sends gRPC inference calls only to pods of"
        " ModelServers that set it; absent: the pods serve no gRPC.",
        ge=1,
        le=65535,
    )


class RetryPolicy(ApiModel):
    """Retries of a failed attempt on another pod (Envoy retry policy plus fallback list)."""

    attempts: int = Field(
        default=1, description="Retries after the first attempt (0-10).", ge=0, le=10
    )
    retry_on: UniqueNames = Field(
        default=["connect-failure", "refused-stream"],
        description="Conditions that trigger a retry, in Envoy's x-envoy-retry-on vocabulary:"
        " connect-failure, refused-stream, reset, 5xx, gateway-error, retriable-status-codes,"
        " or a status code such as 503.",
        max_length=16,
    )


class PassiveHealth(ApiModel):
    """Passive health checking: a pod whose requests fail leaves the gateway's candidates for a
    while (ejected), then gets one request at a time (half-open) until one succeeds."""

    consecutive_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Failed attempts in a row (5xx answer, connect failure, reset, timeout) that"
        " eject a pod; a successful answer resets the count.",
    )
    base_ejection_time: Duration = Field(
        default="10s",
        description="How long the first ejection lasts; each ejection that follows a failed"
        " half-open request doubles it.",
    )
    max_ejection_time: Duration = Field(
        default="5m", description="The longest an ejection lasts, however often it repeats."
    )
    max_ejection_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="At most this share of the ModelServer's pods (rounded down) is ejected at"
        " once; further failing pods stay candidates.",
    )


class TrafficPolicy(ApiModel):
    """Timeouts, retries and passive health checking towards the pods."""

    timeout: Duration | None = Field(
        default=None,
        description="Connect plus time to response headers; absent: no limit.",
    )
    retry: RetryPolicy | None = Field(default=None, description="Retries; absent: none.")
    stream_idle_timeout: Duration | None = Field(
        default=None,
        description="Longest silence on a routed request's answer before it is cut; absent: the"
        " gateway's stream idle timeout (5m by default).",
    )
    max_duration: Duration | None = Field(
        default=None,
        description="Longest a whole request may take, from its headers to the answer's last"
        " byte (streams included); cut with 504 before the answer starts, else the answer is"
        " cut off. Absent: no limit.",
    )
    passive_health: PassiveHealth | None = Field(
        default=None,
        description="Eject pods that fail requests (judged by the gateway from every attempt's"
        " outcome); absent: off. `passiveHealth: {}` turns it on with the defaults.",
    )


class KVConnector(ApiModel):
    """How KV cache moves from prefill to decode pods."""

    type: Literal["http", "nixl", "mooncake", "lmcache", "sglang"] = Field(
        description="KV transfer mechanism the engines are configured with."
    )


class KVEvents(ApiModel):
    """Where the engines publish their KV-cache events (vLLM --kv-events-config, ZMQ).

    The gateway subscribes to ``tcp://<pod IP>:<port>`` on every ready pod and keeps an index of
    the blocks each engine caches, for the precise-prefix scorer (docs/scheduling.md).
    """

    port: int = Field(
        default=5557,
        description="Port of the engine's PUB socket (the port of its `endpoint`).",
        ge=1,
        le=65535,
    )
    replay_port: int | None = Field(
        default=None,
        description="Port of the engine's replay socket (`replay_endpoint`); absent: lost "
        "events cannot be replayed and the pod's index entries are dropped instead.",
        ge=1,
        le=65535,
    )
    topic: str = Field(
        default="", description="Topic the engine publishes on (`topic`).", max_length=256
    )
    hash_seed: str = Field(
        description="The PYTHONHASHSEED the engines run with: the first block's parent hash is "
        "derived from it (without it vLLM starts from random bytes and no router can match its "
        "blocks).",
        min_length=1,
        max_length=64,
    )
    hash_algo: Literal["sha256", "sha256_cbor"] = Field(
        default="sha256",
        description="The engines' --prefix-caching-hash-algo (vLLM's default: sha256).",
    )


class SchedulerPlugin(ApiModel):
    """A scheduler plugin and its settings."""

    name: str = Field(
        description="Registered plugin name, e.g. kv-cache, prefix-cache, lora-affinity.",
        min_length=1,
        max_length=63,
    )
    weight: int | None = Field(
        default=None,
        description=(
            "Weight of a scorer's score (filters ignore it); unset means the plugin's own default "
            "weight (docs/scheduling.md)."
        ),
        ge=0,
        le=100,
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Plugin-specific settings (free-form).",
        json_schema_extra={"default": {}},
    )


def _names_unique(plugins: list[SchedulerPlugin] | None) -> bool:
    return unique([p.name for p in plugins or []])


class SchedulerProfile(ApiModel):
    """The plugins that pick a pod: filters drop pods, then weighted scorers rank the rest."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.filters) || self.filters.all(p, self.filters.exists_one(q,"
            " q.name == p.name))",
            message="filter names must be unique",
            check=lambda s: _names_unique(s.filters),
            field_path=".filters",
        ),
        CelRule(
            rule="!has(self.scorers) || self.scorers.all(p, self.scorers.exists_one(q,"
            " q.name == p.name))",
            message="scorer names must be unique",
            check=lambda s: _names_unique(s.scorers),
            field_path=".scorers",
        ),
    )

    filters: list[SchedulerPlugin] | None = Field(
        default=None, description="Filter plugins, applied in order.", max_length=16
    )
    scorers: list[SchedulerPlugin] | None = Field(
        default=None, description="Score plugins; the weighted sum ranks pods.", max_length=16
    )


class ModelServerSpec(ApiModel):
    """The pods that serve a model and how to talk to them."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="!has(self.kvConnector) || has(self.workloadSelector.pdGroup)",
            message="kvConnector requires workloadSelector.pdGroup",
            check=lambda s: s.kv_connector is None or s.workload_selector.pd_group is not None,
            field_path=".kvConnector",
        ),
        CelRule(
            rule="!has(self.kvConnector) || self.kvConnector.type != 'sglang'"
            " || self.inferenceEngine == 'SGLang'",
            message="kvConnector type sglang requires inferenceEngine SGLang",
            check=lambda s: (
                s.kv_connector is None
                or s.kv_connector.type != "sglang"
                or s.inference_engine == "SGLang"
            ),
            field_path=".kvConnector.type",
        ),
        CelRule(
            rule="!has(self.prefillScheduler) || has(self.workloadSelector.pdGroup)",
            message="prefillScheduler requires workloadSelector.pdGroup",
            check=lambda s: s.prefill_scheduler is None or s.workload_selector.pd_group is not None,
            field_path=".prefillScheduler",
        ),
    )

    model: str | None = Field(
        default=None,
        description="Upstream model name; when set the request's `model` is rewritten to it"
        " (not for LoRA requests).",
        max_length=256,
    )
    inference_engine: Literal["vLLM", "SGLang"] = Field(
        description="Engine the pods run; chooses metric names and PD connector defaults."
    )
    workload_selector: WorkloadSelector = Field(description="Which pods serve.")
    workload_port: WorkloadPort = Field(description="The engine port on each pod.")
    traffic_policy: TrafficPolicy | None = Field(
        default=None, description="Timeouts and retries; absent: no timeout, no retries."
    )
    kv_connector: KVConnector | None = Field(
        default=None, description="KV transfer for prefill/decode serving."
    )
    kv_events: KVEvents | None = Field(
        default=None,
        description="The engines publish KV-cache events; absent: the gateway does not subscribe.",
    )
    scheduler: SchedulerProfile | None = Field(
        default=None,
        description="Scheduler plugin profile; absent: the gateway default profile. With"
        " workloadSelector.pdGroup it picks the decode pod (absent: the decode default, see"
        " docs/pd.md).",
    )
    prefill_scheduler: SchedulerProfile | None = Field(
        default=None,
        description="With workloadSelector.pdGroup: the profile that picks the prefill pod among"
        " the chosen decode pod's group; absent: the prefill default (docs/pd.md).",
    )


class ModelServerStatus(StatusBase):
    """Observed state of a ModelServer."""

    ready_endpoints: int | None = Field(
        default=None, description="Pods currently Running, Ready and selected.", ge=0
    )


class ModelServer(ApiModel):
    """A ModelServer is a set of pods that serve one model."""

    api_version: Literal["networking.matrixinfer.ai/v1alpha1"] = Field(
        default=API_VERSION, description="API version of the object."
    )
    kind: Literal["ModelServer"] = Field(default="ModelServer", description="Kind of the object.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard metadata.")
    spec: ModelServerSpec = Field(description="Desired state.")
    status: ModelServerStatus | None = Field(default=None, description="Observed state.")
