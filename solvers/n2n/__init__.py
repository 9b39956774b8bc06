"""The ``n2n`` solver: N2N learning's removal and shrinkage policies (``solver``), the policies and
their file format (``policy``), and the learning-curve plot (``curves``)."""

from compressc.solvers.n2n.solver import N2NSolver

__all__ = ["N2NSolver"]
