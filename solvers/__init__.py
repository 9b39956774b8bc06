"""Solver plugins: a compression ``Problem`` -> a ``Plan``."""
