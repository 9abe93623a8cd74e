"""Simulator configuration: one pydantic model, validated at the edge (CLI or Python).

Durations are in *simulated* seconds. ``time_scale`` maps simulated time to wall time
(wall = simulated x time_scale), so 0.01 runs a hundred times faster than a real engine while
every metric and timing still reads like the modelled GPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sim.kvevents import KVEventsConfig, KVEventsFormat

EngineKind = Literal["vllm", "sglang"]
Role = Literal["prefill", "decode", "both"]


@dataclass(frozen=True, slots=True)
class OutputLength:
    """Distribution of output lengths for requests that do not set ``max_tokens``.

    Spelled ``fixed:N``, ``uniform:LO:HI``, ``normal:MEAN:STD`` or ``exponential:MEAN``;
    samples are clamped to at least 1 token.
    """

    kind: Literal["fixed", "uniform", "normal", "exponential"]
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> OutputLength:
        parts = spec.strip().split(":")
        kind = parts[0]
        try:
            nums = [float(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"output length {spec!r}: numbers expected after the kind") from None
        want = {"fixed": 1, "uniform": 2, "normal": 2, "exponential": 1}
        if kind not in want:
            raise ValueError(
                f"output length {spec!r}: kind must be one of fixed, uniform, normal, exponential"
            )
        if len(nums) != want[kind]:
            raise ValueError(f"output length {spec!r}: {kind} takes {want[kind]} number(s)")
        if any(n < 0 for n in nums) or (kind == "uniform" and nums[0] > nums[1]):
            raise ValueError(f"output length {spec!r}: bounds must be >= 0 and ordered")
        return cls(kind, nums[0], nums[1] if len(nums) > 1 else 0.0)  # type: ignore[arg-type]

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            v = self.a
        elif self.kind == "uniform":
            v = rng.uniform(self.a, self.b)
        elif self.kind == "normal":
            v = rng.gauss(self.a, self.b)
        else:
            v = rng.expovariate(1.0 / self.a) if self.a > 0 else 1.0
        return max(1, round(v))

    def __str__(self) -> str:
        if self.kind in ("fixed", "exponential"):
            return f"{self.kind}:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


class TimingModel(BaseModel):
    """Step time = base + prefill tokens x per-token cost + decoding sequences x per-seq cost.

    Defaults look like an 8B model on one H100: a 1k-token prompt costs ~78 ms of prefill at low
    load, one decoding sequence ~10 ms per token, 256 of them ~30 ms per token.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_base: float = Field(0.010, ge=0, description="fixed cost of one engine step (s)")
    prefill_per_token: float = Field(6.8e-5, ge=0, description="cost per prefilled token (s)")
    decode_per_seq: float = Field(8e-5, ge=0, description="cost per decoding sequence (s)")
    kv_transfer_base: float = Field(0.002, ge=0, description="fixed cost of a PD KV transfer (s)")
    kv_transfer_per_token: float = Field(
        5e-6, ge=0, description="PD KV transfer cost per prompt token (s)"
    )

    def step_time(self, prefill_tokens: int, decode_seqs: int) -> float:
        return (
            self.step_base
            + prefill_tokens * self.prefill_per_token
            + decode_seqs * self.decode_per_seq
        )

    def transfer_time(self, tokens: int) -> float:
        return self.kv_transfer_base + tokens * self.kv_transfer_per_token


class EngineConfig(BaseModel):
    """What the pure engine core needs (no HTTP, no process concerns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    num_gpu_blocks: int = Field(8192, ge=1)
    block_size: int = Field(16, ge=1)
    enable_prefix_caching: bool = True
    max_model_len: int = Field(8192, ge=2)
    max_waiting: int | None = Field(None, ge=0, description="waiting-queue bound; over it: 429")
    max_loras: int = Field(4, ge=1, description="distinct LoRA adapters per running batch")
    prefix_caching_hash_algo: Literal["sha256", "sha256_cbor", "builtin"] = Field(
        "sha256", description="block hash function (vLLM's --prefix-caching-hash-algo)"
    )
    hash_seed: str | None = Field(
        None, description="seed of the first block's parent hash ($PYTHONHASHSEED); None: random"
    )
    kv_events_int_block_hashes: bool = Field(
        True,
        description="KV events carry each block hash's low 64 bits (True) or the whole digest "
        "($VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, as vLLM)",
    )
    timing: TimingModel = Field(default_factory=TimingModel)

    @model_validator(mode="after")
    def _fits(self) -> EngineConfig:
        capacity = self.num_gpu_blocks * self.block_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} does not fit the KV cache "
                f"(num_gpu_blocks {self.num_gpu_blocks} x block_size {self.block_size} = "
                f"{capacity} tokens): lower max_model_len or raise num_gpu_blocks"
            )
        return self


class FaultConfig(BaseModel):
    """Injected faults; all can be changed at runtime through ``POST /sim/fault``."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0, le=1, description="fraction of requests answered 500")
    reset_rate: float = Field(0.0, ge=0, le=1, description="fraction whose connection is reset")
    hang_rate: float = Field(0.0, ge=0, le=1, description="fraction that never get an answer")
    not_ready: bool = Field(False, description="/health answers 503 while set")


class SimConfig(BaseModel):
    """Everything one simulator process is started with."""

    model_config = ConfigDict(extra="forbid")

    model: str = "demo-model"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        0, ge=0, le=65535, description="Open Inference Protocol v2 gRPC port (0: not served)"
    )
    pod_name: str = ""
    engine_kind: EngineKind = "vllm"
    role: Role = "both"
    time_scale: float = Field(1.0, gt=0)
    seed: int = 0
    output_len: str = "uniform:32:256"
    engine: EngineConfig = Field(default_factory=EngineConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    slow_start: float = Field(0.0, ge=0, description="wall seconds /health stays 503 after start")
    max_cpu_loras: int | None = Field(None, ge=1, description="max loaded adapters (None: any)")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="name -> path at start")
    nixl_side_channel_port: int = Field(5600, ge=1, le=65535)
    kv_events: KVEventsConfig = Field(
        default_factory=KVEventsConfig, description="vLLM's --kv-events-config"
    )
    kv_events_format: KVEventsFormat = Field(
        "array", description="KV events on the wire: msgpack arrays or tagged maps (sim.kvevents)"
    )

    @field_validator("output_len")
    @classmethod
    def _check_output_len(cls, v: str) -> str:
        OutputLength.parse(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        if not self.model:
            raise ValueError("model must not be empty")
        return self

    @property
    def output_length(self) -> OutputLength:
        return OutputLength.parse(self.output_len)
