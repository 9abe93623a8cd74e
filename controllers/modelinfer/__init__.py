"""The ModelInfer controller: InferGroups of role pods (entry + workers per role instance)."""

from controllers.modelinfer.planner import plan
from controllers.modelinfer.spec import parse
from controllers.modelinfer.types import InvalidSpec, Observed, Plan, PlannerState

__all__ = ["InvalidSpec", "Observed", "Plan", "PlannerState", "parse", "plan"]
