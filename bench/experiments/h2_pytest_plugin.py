"""Run the gateway test-suite with the extproc on the HTTP/2 prototype (not product code).

``.venv/bin/python -m pytest -p bench.experiments.h2_pytest_plugin tests/extproc tests/matrixinfer``
swaps ``extproc.main`` for ``bench.experiments.h2_real`` in every ``GatewayStack`` the tests
start (``H2_INLINE=1``: with the InlineDriver), so the product's own end-to-end tests check
that the prototype transport behaves the same.
"""

from __future__ import annotations

import os
from typing import Any

from matrixinfer import stack as _stack

_orig_init = _stack.GatewayStack.__init__


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _orig_init(self, *args, **kwargs)
    argv = self.extproc.argv
    argv[argv.index("extproc.main")] = "bench.experiments.h2_real"
    if os.environ.get("H2_INLINE") == "1":  # the InlineDriver experiment
        argv.append("--inline")


_stack.GatewayStack.__init__ = _init  # type: ignore[method-assign]
