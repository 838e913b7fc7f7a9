"""The SimPy model of pipelined (speculative) inference."""

from ..scenario import Scenario
from ..trace import Trace
from ..world.memory import check_memory_fit
from .engine import SimulationEngine, SimulationError
from .engine import simulate as _simulate_engine


def simulate(scenario: Scenario) -> Trace:
    """Simulate a scenario with its configured strategy, after checking that its placement fits every node's
    memory (where known: ``cluster.memory`` or ``cluster.hardware``); a placement that does not fit raises
    ``MemoryFitError`` naming the node, the bytes needed and available."""
    check_memory_fit(scenario)
    return _simulate_engine(scenario)


__all__ = ["SimulationEngine", "SimulationError", "simulate"]
