"""The base of the REST API's types: JSON names are camelCase (as in the Kubernetes API), Python
names snake_case; the data files (catalog, prices, rules) may use either."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = ["ApiType"]


class ApiType(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
