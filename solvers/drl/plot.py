"""The ``drl`` solver's learning curves as a figure (``--plot PATH``; needs ``compressc[plot]``).

Top panel: each episode's reward (hollow markers: random plans and demonstrations; one colour per
stage) and the best reward so far (a step line); a dashed line where stage 2 starts. Bottom panel:
each episode's weights-file bytes against the byte budget (every episode is under it, by construction).
An agent that learns shows rewards climbing towards the best line after warm-up, and its spread
narrowing as the exploration noise shrinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressc.errors import UserError
from compressc.plotting import pyplot, save_figure

__all__ = ["plot_curves"]

COLOURS = {"prune": "tab:blue", "quantize": "tab:orange", "joint": "tab:green"}


def plot_curves(statistics: dict[str, Any], path: str | Path) -> Path:
    """Write the curves in ``statistics`` (``DRLSolver.statistics()``) to ``path``; returns the path."""
    plt = pyplot()
    curve = statistics.get("curve") or {}
    if not curve.get("reward"):
        raise UserError("the drl solver has no learning curve to plot: it scored no episode "
                        "(the budget already fitted the uncompressed model, or no evaluation was left)",
                        hint="plot after a solve that ran episodes")
    x = list(range(1, len(curve["reward"]) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    for stage in dict.fromkeys(curve["stage"]):
        for warm in (True, False):
            pts = [(i, r) for i, r, s, w in zip(x, curve["reward"], curve["stage"], curve["warmup"])
                   if s == stage and w == warm]
            if pts:
                top.scatter(*zip(*pts), s=14, facecolors="none" if warm else COLOURS.get(stage, "tab:gray"),
                            edgecolors=COLOURS.get(stage, "tab:gray"),
                            label=f"{stage}{' (random plans, demonstrations)' if warm else ''}")
    top.step(x, curve["best"], where="post", color="black", linewidth=1.5, label="best so far")
    bottom.scatter(x, curve["bytes"], s=8, color="tab:gray")
    budget = statistics.get("budget_bytes")
    if budget:
        bottom.axhline(budget, color="tab:red", linewidth=1, label=f"budget {budget:,} B")
        bottom.legend(loc="lower right", fontsize=8)
    starts = [i for i in range(1, len(x)) if curve["stage"][i] != curve["stage"][i - 1]]
    for i in starts:
        for ax in (top, bottom):
            ax.axvline(x[i] - 0.5, color="gray", linestyle="--", linewidth=1)
    top.set_ylabel("reward (score)")
    top.set_title(f"drl: {len(x)} episodes, best score {statistics.get('best_score', float('nan')):.4g}")
    top.legend(loc="lower right", fontsize=8)
    bottom.set_ylabel("weights bytes")
    bottom.set_xlabel("episode")
    fig.tight_layout()
    return save_figure(fig, path)
