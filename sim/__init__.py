"""MatrixInfer engine simulator: a vLLM / SGLang stand-in for machines without GPUs.

Public surface: :class:`Fleet` / :class:`SimPod` (start simulator processes), :class:`SimConfig`
(one simulator's settings), :class:`Engine` (the pure continuous-batching core) and
:class:`Tokenizer` (the simulator's deterministic tokenizer). See sim/README.md.
"""

from sim.config import EngineConfig, FaultConfig, SimConfig, TimingModel
from sim.engine import Engine, Request
from sim.fleet import Fleet, SimPod
from sim.tokenizer import Tokenizer

__all__ = [
    "Engine",
    "EngineConfig",
    "FaultConfig",
    "Fleet",
    "Request",
    "SimConfig",
    "SimPod",
    "TimingModel",
    "Tokenizer",
]
