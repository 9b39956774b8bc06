"""The ``drl`` solver: a two-stage DDPG agent (``solver``), its episodes (``walk``), the agent (``agent``)."""

from compressc.solvers.drl.solver import DRLSolver

__all__ = ["DRLSolver"]
