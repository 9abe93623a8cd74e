"""The model catalog: well-known open models and the facts the recommendations use (pure)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from console.base import ApiType

__all__ = ["DTYPE_BYTES", "Catalog", "Dtype", "InvalidDataFile", "ModelCard", "load_catalog"]

Dtype = Literal["float32", "bfloat16", "float16", "fp8", "int8", "int4"]

DTYPE_BYTES: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
"""Bytes per weight (and per KV-cache element) of each dtype."""


class InvalidDataFile(ValueError):
    """A catalog, price or rule file is not valid; the message names the file and the field."""


def validation_message(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        parts.append(f"{path}: {err['msg']}" if path else str(err["msg"]))
    return f"{source}: " + "; ".join(parts)


def read_yaml(path: Path | None, default: str) -> tuple[str, object]:
    """(source name, parsed YAML) of ``path``, or of the packaged data file ``default``."""
    if path is None:
        text = resources.files("console").joinpath("data").joinpath(default).read_text()
        source = f"console/data/{default}"
    else:
        text, source = path.read_text(), str(path)
    try:
        return source, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidDataFile(f"{source}: invalid YAML: {exc}") from None


class ModelCard(ApiType):
    """What the console knows about one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Hugging Face id, e.g. Qwen/Qwen2.5-7B-Instruct.")
    architecture: str = Field(description="The transformers architecture class.")
    params_b: float = Field(gt=0, description="Parameters, in billions.")
    context_length: int = Field(gt=0, description="Longest context the model supports (tokens).")
    license: str = Field(description="Licence id.")
    default_dtype: Dtype = Field(default="bfloat16", description="Dtype of the released weights.")
    lora: bool = Field(default=False, description="Whether engines serve LoRA adapters on it.")
    layers: int = Field(gt=0, description="Transformer layers.")
    attention_heads: int = Field(gt=0, description="Query heads per layer.")
    kv_heads: int = Field(gt=0, description="Key/value heads per layer (GQA).")
    head_dim: int = Field(gt=0, description="Dimension of one head.")
    source: Literal["catalog", "huggingface"] = Field(
        default="catalog", description="Where the facts come from."
    )

    @property
    def uri(self) -> str:
        return f"hf://{self.id}"


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelCard]


class Catalog:
    """The catalog's models by id."""

    def __init__(self, models: list[ModelCard]) -> None:
        self.models = {m.id: m for m in models}

    def get(self, model_id: str) -> ModelCard | None:
        return self.models.get(model_id.removeprefix("hf://"))

    def search(self, query: str) -> list[ModelCard]:
        q = query.lower()
        return [m for m in self.models.values() if q in m.id.lower() or q in m.architecture.lower()]


def load_catalog(path: Path | None = None) -> Catalog:
    """The packaged catalog, or the file at ``path``."""
    source, doc = read_yaml(path, "models.yaml")
    try:
        return Catalog(_CatalogFile.model_validate(doc).models)
    except ValidationError as exc:
        raise InvalidDataFile(validation_message(source, exc)) from None
