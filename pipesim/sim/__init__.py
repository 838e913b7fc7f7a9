"""The SimPy model of pipelined (speculative) inference."""

from .engine import SimulationEngine, SimulationError, simulate

__all__ = ["SimulationEngine", "SimulationError", "simulate"]
