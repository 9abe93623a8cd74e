"""Per-ModelServer demand gauges, computed when /metrics is read (the autoscaler's gateway
signal; every extproc replica publishes its own, the autoscaler sums them).

- ``matrixinfer_gateway_server_waiting_requests{namespace, server}``: requests waiting for the
  ModelServer: in its fair queue (every pod saturated), in the gateway's wake stage (no ready
  pod: at zero, or its pods are starting — the demand that wakes it) and, without a fair queue,
  in its line for room (every pod saturated);
- ``matrixinfer_gateway_server_in_flight_requests{namespace, server}``: requests routed to its
  pods that have not finished.

Every ModelServer in the datastore gets both series (0 included), so a reader can tell "no
demand" from "this gateway does not know the ModelServer".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.datastore import Datastore

WAITING = "matrixinfer_gateway_server_waiting_requests"
IN_FLIGHT = "matrixinfer_gateway_server_in_flight_requests"


class DemandCollector(Collector):
    def __init__(
        self,
        datastore: Datastore,
        queues: Callable[[], Mapping[str, Sized] | None],
        waking: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.datastore = datastore
        self.queues = queues  # server key -> its queue (None: no policies, nothing queues)
        # server key -> requests waiting for its first ready pod (extproc.gateway.WakeRoom)
        self.waking = waking

    def collect(self) -> Iterator[Any]:
        waiting = GaugeMetricFamily(
            WAITING,
            "Requests waiting in the gateway for a pod of the ModelServer (its fair queue, no "
            "ready pod yet, or every pod saturated without a fair queue).",
            labels=["namespace", "server"],
        )
        in_flight = GaugeMetricFamily(
            IN_FLIGHT,
            "Requests the gateway routed to the ModelServer's pods that have not finished.",
            labels=["namespace", "server"],
        )
        queues = self.queues() or {}
        waking = self.waking() if self.waking is not None else {}
        for key, view in self.datastore.snapshot.servers.items():
            ns = key.partition("/")[0]
            q = queues.get(key)
            count = (len(q) if q is not None else 0) + waking.get(key, 0)
            waiting.add_metric([ns, view.name], float(count))
            in_flight.add_metric([ns, view.name], float(sum(p.in_flight for p in view.pods)))
        yield waiting
        yield in_flight
