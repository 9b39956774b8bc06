"""A residual block's skip must carry the network's input: an add of a learned constant (a ViT's
position embedding) is not a residual whose other side can go."""

from __future__ import annotations

import torch
from torch import nn

import compressc
from compressc.passes.analysis.removable_blocks import removable_blocks
from tests.models import REFERENCE_MODELS


class PatchPlusPosition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 8, 2, 2))
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        x = self.patch(x) + self.pos  # the constant side carries no input
        x = x + self.body(x)  # a real residual block
        return self.head(x.flatten(1))


def test_a_constant_skip_is_not_a_residual_block():
    graph = compressc.trace(PatchPlusPosition().eval(), (torch.randn(1, 3, 8, 8),))
    blocks = removable_blocks(graph)
    assert all("patch" not in b.nodes for b in blocks)
    assert any("body" in b.nodes and b.kind == "residual" for b in blocks)


def test_the_reference_vit_keeps_its_patch_embedding():
    model, inputs = REFERENCE_MODELS["vit"]()[:2]
    blocks = removable_blocks(compressc.trace(model, inputs))
    assert blocks and all("conv_proj" not in b.nodes for b in blocks)
