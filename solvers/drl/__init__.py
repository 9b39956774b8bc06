"""The ``drl`` solver's parts: a DDPG actor-critic (``agent``)."""
