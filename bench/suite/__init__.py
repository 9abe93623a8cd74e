"""The benchmark suite: contenders side by side on one simulated fleet (``python -m bench``)."""

from bench.suite.config import DEFAULT_SUITE, SMOKE_SUITE, SUITES, ExtraRun, SuiteConfig
from bench.suite.run import PointResult, SuiteResult, run_suite

__all__ = [
    "DEFAULT_SUITE",
    "SMOKE_SUITE",
    "SUITES",
    "ExtraRun",
    "PointResult",
    "SuiteConfig",
    "SuiteResult",
    "run_suite",
]
