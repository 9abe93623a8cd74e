"""Readers of the extproc's Prometheus metrics (per process or summed over a stack)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from matrixinfer.stack import GatewayStack

__all__ = ["metric", "port_metric"]


def port_metric(http_port: int, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with ``labels`` that one extproc process serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def metric(stack: GatewayStack, name: str, **labels: str) -> float:
    """:func:`port_metric` summed over the stack's extproc processes."""
    return sum(port_metric(port, name, **labels) for port in stack.http_ports)
