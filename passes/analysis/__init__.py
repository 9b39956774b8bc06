"""Analysis passes: they annotate a ``Graph`` and never change the module."""
