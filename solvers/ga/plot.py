"""The ga solver's picture: score against weights-file bytes, for ``--plot PATH``.

Every plan the search scored is a grey dot, the non-dominated ones a blue staircase (refined ones as
filled circles), the chosen plan a red star and the byte budget a dashed vertical line. Needs
matplotlib (``pip install compressc[plot]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from compressc.plotting import pyplot, save_figure
from compressc.search.problem import Budget

__all__ = ["plot_front"]


def plot_front(path: str | Path, points: Sequence[tuple[int, float]], front: Sequence, chosen, budget: Budget,
               evaluations: int) -> None:
    """Write the figure to ``path`` (its suffix picks the format: .png, .svg, .pdf)."""
    fig, ax = pyplot().subplots(figsize=(9.5, 4.5), dpi=120)
    if points:
        ax.scatter([b for b, _ in points], [s for _, s in points], s=12, color="0.7", label=f"scored plans ({len(points)})",
                   zorder=1)
    if front:
        xs, ys = [f.bytes for f in front], [f.score for f in front]
        end = max(xs[-1], budget.bytes or xs[-1])  # the best score reachable at each size, up to the budget
        ax.step(xs + [end], ys + [ys[-1]], where="post", color="tab:blue", linewidth=1.2, zorder=2)
        refined = [f for f in front if f.refined is not None]
        cheap = [f for f in front if f.refined is None]
        if refined:
            ax.scatter([f.bytes for f in refined], [f.score for f in refined], s=28, color="tab:blue", zorder=3,
                       label=f"front, fine-tuned score ({len(refined)})")
        if cheap:
            ax.scatter([f.bytes for f in cheap], [f.score for f in cheap], s=28, facecolors="white",
                       edgecolors="tab:blue", zorder=3,
                       label=f"front, cheap score{' + median gain' if refined else ''} ({len(cheap)})")
    if chosen is not None:
        ax.scatter([chosen.bytes], [chosen.score], marker="*", s=220, color="tab:red", zorder=4,
                   label=f"chosen: {chosen.bytes:,} B, score {chosen.score:.4g}")
    if budget.bytes is not None:
        ax.axvline(budget.bytes, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget.bytes:,} B")
    ax.set_xlabel("weights file (bytes)")
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"ga: score against size ({evaluations} evaluations)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
