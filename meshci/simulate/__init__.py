"""Event-driven replay of plans: device queues, link and shared-medium contention."""

from meshci.simulate.engine import SimulationResult, simulate_plan

__all__ = ["SimulationResult", "simulate_plan"]
