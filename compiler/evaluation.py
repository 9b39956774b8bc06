"""The one check of what a model file's ``evaluate(model)`` returns (used by the driver, the
sensitivity pass and fine-tuning).

>>> checked_score(0.97, "on the original model")
0.97
>>> checked_score(float("nan"), "after fine-tuning")
Traceback (most recent call last):
compressc.errors.UserError: evaluate(model) returned nan after fine-tuning; it must return a finite number
  hint: check evaluate for a division by zero or an empty evaluation set
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from compressc.errors import UserError

__all__ = ["checked_score"]


def checked_score(value: Any, when: str) -> float:
    """``value`` as a float, or a ``UserError`` saying what evaluate returned and ``when``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(
            f"evaluate(model) returned {type(value).__name__} {value!r} {when}; it must return a number "
            "(higher is better, e.g. accuracy in [0, 1])"
        )
    if not math.isfinite(value):
        raise UserError(f"evaluate(model) returned {value} {when}; it must return a finite number",
                        hint="check evaluate for a division by zero or an empty evaluation set")
    return float(value)
