"""Figures of the survey's section VI, drawn from the results table only (never a model).

Each figure is a function registered in ``FIGURES`` under the name of its file target.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .atomic import atomic_path  # noqa: E402

FIGURES: dict[str, Callable[[pd.DataFrame], plt.Figure]] = {}
FAMILY_MARK = {"pruning": "\u2020", "fine-tuning": "\u2666", "none": ""}  # the paper's dagger / diamond
FAMILY_ORDER = {"none": 0, "pruning": 1, "fine-tuning": 2}
BASELINES = {"fp": ("pruning baseline (FP)", "tab:blue", "--"), "ft": ("fine-tuning baseline (FT)", "tab:red", ":")}
PANELS = (("post_asr", "ASR"), ("rdr", "RDR"), ("arr", "ARR"))


def figure(name: str):
    def decorate(draw):
        FIGURES[name] = draw
        return draw

    return decorate


def successful_runs(table: pd.DataFrame) -> pd.DataFrame:
    ok = table[table["status"] == "ok"].copy()
    if ok.empty:
        raise ValueError("the results table has no successful runs to plot")
    ok["label"] = [("no defense" if d == "none" else d.upper()) + FAMILY_MARK.get(f, "")
                   for d, f in zip(ok["defense"], ok["family"])]
    return ok


def defense_order(runs: pd.DataFrame) -> list[str]:
    """Labels sorted as the paper groups them: no defense, pruning, then fine-tuning."""
    pairs = runs[["label", "family", "defense"]].drop_duplicates()
    pairs = pairs.assign(rank=pairs["family"].map(FAMILY_ORDER)).sort_values(["rank", "defense"])
    return list(pairs["label"])


@figure("fig6_boxplots")
def boxplots(table: pd.DataFrame) -> plt.Figure:
    """Fig. 6: distribution of ASR, RDR and ARR per defense over every setting."""
    runs = successful_runs(table)
    order = defense_order(runs)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(6, 0.7 * len(order) + 2), 8), sharex=True)
    for ax, (column, title) in zip(axes, PANELS):
        sns.boxplot(data=runs, x="label", y=column, order=order, hue="family", dodge=False, ax=ax,
                    palette="Set2", fliersize=2, legend=ax is axes[0])
        ax.set_ylabel(title)
        ax.set_xlabel("")
        ax.axhline(0, color="grey", lw=0.6)
    axes[0].legend(title="family", fontsize="small")
    axes[-1].set_xlabel("defense (\u2020 pruning, \u2666 fine-tuning)")
    fig.suptitle("ASR, RDR and ARR per defense over all settings (0 is ideal)")
    fig.tight_layout()
    return fig


@figure("fig7_medians")
def medians(table: pd.DataFrame) -> plt.Figure:
    """Fig. 7: median RDR and ARR against median ASR per defense, with the rectangle from the
    origin to each baseline's medians: a defense inside it beats that baseline on both axes."""
    runs = successful_runs(table)
    summary = runs.groupby(["defense", "label", "family"], as_index=False)[["post_asr", "rdr", "arr"]].median()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (column, title) in zip(axes, PANELS[1:]):
        sns.scatterplot(data=summary, x="post_asr", y=column, hue="family", style="family", s=70, ax=ax)
        for row in summary.itertuples():
            ax.annotate(row.label, (row.post_asr, getattr(row, column)), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        for defense, (name, colour, style) in BASELINES.items():
            base = summary[summary["defense"] == defense]
            if len(base):
                ax.add_patch(Rectangle((0, 0), base["post_asr"].iloc[0], base[column].iloc[0], fill=False,
                                       edgecolor=colour, linestyle=style, label=name))
        ax.set_xlabel("median ASR")
        ax.set_ylabel(f"median {title}")
        ax.set_xlim(-0.02, 1.1)  # ASR is a fraction; the margin keeps labels of points at 1 visible
        top = max(summary[column].max(), 0) * 1.15 or 0.1
        ax.set_ylim(min(0, summary[column].min() * 1.15) - 0.02 * top, top)
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle("Median RDR and ARR vs median ASR per defense (bottom-left is ideal)")
    fig.tight_layout()
    return fig


def draw(name: str, table: pd.DataFrame, png: str | os.PathLike, pdf: str | os.PathLike) -> None:
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    fig = FIGURES[name](table)
    try:
        for path, fmt in ((png, "png"), (pdf, "pdf")):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=150)
    finally:
        plt.close(fig)
