"""What every ``--plot`` shares: matplotlib loaded on demand (the optional extra ``compressc[plot]``),
headless, with a clear error when it is missing, and a figure written with a clear error when the path
cannot take it. The solvers draw their own pictures (ga: the front; drl, n2n: learning curves).
"""

from __future__ import annotations

from pathlib import Path

from compressc.errors import UserError

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend; ``UserError`` naming the extra if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed",
                        hint="pip install compressc[plot]") from None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (its suffix picks the format: .png, .svg, .pdf) and close it."""
    path = Path(path)
    try:
        fig.savefig(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write the plot {path}: {e}",
                        hint="give --plot a writable path ending in .png, .svg or .pdf") from None
    finally:
        pyplot().close(fig)
    return path
