"""The controllers' Prometheus metrics (own registry, `matrixinfer_controller_*`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ControllerMetrics:
    """One registry per process; handlers record through these methods only."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconcile_duration = Histogram(
            "matrixinfer_controller_reconcile_duration_seconds",
            "Time of one reconcile (observe, plan, apply) of one object.",
            ["controller"],
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "matrixinfer_controller_reconcile_errors_total",
            "Reconciles or API actions that failed, by reason.",
            ["controller", "reason"],
            registry=self.registry,
        )
        self.actions = Counter(
            "matrixinfer_controller_actions_total",
            "API actions the controller applied, by kind.",
            ["controller", "action"],
            registry=self.registry,
        )
        self.infer_groups = Gauge(
            "matrixinfer_controller_infer_groups",
            "InferGroups of a ModelInfer by state "
            "(Ready, Starting, Updating, Recovering, Deleting).",
            ["namespace", "model_infer", "state"],
            registry=self.registry,
        )

        self.autoscaler_desired = Gauge(
            "matrixinfer_controller_autoscaler_desired_replicas",
            "Replicas the autoscaler wants, by AutoscalingPolicy and target (ModelInfer or"
            " ModelInfer/role).",
            ["namespace", "policy", "target"],
            registry=self.registry,
        )
        self.autoscaler_current = Gauge(
            "matrixinfer_controller_autoscaler_current_replicas",
            "Replicas the target had when the autoscaler last decided.",
            ["namespace", "policy", "target"],
            registry=self.registry,
        )
        self.autoscaler_panic = Gauge(
            "matrixinfer_controller_autoscaler_panic",
            "1 while the AutoscalingPolicy is in panic mode, else 0.",
            ["namespace", "policy"],
            registry=self.registry,
        )
        self.autoscaler_decisions = Counter(
            "matrixinfer_controller_autoscaler_decisions_total",
            "Autoscaler decisions by reason (Steady, ScaleUp, ScaleDown, PanicScaleUp, WakeUp,"
            " ScaleToZero, Bounds, Scheduled, Rebalance).",
            ["namespace", "policy", "reason"],
            registry=self.registry,
        )
        self.autoscaler_max = Gauge(
            "matrixinfer_controller_autoscaler_max_replicas",
            "The most replicas the AutoscalingPolicy allows its targets in total (their"
            " maxReplicas summed).",
            ["namespace", "policy"],
            registry=self.registry,
        )
        self.admission_reviews = Counter(
            "matrixinfer_controller_admission_reviews_total",
            "Admission requests the webhooks answered, by handler (validate-model, ...,"
            " default-modelserver) and result (allowed, denied, error: the check could not be"
            " made, e.g. the API server did not answer).",
            ["handler", "result"],
            registry=self.registry,
        )
        self.admission_duration = Histogram(
            "matrixinfer_controller_admission_duration_seconds",
            "Time to answer an admission request, by handler.",
            ["handler"],
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.models = Gauge(
            "matrixinfer_controller_models",
            "Models by condition: Failed (Failed=True), Active (Active=True), else Initializing.",
            ["condition"],
            registry=self.registry,
        )

    def forget_policy(self, namespace: str, policy: str) -> None:
        """Drop a deleted AutoscalingPolicy's series."""
        for metric in (
            self.autoscaler_desired,
            self.autoscaler_current,
            self.autoscaler_panic,
            self.autoscaler_decisions,
            self.autoscaler_max,
        ):
            for fam in metric.collect():
                for sample in fam.samples:
                    lab = sample.labels
                    if lab.get("namespace") == namespace and lab.get("policy") == policy:
                        names = [lab[k] for k in metric._labelnames]
                        with contextlib.suppress(KeyError):
                            metric.remove(*names)

    def set_models(self, counts: Mapping[str, int]) -> None:
        for condition, n in counts.items():
            self.models.labels(condition).set(n)

    def set_groups(self, namespace: str, name: str, counts: Mapping[Any, int]) -> None:
        for state, n in counts.items():
            self.infer_groups.labels(namespace, name, str(state)).set(n)

    def forget(self, namespace: str, name: str) -> None:
        for metric in self.infer_groups.collect():
            for sample in metric.samples:
                if sample.labels.get("namespace") == namespace and (
                    sample.labels.get("model_infer") == name
                ):
                    self.infer_groups.remove(namespace, name, sample.labels["state"])

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose /metrics on `addr:port` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)
