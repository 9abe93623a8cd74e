"""Envoy endpoint discovery from a file: the pods of the configuration, written atomically.

Envoy's ``override_host`` load-balancing policy only picks hosts its cluster knows, so the gateway
publishes every pod it may choose as a ``ClusterLoadAssignment`` file that Envoy watches
(``path_config_source`` + ``watched_directory``; the file is replaced by a rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import orjson

__all__ = ["render_eds", "write_eds"]


def render_eds(cluster: str, addresses: Iterable[str]) -> bytes:
    endpoints = []
    for address in sorted(set(addresses)):
        host, _, port = address.rpartition(":")
        endpoints.append(
            {
                "endpoint": {
                    "address": {"socket_address": {"address": host, "port_value": int(port)}}
                }
            }
        )
    doc = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": endpoints}] if endpoints else [],
            }
        ]
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def write_eds(path: Path | str, cluster: str, addresses: Iterable[str]) -> bool:
    """Replace ``path`` with the new assignment (rename, so Envoy never reads half a file).

    Returns False when the content did not change (nothing written).
    """
    path = Path(path)
    data = render_eds(cluster, addresses)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eds-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
