"""The cluster's GPUs, read from node labels and allocatable resources, and the price table
(pure: nodes come in as the API's JSON)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from console.base import ApiType
from console.catalog import InvalidDataFile, read_yaml, validation_message

__all__ = [
    "GPU_MEMORY_LABEL",
    "GPU_PRODUCT_LABEL",
    "GPU_RESOURCE",
    "GpuPool",
    "GpuPrice",
    "PriceTable",
    "gpu_pools",
    "load_prices",
]

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by GPU feature discovery


class GpuPrice(BaseModel):
    """One GPU product in the price table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_gib: float = Field(gt=0, description="Memory of one GPU (GiB).")
    compute_capability: float = Field(gt=0, description="CUDA compute capability, e.g. 8.9.")
    hourly: float = Field(ge=0, description="Price of one GPU for an hour.")


class PriceTable(BaseModel):
    """GPU product (the node label's value) → memory, compute capability, price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = Field(default="USD")
    gpus: dict[str, GpuPrice] = Field(default_factory=dict)


def load_prices(path: Path | None = None) -> PriceTable:
    source, doc = read_yaml(path, "prices.yaml")
    try:
        return PriceTable.model_validate(doc)
    except ValidationError as exc:
        raise InvalidDataFile(validation_message(source, exc)) from None


class GpuPool(ApiType):
    """Nodes with the same GPU product and count: one shape a backend's pods can take."""

    model_config = ConfigDict(frozen=True)

    product: str = Field(description="GPU product label value.")
    memory_gib: float = Field(description="Memory of one GPU (GiB).")
    compute_capability: float = Field(description="CUDA compute capability (0: unknown).")
    count: int = Field(description="Allocatable GPUs per node.")
    nodes: int = Field(description="Nodes of this shape.")
    hourly: float | None = Field(description="Price of one GPU for an hour; null: unknown.")


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def gpu_pools(nodes: Iterable[Mapping[str, Any]], prices: PriceTable) -> list[GpuPool]:
    """Group GPU nodes by (product, GPUs per node). Memory comes from the node's
    ``nvidia.com/gpu.memory`` label (MiB), else the price table; nodes without allocatable
    ``nvidia.com/gpu`` or whose memory is unknown are left out."""
    groups: dict[tuple[str, int], list[float]] = {}
    for node in nodes:
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        alloc = (node.get("status") or {}).get("allocatable") or {}
        count = _float(alloc.get(GPU_RESOURCE))
        if not count or count < 1:
            continue
        product = str(labels.get(GPU_PRODUCT_LABEL, "unknown"))
        mib = _float(labels.get(GPU_MEMORY_LABEL))
        known = prices.gpus.get(product)
        memory = mib / 1024 if mib else (known.memory_gib if known else None)
        if memory is None:
            continue
        groups.setdefault((product, int(count)), []).append(memory)
    pools = []
    for (product, count), memories in sorted(groups.items()):
        known = prices.gpus.get(product)
        pools.append(
            GpuPool(
                product=product,
                memory_gib=min(memories),
                compute_capability=known.compute_capability if known else 0.0,
                count=count,
                nodes=len(memories),
                hourly=known.hourly if known else None,
            )
        )
    return pools
