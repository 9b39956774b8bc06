"""The n2n learning curve as an image: mean reward per policy update and the best reward so far,
against evaluations spent (students drawn, without an evaluator), stage 1 (removal) and stage 2
(shrinkage) told apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressc.plotting import pyplot, save_figure

__all__ = ["plot_curve"]


def plot_curve(statistics: dict[str, Any], path: str | Path) -> None:
    """Write ``statistics["curve"]`` (``N2NSolver.statistics()``) to ``path`` (PNG, SVG, PDF: by suffix)."""
    plt = pyplot()
    curve = statistics["curve"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for stage, colour, label in ((1, "tab:orange", "stage 1: removal"), (2, "tab:blue", "stage 2: shrinkage")):
        pts = [(p["evaluations"], p["mean_reward"]) for p in curve if p["stage"] == stage and p["mean_reward"] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=colour, alpha=0.6, markersize=3, label=f"mean reward, {label}")
    best = [(p["evaluations"], p["best_reward"]) for p in curve if p["best_reward"] is not None]
    if best:
        ax.step(*zip(*best), where="post", color="black", label="best reward so far")
    if statistics["over_budget"]:
        ax.axhline(-1.0, color="grey", linestyle=":", linewidth=1, label="penalty (over budget)")
    ax.set_xlabel("evaluations" if statistics.get("teacher_score") is not None else "students")
    ax.set_ylabel("reward  C(2-C) * score / teacher  (-1: over budget)")
    ax.set_title(f"n2n: {statistics['updates']} policy updates, {statistics['students']} students, "
                 f"{statistics['over_budget']} over budget")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
