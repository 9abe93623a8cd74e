"""The ModelInfer controller: InferGroups of role pods (entry + workers per role instance)."""

from controllers.modelinfer.planner import plan
from controllers.modelinfer.spec import spec_from_object
from controllers.modelinfer.types import ModelInferSpec, Observed, Plan, PlannerState

__all__ = ["ModelInferSpec", "Observed", "Plan", "PlannerState", "plan", "spec_from_object"]
