"""Passes over the graph IR: ``analysis`` (annotate) and ``lowering`` (rewrite)."""
