"""How fast every figure and summary table regenerates from a results table of the full grid's size.

Builds a synthetic table shaped like the paper grid's (every defense, attack, architecture,
dataset, ratio, SPC and seed; metrics random), then draws every registered figure (PNG + PDF)
and writes every summary table, timing each. As the side-by-side reference, one per-facet figure
is also drawn the straightforward way (seaborn ``catplot`` with one box-plot panel per defense),
against ours (box statistics per panel drawn with matplotlib directly).

    python benchmarks/figure_speed.py [--runs 122236]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from bdsweep.figures import FIGURES, PANELS, draw, facet_levels, successful_runs
from bdsweep.tables import TABLES, write

PRUNING = ("fp", "bnp", "clp", "anp", "awm", "rnp", "mm-bd", "npd")
FINE_TUNING = ("ft", "fst", "ft-sam", "nad", "nc", "pbe", "i-bau", "sau")


def synthetic_table(runs: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    grid = list(itertools.product(("cifar10", "gtsrb", "tiny"),
                                  ("preact_resnet18", "vgg19_bn", "efficientnet_b3", "mobilenet_v3_large"),
                                  ("badnets", "blended", "sig", "lf", "ssba", "iab", "wanet", "bpp"),
                                  (0.01, 0.05, 0.1), ("none", *PRUNING, *FINE_TUNING), (2, 10, 100), range(10)))
    rows = pd.DataFrame([grid[i] for i in rng.choice(len(grid), size=runs, replace=False)],
                        columns=["dataset", "architecture", "attack", "ratio", "defense", "spc", "seed"])
    data_free = rows["defense"].isin(("none", "clp"))
    rows["spc"] = rows["spc"].astype("Int64").mask(data_free)
    rows["seed"] = rows["seed"].astype("Int64").mask(data_free)
    rows["family"] = np.where(rows["defense"].isin(PRUNING), "pruning",
                              np.where(rows["defense"].isin(FINE_TUNING), "fine-tuning", "none"))
    rows["target"] = 0
    rows["status"] = np.where(rng.uniform(size=runs) < 0.01, "failed", "ok")
    rows["pre_acc"] = rng.uniform(0.7, 0.95, runs)
    rows["post_acc"] = rows["pre_acc"] - rng.uniform(0, 0.3, runs)
    rows["post_asr"] = rng.beta(0.5, 1.5, runs)
    rows["rdr"] = rng.uniform(0, 1, runs)
    rows["arr"] = (rows["pre_acc"] - rows["post_acc"]) / rows["pre_acc"]
    return rows


def reference_facet_figure(table: pd.DataFrame, facet: str) -> plt.Figure:
    """The straightforward way: seaborn catplot, a panel per (measure, defense)."""
    runs = successful_runs(table)
    runs = runs.assign(level=facet_levels(runs, facet)[0])
    long = runs.melt(id_vars=["label", "level"], value_vars=[column for column, _ in PANELS], var_name="measure")
    grid = sns.catplot(data=long, x="level", y="value", col="label", row="measure", kind="box", sharey="row",
                       height=2.5, aspect=0.8)
    return grid.figure


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=122_236)
    args = parser.parse_args()
    table = synthetic_table(args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        figure_seconds = {name: timed(lambda name=name: draw(name, table, out / f"{name}.png", out / f"{name}.pdf"))
                          for name in sorted(FIGURES)}
        table_seconds = {name: timed(lambda name=name: write(name, table, out / f"{name}.csv", out / f"{name}.md"))
                         for name in sorted(TABLES)}

        def reference():
            figure = reference_facet_figure(table, "attack")
            figure.savefig(out / "reference.png", dpi=150)
            figure.savefig(out / "reference.pdf")
            plt.close(figure)

        reference_seconds = timed(reference)
    for name, seconds in {**figure_seconds, **table_seconds}.items():
        print(f"{name:<28} {seconds:6.2f} s")
    print(f"{len(table):,} rows: {len(FIGURES)} figures in {sum(figure_seconds.values()):.1f} s, "
          f"{len(TABLES)} tables in {sum(table_seconds.values()):.1f} s (one process, one after the other)")
    ours = figure_seconds["supp10_attack"]
    print(f"per-facet figure of every defense: reference seaborn catplot {reference_seconds:.1f} s, ours {ours:.1f} s "
          f"({reference_seconds / ours:.1f}x)")


if __name__ == "__main__":
    main()
