"""Snapshots of a module for the no-mutation promise (invariant 6): take one before, compare after."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["snapshot", "assert_unchanged"]


def snapshot(module: nn.Module) -> dict:
    """Everything a pass must not touch: tensors bit for bit, module tree, attributes, modes."""
    def attrs(m):
        return {k: v for k, v in vars(m).items()
                if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}

    return {
        "state": {k: (v.dtype, tuple(v.shape), v.detach().clone()) for k, v in module.state_dict().items()},
        "tree": [(name, type(m).__name__, attrs(m), m.training) for name, m in module.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in module.named_parameters()],
        "code": module.code if isinstance(module, torch.fx.GraphModule) else None,
    }


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    """Fail naming ``what`` and the first difference between two snapshots."""
    assert before["tree"] == after["tree"], f"{what}: module tree, attributes or modes changed"
    assert before["params"] == after["params"], f"{what}: parameters were replaced"
    assert before["code"] == after["code"], f"{what}: graph changed"
    assert before["state"].keys() == after["state"].keys(), f"{what}: state_dict keys changed"
    for k, (dtype, shape, value) in before["state"].items():
        dtype2, shape2, value2 = after["state"][k]
        assert (dtype, shape) == (dtype2, shape2) and torch.equal(value, value2), f"{what}: {k} changed"
