"""A compression plan: what the solvers decide and the lowering passes carry out.

``Plan.channels`` maps channel-group ids (``compressc.channel_groups``) to the units to keep;
``Plan.layers`` maps weight tensors (qualified names in the traced module, e.g.
``"features.0.weight"``) to their bit-width, quantization scheme and sparsity; ``Plan.removed`` names
the blocks (``compressc.removable_blocks``) replaced by their identity skips. Anything not named keeps
every channel and stays float32. Removal comes first: channels and layers of a removed block are moot.

>>> plan = Plan(channels={0: (1, 3)}, layers={"fc.weight": LayerSettings(bits=4, sparsity=0.5)}, removed=("layers.1",))
>>> Plan.from_dict(plan.to_dict()) == plan
True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["LayerSettings", "Plan", "weight_tensors", "SPARSITY_KINDS"]

SPARSITY_KINDS = ("unstructured", "kernel")


@dataclass(frozen=True)
class LayerSettings:
    """How one weight tensor is stored: ``bits`` 1..8 (integer codes), 16 or 32 (float);
    ``scheme`` symmetric / asymmetric / codebook; ``sparsity`` the fraction of weights (or of whole
    kernels, for ``sparsity_kind="kernel"``) removed by magnitude. A 1-bit uniform scheme is stored as
    a two-entry codebook: uniform 1-bit codes decode to {-s, 0} or {0, s}, never both signs.

    >>> LayerSettings(bits=1).scheme, LayerSettings(bits=2).scheme
    ('codebook', 'symmetric')
    """

    bits: int = 32
    scheme: str = "symmetric"
    sparsity: float = 0.0
    sparsity_kind: str = "unstructured"

    def __post_init__(self) -> None:
        if self.bits == 1 and self.scheme in ("symmetric", "asymmetric"):
            object.__setattr__(self, "scheme", "codebook")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.sparsity_kind not in SPARSITY_KINDS:
            raise ValueError(f"sparsity_kind must be one of {SPARSITY_KINDS}, got {self.sparsity_kind!r}")


@dataclass(frozen=True)
class Plan:
    channels: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    layers: Mapping[str, LayerSettings] = field(default_factory=dict)
    removed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", {int(g): tuple(int(i) for i in kept) for g, kept in self.channels.items()})
        object.__setattr__(self, "layers", dict(self.layers))
        object.__setattr__(self, "removed", tuple(sorted({str(b) for b in self.removed})))

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": {str(g): list(kept) for g, kept in sorted(self.channels.items())},
            "layers": {name: asdict(s) for name, s in self.layers.items()},
            "removed": list(self.removed),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        return cls(
            channels={int(g): tuple(kept) for g, kept in d.get("channels", {}).items()},
            layers={name: LayerSettings(**s) for name, s in d.get("layers", {}).items()},
            removed=tuple(d.get("removed", ())),
        )


def weight_tensors(module: nn.Module) -> list[str]:
    """Names of the tensors a plan may quantize or sparsify: floating parameters with 2+ dims
    (conv, linear, embedding, recurrent and attention weights, positional embeddings). Biases and
    norm parameters stay float32: they are few and sensitive."""
    return [name for name, p in module.named_parameters() if p.dim() >= 2 and torch.is_floating_point(p)]
