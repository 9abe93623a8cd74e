"""The Model controller: a Model (registry.matrixinfer.ai) generates and owns one ModelInfer and
one ModelServer per backend, one ModelRoute and the AutoscalingPolicy (docs/model.md)."""
