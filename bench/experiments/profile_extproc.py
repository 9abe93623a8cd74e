"""Run ``extproc.main`` under cProfile; on SIGTERM/SIGINT write the stats (not product code).

``python -m bench.experiments.profile_extproc OUT.prof <matrixinfer-extproc args>``; the run
driver uses it for the ``real+profile`` variant.
"""

from __future__ import annotations

import cProfile
import sys

from extproc.main import main

if __name__ == "__main__":
    out = sys.argv[1]
    prof = cProfile.Profile()
    prof.enable()
    try:
        main(sys.argv[2:])
    finally:
        prof.disable()
        prof.dump_stats(out)
