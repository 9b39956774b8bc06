"""N2N's two recurrent policies, and their file format (plain tensors, loadable across models).

Both read the knobs in topological order (``problem.order``), one step per knob, as feature vectors
(:func:`knob_inputs`): the layer's features (``LayerFeatures.vector()``), the knob's kind and the
budget's size relative to the model, nothing that depends on the number of layers. That is what lets a policy trained on one model warm-start the
search on another.

- ``RemovalPolicy``: a bidirectional LSTM over the whole sequence; at each ``remove`` knob a logit,
  ``P(remove) = sigmoid(logit)``.
- ``ShrinkPolicy``: an LSTM over the other knobs (keep, bits, sparsity), fed the previous step's
  action (the paper's autoregressive shrinkage policy) and whether the knob is moot (its block was
  removed). At each knob it outputs the mean of a Gaussian; the sample ``z`` is the knob's shrink
  offset: the student puts knob ``j`` at position ``u_j = clip(t + z_j, 0, 1)`` along its options
  (0: as it is, 1: its most compressed option; the nearest option is taken), with one level ``t``
  for the whole student, the least that fits the budget (the solver finds it). So the policy learns
  how to share the compression between layers, the budget sets how much there is, and what it
  learned carries over to a model with another budget or depth.

Output layers start at zero: an untrained policy compresses every knob alike (offsets 0) and removes
each block with probability 0.27.

>>> import torch
>>> p = Policies.fresh(feature_dim=5, seed=0)
>>> x = torch.zeros(7, 5 + EXTRA)
>>> p.removal(x).shape, p.removal(x)[0].item()
(torch.Size([7]), -1.0)
>>> Policies.from_state(p.state()).removal(x).tolist() == p.removal(x).tolist()
True
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from compressc.errors import UserError
from compressc.search.problem import Budget, LayerFeatures, Problem

__all__ = ["RemovalPolicy", "ShrinkPolicy", "Policies", "knob_inputs", "FEATURE_DIM", "KINDS", "EXTRA", "FORMAT", "PolicyFileError"]

KINDS = ("keep", "bits", "sparsity", "remove")
EXTRA = len(KINDS) + 2  # kind one-hot, log budget fraction, options count
FORMAT = "compressc-n2n-policy"
VERSION = 1
HIDDEN = 32


class PolicyFileError(UserError):
    """A ``--policy-in`` file that is missing, not a policy, or made for other features."""


FEATURE_DIM = LayerFeatures.SIZE


def knob_inputs(problem: Problem, budget: Budget, order: Sequence[int]) -> torch.Tensor:
    """One row per knob of ``order`` (``problem.order``): its layer's features (``knob.features.vector()``),
    the knob's kind (one-hot), the budget's
    log fraction of the uncompressed bytes (0 without a byte budget) and ``log2`` of its option count."""
    top = problem.bytes(problem.uncompressed())
    fraction = math.log(budget.bytes / top) / 10.0 if budget.bytes and top else 0.0
    rows = []
    for j in order:
        knob = problem.knobs[j]
        kind = [float(knob.kind == k) for k in KINDS]
        rows.append(np.concatenate([knob.features.vector(), kind, [fraction, math.log2(len(knob.options)) / 4.0]]))
    return torch.as_tensor(np.asarray(rows, dtype=np.float32))


class RemovalPolicy(nn.Module):
    """Bidirectional LSTM over the knob sequence -> one remove logit per step."""

    def __init__(self, input_dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, -1.0)  # an untrained policy removes a block with p = 0.27

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(steps, input_dim)`` -> logits ``(steps,)``."""
        h, _ = self.lstm(x.unsqueeze(0))
        return self.head(h[0]).squeeze(-1)


class ShrinkPolicy(nn.Module):
    """LSTM cell over the knob sequence, fed its previous action -> a Gaussian's mean per step."""

    def __init__(self, input_dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(input_dim + 2, hidden)  # + previous position, moot flag
        self.head = nn.Linear(hidden, 1)
        self.log_std = nn.Parameter(torch.tensor(math.log(0.15)))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def rollout(self, x: torch.Tensor, moot: torch.Tensor, generator: torch.Generator | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offsets ``(students, steps)`` in ``[-1, 1]`` and their summed log-probabilities ``(students,)``.

        ``x``: ``(steps, input_dim)``; ``moot``: ``(students, steps)``. With ``generator`` None the
        policy acts greedily (its mean), with log-probability 0. Moot steps act 0 and add nothing.
        """
        students, steps = moot.shape
        h = c = torch.zeros(students, self.head.in_features)
        prev = torch.zeros(students, 1)
        std = self.log_std.clamp(math.log(0.02), math.log(0.5)).exp()
        offsets, logp = [], torch.zeros(students)
        for t in range(steps):
            flag = moot[:, t:t + 1].float()
            h, c = self.cell(torch.cat([x[t].expand(students, -1), prev, flag], dim=1), (h, c))
            mean = self.head(h).squeeze(-1)
            if generator is None:
                z = mean.detach()
            else:
                z = (mean + std * torch.randn(students, generator=generator)).detach()
                step_logp = -((z - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
                logp = logp + torch.where(moot[:, t], torch.zeros(()), step_logp)
            z = torch.where(moot[:, t], torch.zeros(()), z.clamp(-1.0, 1.0))
            offsets.append(z)
            prev = z.unsqueeze(1)
        return torch.stack(offsets, dim=1), logp


class Policies:
    """The removal and shrink policies and their file format."""

    def __init__(self, feature_dim: int, removal: RemovalPolicy, shrink: ShrinkPolicy,
                 trained_on: list[dict] | None = None) -> None:
        self.feature_dim, self.removal, self.shrink = feature_dim, removal, shrink
        self.trained_on = list(trained_on or [])  # one entry per search that trained them: knobs, budget, updates

    @classmethod
    def fresh(cls, feature_dim: int, seed: int) -> "Policies":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(feature_dim, RemovalPolicy(feature_dim + EXTRA), ShrinkPolicy(feature_dim + EXTRA))

    def parameters(self) -> list[nn.Parameter]:
        return [*self.removal.parameters(), *self.shrink.parameters()]

    # -- the file format -----------------------------------------------------------------------
    def state(self) -> dict:
        """A dict of tensors and plain metadata (what ``torch.save`` writes; no code is pickled)."""
        return {"format": FORMAT, "version": VERSION, "feature_dim": self.feature_dim, "hidden": HIDDEN,
                "trained_on": list(self.trained_on),
                "removal": {k: v.detach().clone() for k, v in self.removal.state_dict().items()},
                "shrink": {k: v.detach().clone() for k, v in self.shrink.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict, where: str = "policy") -> "Policies":
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise PolicyFileError(f"{where} is not an n2n policy file (no format {FORMAT!r})",
                                  hint="pass a file written by --policy-out (solver_options policy_out)")
        if state.get("version") != VERSION or state.get("hidden") != HIDDEN:
            raise PolicyFileError(f"{where}: policy version {state.get('version')} / hidden size {state.get('hidden')} "
                                  f"is not what this compressc reads (version {VERSION}, hidden {HIDDEN})",
                                  hint="train a new policy with --policy-out")
        dim = int(state["feature_dim"])
        policies = cls(dim, RemovalPolicy(dim + EXTRA), ShrinkPolicy(dim + EXTRA), state.get("trained_on"))
        try:
            policies.removal.load_state_dict(state["removal"])
            policies.shrink.load_state_dict(state["shrink"])
        except (KeyError, RuntimeError) as e:
            raise PolicyFileError(f"{where}: its tensors do not fit the n2n policies: {e}",
                                  hint="pass a file written by --policy-out") from None
        return policies

    def save(self, path: str | Path) -> None:
        """Write atomically: a failed write leaves no partial file at ``path``."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        os.close(fd)
        try:
            torch.save(self.state(), tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "Policies":
        """Read a policy file with ``weights_only=True`` (tensors and plain data only)."""
        path = Path(path)
        if not path.is_file():
            raise PolicyFileError(f"policy file {path} does not exist",
                                  hint="write one with --policy-out on an earlier run")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or it holds pickled code weights_only refuses
            raise PolicyFileError(f"{path} cannot be read as an n2n policy: {str(e).splitlines()[0]}",
                                  hint="pass a file written by --policy-out") from None
        return cls.from_state(state, str(path))
