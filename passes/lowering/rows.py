"""A weight tensor as rows (one per channel), and those rows in blocks of bounded size.

The quantizers work on rows: one row per index of the channel dim (one row for a per-tensor scale).
``Rows`` holds a weight's rows *as the weight stores them* (a view where the layout allows) with its
keep-mask, and hands out float64 blocks of at most ``compressc.perf.BLOCK_ELEMENTS`` elements, masked-out weights set
to 0. Every computation of ``compressc.passes.lowering.quantize`` is elementwise given the per-row
parameters, or a max / sum along a row, so working block by block gives the same bits as working on
the whole float64 tensor, while the temporaries stay a few MB whatever the weight's size (a 100M-weight
layer as float64 is 800 MB; its int64 codes another 800 MB).

>>> import torch
>>> w = torch.arange(12.0).reshape(3, 4)
>>> rows = Rows(to_rows(w, 0), keep=None)
>>> rows.block(slice(1, 3), slice(0, 2)).tolist()
[[4.0, 5.0], [8.0, 9.0]]
>>> rows.full().dtype, [(r.start, r.stop) for r, _ in rows.blocks(size=8)]
(torch.float64, [(0, 2), (2, 3)])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from compressc.perf import row_blocks

__all__ = ["to_rows", "from_rows", "Rows"]


def to_rows(t: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """``t`` as a 2-D tensor with one row per index of ``channel_dim`` (one row when None)."""
    if channel_dim is None:
        return t.reshape(1, -1)
    n = t.shape[channel_dim]
    rest = math.prod(t.shape[:channel_dim] + t.shape[channel_dim + 1 :])
    return t.movedim(channel_dim, 0).reshape(n, rest)


def from_rows(x: torch.Tensor, shape: tuple[int, ...], channel_dim: int | None) -> torch.Tensor:
    """The inverse of ``to_rows``: rows back to a tensor of ``shape``."""
    if channel_dim is None:
        return x.reshape(shape)
    moved = (shape[channel_dim],) + shape[:channel_dim] + shape[channel_dim + 1 :]
    return x.reshape(moved).movedim(0, channel_dim)


@dataclass(frozen=True, eq=False)
class Rows:
    """A weight's rows in its own dtype (``data``, 2-D) and its keep-mask rows (bool, or None): the
    float64 rows the quantizers fit, handed out a block at a time (``block``) or whole (``full``)."""

    data: torch.Tensor
    keep: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def block(self, r: slice, c: slice) -> torch.Tensor:
        """Rows ``r``, columns ``c`` as float64, masked-out weights set to 0."""
        x = self.data[r, c].to(torch.float64)
        return x if self.keep is None else torch.where(self.keep[r, c], x, 0.0)

    def full(self) -> torch.Tensor:
        """All rows as float64, masked-out weights set to 0 (8 bytes per weight: for small tensors,
        and where the result must be one tensor, as in training)."""
        return self.block(slice(None), slice(None))

    def blocks(self, size: int | None = None) -> Iterator[tuple[slice, slice]]:
        """``row_blocks`` of these rows."""
        return row_blocks(*self.shape, size=size)
