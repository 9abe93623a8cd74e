"""Suite settings: which fleet, contenders, workloads and QPS points one run covers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_SUITE", "PREFIX_SUITE", "SMOKE_SUITE", "SUITES", "ExtraRun", "SuiteConfig"]


class ExtraRun(BaseModel):
    """One more workload at one QPS, run for ``contenders`` (empty: the sweep's contenders)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: str
    qps: float = Field(gt=0)
    contenders: list[str] = Field(default_factory=list)
    args: dict[str, float | int] = Field(default_factory=dict)
    duration: float | None = Field(None, gt=0, description="seconds of arrivals (None: suite's)")


class SuiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="report name: bench/reports/<name>.md")
    replicas: int = Field(8, ge=1, le=64, description="simulator pods (127.0.0.10, .11, ...)")
    model: str = "bench-model"
    adapters: int = Field(6, ge=0, description="LoRA adapters loaded on every sim")
    sim_args: list[str] = Field(
        default_factory=lambda: [
            "--time-scale",
            "1",
            "--num-gpu-blocks",
            "1024",
            "--max-model-len",
            "8192",
            "--max-loras",
            "2",
            "--seed",
            "7",
        ],
        description="flags given to every sim (same timing model and seeds for every contender)",
    )
    contenders: list[str] = Field(
        default_factory=lambda: [
            "envoy-rr",
            "ours-default",
            "ours-prefix",
            "ours-least-request",
            "vllm-router-cache_aware",
            "vllm-router-round_robin",
        ]
    )
    baseline: str = Field("envoy-rr", description="contender the ratios are taken against")
    kv_events: bool = Field(
        False,
        description="the sims publish KV events (ZMQ on each sim's address, ports 5557/5558, "
        "PYTHONHASHSEED=7); ours-* follow them (precise-prefix), vllm-router kv_aware subscribes",
    )
    sweep_workload: str = "shared_prefix"
    sweep_args: dict[str, float | int] = Field(default_factory=dict)
    sweep_qps: list[float] = Field(default_factory=lambda: [8.0, 16.0, 24.0])
    extra: list[ExtraRun] = Field(default_factory=list)
    duration: float = Field(20.0, gt=0, description="seconds of arrivals per point")
    drain_timeout: float = Field(20.0, gt=0, description="seconds to wait for open requests")
    probe_requests: int = Field(
        8, ge=0, description="sequential requests (concurrency 1) measuring unloaded TTFT"
    )
    seed: int = 1
    notes: str = Field("", description="Markdown added to the report's introduction")


_DEFAULT_NOTES = """\
**Why these sizes.** The sims run at time scale 1 with the default timing model (an 8B model on
one H100: a prefilled token costs 68 us, a step 10 ms + 80 us per decoding sequence). Each of the
16 shared-prefix groups has a 4000-token system prompt: a cache miss costs ~0.28 s of prefill, a
hit ~2 ms, so where a request lands decides its TTFT. Each pod's KV cache is cut to 1024 blocks
x 16 = 16k tokens: it holds about four of the sixteen system prompts (250 blocks each) next to
its running requests. A pod that sees every group (round-robin) keeps evicting; a pod that sees
two keeps them - the ratio of the prefix working set to a pod's cache is what matters, not the
absolute size. Answers are 64 tokens so that the SSE chunk rate, and with it the CPU of the load
generator, Envoy, the extproc and the sims, stays inside 2 shared cores: the CPU table below shows
the load generator at ~0.1 core and its sends close to schedule (send-lag column), so the queueing
happens in the sims. Round-robin's capacity is about 8 pods / ~0.3 s per mostly-missing request
= ~25 QPS; the sweep goes from 10 to 40 QPS to cross it.
"""

_CORE = ["envoy-rr", "ours-default", "vllm-router-cache_aware"]

DEFAULT_SUITE = SuiteConfig(
    name="default",
    sweep_args={"groups": 16, "system_tokens": 4000, "question_tokens": 24, "max_tokens": 64},
    sweep_qps=[10.0, 20.0, 30.0, 40.0],
    duration=12.0,
    drain_timeout=30.0,
    notes=_DEFAULT_NOTES,
    extra=[
        ExtraRun(workload="multi_turn", qps=12.0, contenders=_CORE, duration=8.0),
        ExtraRun(workload="long_context", qps=8.0, contenders=_CORE, duration=8.0),
        ExtraRun(workload="lora_mix", qps=16.0, contenders=_CORE, duration=8.0),
        ExtraRun(
            workload="bursts",
            qps=16.0,
            contenders=_CORE,
            args={"groups": 16, "system_tokens": 4000, "period": 5.0},
            duration=8.0,
        ),
    ],
)

SMOKE_SUITE = SuiteConfig(
    name="smoke",
    replicas=2,
    adapters=2,
    sim_args=[
        "--time-scale",
        "0.05",
        "--num-gpu-blocks",
        "512",
        "--max-model-len",
        "4096",
        "--seed",
        "7",
    ],
    contenders=["envoy-rr", "ours-default"],
    sweep_args={"groups": 2, "system_tokens": 200, "question_tokens": 8, "max_tokens": 8},
    sweep_qps=[4.0, 8.0],
    extra=[
        ExtraRun(
            workload="lora_mix",
            qps=4.0,
            args={"adapters": 2, "prompt_tokens": 20, "max_tokens": 8},  # the 2 loaded
        )
    ],
    duration=2.0,
    drain_timeout=10.0,
    probe_requests=2,
)

_PREFIX_NOTES = """\
**What this suite checks** (issue 16: precise prefix routing). The sims publish vLLM's KV events
and the gateway follows them (the default profile's `precise-prefix` scorer); `vllm-router
kv_aware` is subscribed to the same sockets. Same fleet as the default suite (8 sims at time
scale 1, 1024 blocks x 16 tokens = 16k tokens of KV cache each, 131k for the fleet). Two
workloads at a load where round-robin's p90 TTFT is well over 5x its unloaded TTFT:
`shared_prefix` (16 system prompts of 4000 tokens, uniform popularity: 64k tokens, half the
fleet's cache) and `zipf_prefix` (96 system prompts of 4000 tokens with Zipf(1.1) popularity:
384k tokens, 2.9x the fleet's cache - cache pressure with skew). 40 s of arrivals per point, so
that steady state, not the cold start, sets the p90: in 12 s the first request of each group
(a whole-prompt prefill under any router) is a fifth of `zipf_prefix`'s requests.
"""

PREFIX_SUITE = SuiteConfig(
    name="prefix",
    kv_events=True,
    contenders=[
        "envoy-rr",
        "ours-default",
        "vllm-router-cache_aware",
        "vllm-router-kv_aware",
        "vllm-router-power_of_two",
    ],
    sweep_args={"groups": 16, "system_tokens": 4000, "question_tokens": 24, "max_tokens": 64},
    sweep_qps=[30.0],
    # steady state: in 12 s the first request of each group is a fifth of zipf_prefix's requests
    duration=40.0,
    drain_timeout=30.0,
    probe_requests=6,
    notes=_PREFIX_NOTES,
    extra=[
        ExtraRun(
            workload="zipf_prefix",
            qps=30.0,
            args={"groups": 96, "system_tokens": 4000, "question_tokens": 24, "max_tokens": 64},
        ),
    ],
)

SUITES = {s.name: s for s in (DEFAULT_SUITE, SMOKE_SUITE, PREFIX_SUITE)}
