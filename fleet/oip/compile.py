"""Compile ``grpc_predict_v2.proto`` into the modules beside it (a build step, not run at import).

Needs ``grpcio-tools`` (not a runtime dependency)::

    python -m fleet.oip.compile

The generated ``grpc_predict_v2_pb2.py`` / ``_pb2_grpc.py`` are committed; run this again after
changing the ``.proto``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    root = here.parent.parent
    proto = here / "grpc_predict_v2.proto"
    return int(
        protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{root}",
                f"--python_out={root}",
                f"--pyi_out={root}",
                f"--grpc_python_out={root}",
                str(proto.relative_to(root)),
            ]
        )
    )


if __name__ == "__main__":
    sys.exit(main())
