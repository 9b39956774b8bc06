"""Lowering passes: they take a ``Graph`` and a plan and build a new, smaller module."""
