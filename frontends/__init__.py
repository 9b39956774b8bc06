"""Frontends: a model (or a model file) -> the graph IR."""
