"""``ModelServer.spec.trafficPolicy.retry`` in Envoy's terms. Pure.

One translation for both users: the extproc's ``x-envoy-*`` retry headers
(``extproc.datastore``) and the xDS route's ``retry_policy`` (``controllers.xds.generate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from crds.networking import RetryPolicy

__all__ = ["EnvoyRetry", "envoy_retry"]


@dataclass(slots=True, frozen=True)
class EnvoyRetry:
    attempts: int  # retries after the first attempt
    retry_on: str  # Envoy retry_on conditions, comma-separated
    status_codes: tuple[int, ...]  # retriable status codes (with "retriable-status-codes")


def envoy_retry(retry: RetryPolicy) -> EnvoyRetry:
    """Status codes in ``retryOn`` (e.g. ``503``) become retriable status codes and add the
    ``retriable-status-codes`` condition; no condition left means ``connect-failure``."""
    conditions: list[str] = []
    codes: list[int] = []
    for item in retry.retry_on:
        if item.isdigit():
            codes.append(int(item))
        else:
            conditions.append(item)
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return EnvoyRetry(retry.attempts, ",".join(conditions) or "connect-failure", tuple(codes))
