"""Summary tables of the results table (CSV and Markdown), each its own file target.

Every table is a function of the results table alone, registered in ``TABLES`` with a caption;
the numbers are defined in ``bdsweep.statistics``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from . import statistics
from .atomic import atomic_path


@dataclass(frozen=True)
class SummaryTable:
    make: Callable[[pd.DataFrame], pd.DataFrame]
    caption: str


FACETS = ("spc", "attack", "attack_type", "architecture", "dataset", "ratio")
TABLES: dict[str, SummaryTable] = {
    "medians": SummaryTable(lambda t: statistics.summary(t), "Median, IQR and bootstrap 95 % CI of the median of "
                            "ASR, RDR and ARR per defense, over every setting."),
    **{f"medians_by_{facet}": SummaryTable(lambda t, facet=facet: statistics.summary(t, facets=(facet,)),
                                           f"Median, IQR and bootstrap 95 % CI of ASR, RDR and ARR per defense and "
                                           f"{facet.replace('_', ' ')}.")
       for facet in FACETS},
    "paired_vs_baseline": SummaryTable(statistics.paired_comparisons, "Each defense against its family's baseline "
                                       "(FP for pruning, FT for fine-tuning) over matched runs: median paired "
                                       "difference, Wilcoxon signed-rank p-value, Holm-corrected."),
    "consistency": SummaryTable(statistics.consistency, "Spread of each defense's median ASR across attacks, "
                                "architectures and datasets (lower = more consistent)."),
    "failures": SummaryTable(statistics.failures, "Runs and failed runs per defense (an exception or non-finite "
                             "weights), with the most common reason."),
    "clean_cost": SummaryTable(statistics.clean_cost, "What each defense costs a clean (unpoisoned) model: median "
                               "accuracy drop and ARR."),
}


def write(name: str, results: pd.DataFrame, csv: str | os.PathLike, markdown: str | os.PathLike) -> pd.DataFrame:
    if name not in TABLES:
        raise KeyError(f"unknown summary table {name!r}; known: {', '.join(TABLES)}")
    spec = TABLES[name]
    frame = spec.make(results)
    with atomic_path(csv) as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(markdown) as tmp:
        tmp.write_text(f"{spec.caption}\n\n{statistics.to_markdown(frame).rstrip()}\n")
    return frame
