"""Figures of the survey's section VI, drawn from the results table only (never a model).

Each figure is registered in ``FIGURES`` under the name of its file target, with its caption.
``code_digest(name)`` fingerprints the code that draws one figure, so the workflow redraws only
the figures whose code changed.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from .atomic import atomic_path
from .layout import CLEAN
from .lazy import LazyModule, headless_matplotlib
from .taxonomy import BASELINES, FAMILY_ORDER

# Imported when a figure is drawn, not when the workflow plans (see bdsweep.lazy).
plt = LazyModule("matplotlib.pyplot", before=headless_matplotlib)
sns = LazyModule("seaborn", before=headless_matplotlib)
cbook = LazyModule("matplotlib.cbook")
patches = LazyModule("matplotlib.patches")
mtext = LazyModule("matplotlib.text")

FAMILY_MARK = {"pruning": "\u2020", "fine-tuning": "\u2666", "none": ""}  # the paper's dagger / diamond
BASELINE_STYLE = {"pruning": ("tab:blue", "--"), "fine-tuning": ("tab:red", ":")}
PANELS = (("post_asr", "ASR"), ("rdr", "RDR"), ("arr", "ARR"))
POINT_LABEL = "point-label"  # the gid of the labels that repel_point_labels moves apart
LABEL_OFFSET = (4.0, 4.0)  # points up and right of its point, where a label starts
LABEL_GAP = 2.0  # points left between two labels once repelled
# The approaches section VI-C discusses (the best of each family); the supplementary figures show all.


@dataclass(frozen=True)
class Figure:
    draw: Callable[..., plt.Figure]  # draw(table, **options)
    caption: str
    options: dict = field(default_factory=dict)


FIGURES: dict[str, Figure] = {}


def figure(name: str, caption: str | None = None, **options):
    """Register ``draw(table, **options)`` as the figure ``name``; the caption defaults to its docstring."""

    def decorate(draw):
        FIGURES[name] = Figure(draw, caption or inspect.getdoc(draw), options)
        return draw

    return decorate


def drawing_functions(name: str) -> dict[str, Callable]:
    """The figure's drawing function and every function of this module it calls, transitively."""
    module = sys.modules[__name__]
    found, pending = {}, [FIGURES[name].draw]
    while pending:
        function = pending.pop()
        if function.__name__ in found:
            continue
        found[function.__name__] = function
        codes = [function.__code__, *(c for c in function.__code__.co_consts if inspect.iscode(c))]
        pending += [obj for code in codes for n in code.co_names
                    if inspect.isfunction(obj := getattr(module, n, None)) and obj.__module__ == __name__]
    return found


def code_digest(name: str) -> str:
    """A digest of the figure's code (its functions' source), options and caption: it changes
    exactly when that figure's drawing could, so only that figure is redrawn."""
    spec = FIGURES[name]
    sources = [inspect.getsource(f) for _, f in sorted(drawing_functions(name).items())]
    text = "\n".join(sources) + repr(sorted(spec.options.items())) + spec.caption
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def successful_runs(table: pd.DataFrame) -> pd.DataFrame:
    """Successful runs on backdoored models (clean models have no ASR to plot), with a label."""
    ok = table[(table["status"] == "ok") & (table["attack"] != CLEAN)].copy()
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
    """Fig. 6: box plots of ASR, RDR and ARR per defense over every setting (\u2020 pruning,
    \u2666 fine-tuning; 0 is ideal for all three)."""
    return defense_boxplots(successful_runs(table), "family", "Set2", 0.7,
                            "ASR, RDR and ARR per defense over all settings (0 is ideal)")


def defense_boxplots(runs: pd.DataFrame, hue: str, palette: str, width: float, title: str) -> plt.Figure:
    """Figs. 6 and 8: a row per measure, a box per defense (and ``hue`` level)."""
    order = defense_order(runs)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(6, width * len(order) + 2), 8), sharex=True)
    for ax, (column, measure) in zip(axes, PANELS):
        sns.boxplot(data=runs, x="label", y=column, order=order, hue=hue, ax=ax, palette=palette, fliersize=1,
                    legend=ax is axes[0])
        ax.set(ylabel=measure, xlabel="")
        ax.axhline(0, color="grey", lw=0.6)
    axes[0].legend(title=hue.replace("spc", "SPC"), fontsize="small", ncols=3, loc="lower center",
                   bbox_to_anchor=(0.5, 1.02))
    axes[-1].set_xlabel("defense (\u2020 pruning, \u2666 fine-tuning)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@figure("fig7_medians")
def medians(table: pd.DataFrame) -> plt.Figure:
    """Fig. 7: median RDR and ARR against median ASR per defense, with the rectangle from the
    origin to each baseline's medians: a defense inside it beats that baseline on both axes."""
    summary = median_summary(successful_runs(table))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (column, title) in zip(axes, PANELS[1:]):
        median_scatter(ax, summary, column, title)
    fig.suptitle("Median RDR and ARR vs median ASR per defense (bottom-left is ideal)")
    fig.tight_layout()
    repel_point_labels(fig)
    return fig


@figure("fig8_spc_boxplots")
def spc_boxplots(table: pd.DataFrame) -> plt.Figure:
    """Fig. 8: box plots of ASR, RDR and ARR per defense and SPC (mitigation images per class);
    defenses that use no data (CLP, no defense) are left out."""
    return defense_boxplots(runs_with_data(table), "spc", "crest", 0.9, "ASR, RDR and ARR per defense and SPC")


def runs_with_data(table: pd.DataFrame) -> pd.DataFrame:
    runs = successful_runs(table)
    return runs[runs["spc"].notna()].astype({"spc": int})


@figure("fig9_spc_medians")
def spc_medians(table: pd.DataFrame) -> plt.Figure:
    """Fig. 9: median RDR and ARR against median ASR per defense, one column per SPC, with the
    FP and FT baseline rectangles of that SPC; defenses that use no data are left out."""
    runs = runs_with_data(table)
    levels = sorted(runs["spc"].unique())
    fig, axes = plt.subplots(2, len(levels), figsize=(5.5 * len(levels), 9), squeeze=False)
    for index, spc in enumerate(levels):
        summary = median_summary(runs[runs["spc"] == spc])
        for row, (column, title) in enumerate(PANELS[1:]):
            median_scatter(axes[row, index], summary, column, title)
            axes[row, index].set_title(f"SPC {spc}")
    fig.suptitle("Median RDR and ARR vs median ASR per defense and SPC (bottom-left is ideal)")
    fig.tight_layout()
    repel_point_labels(fig)
    return fig


def median_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.groupby(["defense", "label", "family"], as_index=False)[["post_asr", "rdr", "arr"]].median()


def median_scatter(ax: plt.Axes, summary: pd.DataFrame, column: str, title: str) -> None:
    """One panel of Figs. 7 and 9: a point per defense and the baselines' rectangles."""
    sns.scatterplot(data=summary, x="post_asr", y=column, hue="family", style="family", s=70, ax=ax)
    for row in summary.itertuples():
        ax.annotate(row.label, (row.post_asr, getattr(row, column)), textcoords="offset points",
                    xytext=LABEL_OFFSET, fontsize=8, gid=POINT_LABEL,
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5, "shrinkA": 0, "shrinkB": 4})
    for family, defense in BASELINES.items():
        base = summary[summary["defense"] == defense]
        if len(base):
            colour, style = BASELINE_STYLE[family]
            ax.add_patch(patches.Rectangle((0, 0), base["post_asr"].iloc[0], base[column].iloc[0], fill=False,
                                   edgecolor=colour, linestyle=style, label=f"{family} baseline ({defense.upper()})"))
    ax.set_xlabel("median ASR")
    ax.set_ylabel(f"median {title}")
    ax.set_xlim(-0.02, 1.1)  # ASR is a fraction; the margin keeps labels of points at 1 visible
    top = max(summary[column].max(), 0) * 1.15 or 0.1
    ax.set_ylim(min(0, summary[column].min() * 1.15) - 0.02 * top, top)
    ax.legend(fontsize="small", loc="best")


def repel_point_labels(fig: plt.Figure, gap: float = LABEL_GAP, max_rounds: int = 200) -> None:
    """Move the point labels of each axes apart until no two of their text boxes overlap.

    Defenses with (nearly) the same medians put their labels on top of each other. Each round
    measures every label's text box with the renderer, and every overlapping pair is pushed apart
    along the direction in which it overlaps least (half the overlap each, plus ``gap`` points);
    labels of the same point stack vertically. A label that moved keeps a thin line to its point.
    Call it once the layout is final (after ``tight_layout``): the boxes are measured in pixels.
    """
    renderer = fig.canvas.get_renderer()
    points_per_pixel = 72 / fig.dpi
    for ax in fig.axes:
        labels = [text for text in ax.texts if text.get_gid() == POINT_LABEL]
        for _ in range(max_rounds):
            moves = label_separations(labels, renderer, gap / points_per_pixel)
            if not moves:
                break
            for index, (dx, dy) in moves.items():
                x, y = labels[index].xyann
                labels[index].xyann = (x + dx * points_per_pixel, y + dy * points_per_pixel)
        for label in labels:  # the line to the point only where the label left its place
            moved = max(abs(a - b) for a, b in zip(label.xyann, LABEL_OFFSET))
            label.arrow_patch.set_visible(moved > 1.0)


def label_separations(labels: list, renderer, gap: float) -> dict[int, tuple[float, float]]:
    """Per label that overlaps another, the move in pixels that separates it (summed over pairs)."""
    boxes = []
    for label in labels:
        label.update_positions(renderer)
        boxes.append(mtext.Text.get_window_extent(label, renderer))  # the text, without its line
    moves: dict[int, tuple[float, float]] = {}

    def push(index: int, dx: float, dy: float) -> None:
        x, y = moves.get(index, (0.0, 0.0))
        moves[index] = (x + dx, y + dy)

    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0) + gap
            overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0) + gap
            if overlap_x <= 0 or overlap_y <= 0:
                continue
            if overlap_y <= overlap_x:  # the earlier label goes up when both are at the same height
                sign = 1.0 if (a.y0 + a.y1) >= (b.y0 + b.y1) else -1.0
                push(i, 0.0, sign * overlap_y / 2)
                push(j, 0.0, -sign * overlap_y / 2)
            else:
                sign = 1.0 if (a.x0 + a.x1) >= (b.x0 + b.x1) else -1.0
                push(i, sign * overlap_x / 2, 0.0)
                push(j, -sign * overlap_x / 2, 0.0)
    return moves


# Facets of Figs. 10-14: (column or derived level, axis label, the paper's order of known levels).
FACETS = {
    "attack": ("attack", ("badnets", "blended", "lf", "sig", "bpp", "iab", "ssba", "wanet")),
    "attack_type": ("attack type", ("static", "dynamic")),
    "architecture": ("architecture", ("vgg19_bn", "preact_resnet18", "efficientnet_b3", "mobilenet_v3_large")),
    "dataset": ("dataset", ("cifar10", "gtsrb", "tiny")),
    "ratio": ("poisoning ratio (%)", ()),
}
FACET_FIGURES = {"attack": 10, "attack_type": 11, "architecture": 12, "dataset": 13, "ratio": 14}


def facet_levels(runs: pd.DataFrame, facet: str) -> tuple[pd.Series, list]:
    """Each run's level of the facet and the levels in the paper's order (unknown ones last)."""
    if facet == "attack_type":
        values = runs["attack_type"].fillna("unknown") if "attack_type" in runs.columns else runs["attack"].map(
            lambda attack: "unknown")
    elif facet == "ratio":
        values = (runs["ratio"].astype(float) * 100).round(2).map(lambda r: f"{r:g}")
        return values, sorted(values.unique(), key=float)
    else:
        values = runs[facet]
    known = FACETS[facet][1]
    present = set(values)
    return values, [v for v in known if v in present] + sorted(present - set(known))


def facet_boxplots(table: pd.DataFrame, facet: str, featured_only: bool) -> plt.Figure:
    """A row per measure; along it, a group of boxes per defense, one box per facet level. Box
    statistics are computed once per group and drawn in one call per row (fast at 122k runs).
    ``featured_only``: the defenses the survey discusses (the table's ``featured`` column, which
    each defense's registration sets)."""
    runs = successful_runs(table)
    if featured_only:
        runs = runs[runs["featured"].fillna(False).astype(bool)] if "featured" in runs.columns else runs.iloc[:0]
    name = FACETS[facet][0]
    if runs.empty:
        fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 8.5))
        which = "featured defenses" if featured_only else "defenses"
        axes[0].text(0.5, 0.5, f"no successful runs of {which}", ha="center", va="center")
        return fig
    values, levels = facet_levels(runs, facet)
    runs = runs.assign(level=values)
    labels = defense_order(runs)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(max(8.0, len(labels) * (0.3 + 0.08 * len(levels)) + 1.5), 8.5),
                             sharex=True)
    colours = sns.color_palette("tab10" if len(levels) <= 10 else "husl", len(levels))
    width = 0.8 / len(levels)
    grouped = {key: frame for key, frame in runs.groupby(["label", "level"], sort=False)}
    for ax, (column, title) in zip(axes, PANELS):
        for j, level in enumerate(levels):
            present = [(i, grouped[(label, level)][column].dropna().to_numpy()) for i, label in enumerate(labels)
                       if (label, level) in grouped]
            present = [(i, v) for i, v in present if len(v)]
            if not present:
                continue
            stats = cbook.boxplot_stats([v for _, v in present])
            boxes = ax.bxp(stats, positions=[i - 0.4 + width * (j + 0.5) for i, _ in present], widths=width * 0.9,
                           patch_artist=True, flierprops={"markersize": 1, "alpha": 0.4},
                           medianprops={"color": "black", "lw": 0.8}, manage_ticks=False)
            for patch in boxes["boxes"]:
                patch.set_facecolor(colours[j])
            boxes["boxes"][0].set_label(level)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_ylabel(title)
    axes[-1].set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes[0].legend(title=name, fontsize="small", ncols=min(len(levels), 8), loc="lower center",
                   bbox_to_anchor=(0.5, 1.02))
    axes[-1].set_xlabel("defense (\u2020 pruning, \u2666 fine-tuning)")
    fig.suptitle(f"ASR, RDR and ARR per defense and {name}")
    fig.tight_layout()
    return fig


for _facet, _number in FACET_FIGURES.items():
    _name = FACETS[_facet][0]
    figure(f"fig{_number}_{_facet}", f"Fig. {_number}: box plots of ASR, RDR and ARR of the defenses the survey "
           f"discusses (those whose registration marks them featured) per {_name}.",
           facet=_facet, featured_only=True)(facet_boxplots)
    figure(f"supp{_number}_{_facet}", f"Supplementary Fig. {_number}: box plots of ASR, RDR and ARR of every "
           f"defense per {_name}.", facet=_facet, featured_only=False)(facet_boxplots)


def draw(name: str, table: pd.DataFrame, png: str | os.PathLike, pdf: str | os.PathLike) -> None:
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    spec = FIGURES[name]
    fig = spec.draw(table, **spec.options)
    try:
        for path, fmt in ((png, "png"), (pdf, "pdf")):
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=150)
    finally:
        plt.close(fig)
