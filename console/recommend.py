"""Which engines and GPU shapes fit a model, with the memory arithmetic shown (pure).

Memory of one engine pod (all its GPUs together)::

    weights  = parameters x bytes per weight (the dtype)
    kv cache = 2 (K and V) x layers x kv_heads x head_dim x bytes per element
               x context length x concurrency
    overhead = overhead_gib_per_gpu x GPUs
    fits when weights + kv cache + overhead <= GPU memory x gpu_memory_utilization x GPUs

GPUs per replica (tensor parallel) are tried as 1, 2, 4, 8 up to the node's GPUs; the smallest
that fits is the shape offered for each (engine, GPU pool). The hourly cost of one replica is
the GPU's price x GPUs x the engine's pods per replica (``pods`` in the rule file).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from console.base import ApiType
from console.catalog import DTYPE_BYTES, Dtype, ModelCard
from console.gpus import GpuPool
from console.rules import EngineRules, EngineSpec

__all__ = ["GIB", "MemoryEstimate", "Option", "Recommendation", "memory_estimate", "recommend"]

GIB = float(1 << 30)
TENSOR_PARALLEL = (1, 2, 4, 8)


class MemoryEstimate(ApiType):
    """The memory arithmetic of one replica, in GiB, with the formula written out."""

    weights_gib: float
    kv_cache_gib: float
    kv_bytes_per_token: float
    overhead_gib: float
    total_gib: float
    available_gib: float
    fits: bool
    explanation: str


class Option(ApiType):
    """One engine on one GPU shape."""

    engine: str
    backend_type: str
    gpu: str
    tensor_parallel: int
    pods: int = Field(description="Engine pods per replica, each with tensorParallel GPUs.")
    memory: MemoryEstimate
    fits: bool = Field(description="Memory fits and every engine rule passes.")
    reasons: list[str] = Field(description="Why the option does not fit (empty when it does).")
    score: float
    hourly_cost: float | None
    currency: str


class Recommendation(ApiType):
    model: ModelCard
    dtype: str
    context_length: int
    concurrency: int
    options: list[Option] = Field(description="Fitting options first: cheapest, then best score.")
    best: Option | None = Field(description="The first fitting option, if any.")


def _gib(x: float) -> str:
    return f"{x:.2f}" if x >= 0.01 or x == 0 else f"{x:.6f}"


def memory_estimate(
    model: ModelCard,
    dtype: str,
    context_length: int,
    concurrency: int,
    gpu_memory_gib: float,
    tensor_parallel: int,
    utilization: float,
    overhead_gib_per_gpu: float,
) -> MemoryEstimate:
    """Weights + KV cache + overhead against the GPUs' usable memory."""
    width = DTYPE_BYTES[dtype]
    weights = model.params_b * 1e9 * width / GIB
    per_token = 2 * model.layers * model.kv_heads * model.head_dim * width
    kv = per_token * context_length * concurrency / GIB
    overhead = overhead_gib_per_gpu * tensor_parallel
    total = weights + kv + overhead
    available = gpu_memory_gib * utilization * tensor_parallel
    fits = total <= available
    explanation = (
        f"weights {model.params_b:g}e9 params x {width:g} B ({dtype}) = {weights:.2f} GiB; "
        f"KV cache 2 x {model.layers} layers x {model.kv_heads} kv heads x {model.head_dim} dims"
        f" x {width:g} B = {per_token:,.0f} B/token x {context_length} tokens"
        f" x {concurrency} sequences = {_gib(kv)} GiB; "
        f"overhead {overhead_gib_per_gpu:g} GiB x {tensor_parallel} GPU = {overhead:.2f} GiB; "
        f"total {total:.2f} GiB {'<=' if fits else '>'} {gpu_memory_gib:.4g} GiB x {utilization:g}"
        f" x {tensor_parallel} GPU = {available:.2f} GiB"
    )
    return MemoryEstimate(
        weights_gib=weights,
        kv_cache_gib=kv,
        kv_bytes_per_token=per_token,
        overhead_gib=overhead,
        total_gib=total,
        available_gib=available,
        fits=fits,
        explanation=explanation,
    )


def facts(
    model: ModelCard,
    dtype: str,
    pool: GpuPool,
    tensor_parallel: int,
    pods: int,
    context_length: int,
    concurrency: int,
    lora: bool,
) -> dict[str, Any]:
    """The variables the CEL rules see."""
    return {
        "model": {
            "id": model.id,
            "architecture": model.architecture,
            "params_b": model.params_b,
            "context_length": model.context_length,
            "dtype": dtype,
            "dtype_bytes": DTYPE_BYTES[dtype],
            "lora": model.lora,
            "layers": model.layers,
            "attention_heads": model.attention_heads,
            "kv_heads": model.kv_heads,
            "head_dim": model.head_dim,
        },
        "gpu": {
            "product": pool.product,
            "memory_gib": pool.memory_gib,
            "compute_capability": pool.compute_capability,
            "count": pool.count,
            "nodes": pool.nodes,
        },
        "shape": {"tensor_parallel": tensor_parallel, "pods": pods},
        "want": {"context_length": context_length, "concurrency": concurrency, "lora": lora},
    }


def _option(
    rules: EngineRules,
    engine: EngineSpec,
    model: ModelCard,
    dtype: str,
    pool: GpuPool,
    tp: int,
    context_length: int,
    concurrency: int,
    lora: bool,
    currency: str,
) -> Option:
    mem = memory_estimate(
        model,
        dtype,
        context_length,
        concurrency,
        pool.memory_gib,
        tp,
        rules.memory.gpu_memory_utilization,
        rules.memory.overhead_gib_per_gpu,
    )
    seen = facts(model, dtype, pool, tp, engine.pods, context_length, concurrency, lora)
    verdict = rules.evaluate(engine, seen)
    reasons = list(verdict.reasons)
    if not mem.fits:
        reasons.insert(0, f"does not fit: {mem.total_gib:.2f} GiB > {mem.available_gib:.2f} GiB")
    if context_length > model.context_length:
        reasons.append(f"the model supports at most {model.context_length} tokens of context")
    if lora and not model.lora:
        reasons.append("the catalog marks this model as without LoRA support")
    return Option(
        engine=engine.name,
        backend_type=engine.backend_type,
        gpu=pool.product,
        tensor_parallel=tp,
        pods=engine.pods,
        memory=mem,
        fits=not reasons,
        reasons=reasons,
        score=verdict.score,
        hourly_cost=None if pool.hourly is None else pool.hourly * tp * engine.pods,
        currency=currency,
    )


def recommend(
    model: ModelCard,
    pools: Sequence[GpuPool],
    rules: EngineRules,
    *,
    dtype: Dtype | None = None,
    context_length: int | None = None,
    concurrency: int = 16,
    lora: bool = False,
    currency: str = "USD",
) -> Recommendation:
    """For each engine and GPU pool, the smallest tensor-parallel shape that fits (or, when none
    does, the largest tried, with the reasons); fitting options first, cheapest first."""
    dt = dtype or model.default_dtype
    ctx = context_length or model.context_length
    options: list[Option] = []
    for engine in rules.engines:
        for pool in pools:
            tried = [tp for tp in TENSOR_PARALLEL if tp <= pool.count]
            chosen: Option | None = None
            for tp in tried:
                chosen = _option(
                    rules, engine, model, dt, pool, tp, ctx, concurrency, lora, currency
                )
                if chosen.fits:
                    break
            if chosen is not None:
                options.append(chosen)
    options.sort(
        key=lambda o: (
            not o.fits,
            o.hourly_cost if o.hourly_cost is not None else float("inf"),
            -o.score,
            o.engine,
        )
    )
    best = options[0] if options and options[0].fits else None
    return Recommendation(
        model=model,
        dtype=dt,
        context_length=ctx,
        concurrency=concurrency,
        options=options,
        best=best,
    )
