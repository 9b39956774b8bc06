"""Test-wide settings."""

import torch

# CI runs two pytest workers on two cores; torch's own thread pool on top of that oversubscribes the
# CPU and made tiny training and evaluation steps tens of times slower (measured while writing
# tests/test_finetune.py and the sensitivity pass). One thread per worker.
torch.set_num_threads(1)
