"""Fixtures shared by the tests and the benchmarks: real servers they start (Redis, the emulated
Kubernetes API with a Kopf operator), engine metric pages, readers of the stack's metrics.

Not used by the product at run time; the layers contract keeps ``bench`` and ``tests`` on top.
"""
