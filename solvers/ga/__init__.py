"""``ga``: the genetic solver (GeneCAI-style NSGA-II Pareto search, guided by sensitivity, two-step fitness).

``genotype`` encodes choices, ``nsga`` ranks populations, ``operators`` breed them, ``fitness`` scores
them (cheap for all, fine-tuned for the best), ``checkpoint`` saves a generation, ``solver`` runs the
loop and ``plot`` draws the front.
"""

from compressc.solvers.ga.solver import FrontPoint, GeneticSolver

__all__ = ["GeneticSolver", "FrontPoint"]
