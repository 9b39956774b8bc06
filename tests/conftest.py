"""Test-wide settings."""

import torch

# CI runs two pytest workers on two cores; torch's own thread pool on top of that oversubscribes the
# CPU and made tiny training and evaluation steps tens of times slower (measured while writing
# tests/test_finetune.py and the sensitivity pass). One thread per worker.
torch.set_num_threads(1)

# Hypothesis draws the same examples on every run by default, so that a CI run is reproducible and a
# red CI means a change broke something, not that a fresh draw found an old bug. Exploration with
# fresh random examples (how this suite found most of its invariant bugs) is one variable away:
#     HYPOTHESIS_PROFILE=explore python -m pytest -n 2
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
