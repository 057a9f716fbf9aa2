"""Summary statistics and tests of the survey's section VI, drawn from the results table only.

Every function takes the results table (``bdsweep.results``: one row per defense run) and returns a
plain DataFrame, ready for ``DataFrame.to_csv`` or ``to_markdown`` below. Unless a function says
otherwise it uses the successful runs (``status == "ok"``) of backdoored models (``attack`` other
than ``bdsweep.layout.CLEAN``). For the three metrics reported per defense, ASR after defense
(``post_asr``), RDR and ARR, 0 is ideal and lower is better.

All randomness (the bootstrap) is seeded, and seeded per group: a confidence interval depends only
on the runs of its own group, the seed and the number of resamples, never on the other rows of the
table or on their order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from .layout import CLEAN
from .lazy import LazyModule
from .taxonomy import BASELINES, FAMILY_ORDER

special, stats = LazyModule("scipy.special"), LazyModule("scipy.stats")  # imported when a table is computed

METRICS = ("post_asr", "rdr", "arr")
MODEL_KEYS = ("dataset", "architecture", "attack", "ratio", "target")  # one backdoored model
RUN_KEYS = ("spc", "seed")  # one mitigation set of a defense that uses data
ALPHA = 0.05
BOOTSTRAP_BLOCK = 2_000_000  # bootstrap medians held in memory at once

SUMMARY_COLUMNS = ("n", "median", "q1", "q3", "iqr", "ci_low", "ci_high")
PAIRED_COLUMNS = ("family", "defense", "baseline", "metric", "matched_on", "n_pairs", "median_defense",
                  "median_baseline", "median_difference", "statistic", "p_value", "p_holm", "significant", "better")
CLEAN_COST_COLUMNS = ("family", "defense", "n", "median_pre_acc", "median_post_acc", "median_acc_drop", "median_arr")


# --- selection -------------------------------------------------------------------------------------------------------

def _require(table: pd.DataFrame, columns) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"the results table lacks column(s) {', '.join(missing)}")


def with_attack_type(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its ``attack_type`` column filled: "static" or "dynamic" as each attack's
    registration declares it (the survey's Table III; the run files carry it), "clean" for clean
    models and "unknown" where a run file predates the column."""
    _require(table, ("attack",))
    recorded = table["attack_type"] if "attack_type" in table.columns else pd.Series(None, index=table.index)
    kind = recorded.astype(object).where(recorded.notna(), "unknown")
    kind[table["attack"] == CLEAN] = "clean"
    return table.assign(attack_type=kind)


def backdoored_runs(table: pd.DataFrame, facets: Sequence[str] = ()) -> pd.DataFrame:
    """The successful runs of backdoored models, with ``attack_type`` added when a facet asks for it."""
    _require(table, ("attack", "status", "defense"))
    if "attack_type" in facets:
        table = with_attack_type(table)
    _require(table, facets)
    return table[(table["status"] == "ok") & (table["attack"] != CLEAN)]


def _ordered(frame: pd.DataFrame, by: Sequence[str], metric_column: str | None = None) -> pd.DataFrame:
    """Rows sorted as the paper groups defenses (no defense, pruning, fine-tuning), then by ``by``."""
    keys = {}
    if "family" in frame.columns:
        keys["_family"] = frame["family"].map(FAMILY_ORDER).fillna(len(FAMILY_ORDER))
    if metric_column is not None:
        keys["_metric"] = frame[metric_column].map({m: i for i, m in enumerate(METRICS)}).fillna(len(METRICS))
    sort = [*(k for k in ("_family",) if k in keys), *by, *(k for k in ("_metric",) if k in keys)]
    out = frame.assign(**keys).sort_values(sort, kind="stable", na_position="first")
    return out.drop(columns=list(keys)).reset_index(drop=True)


# --- bootstrap of a median -------------------------------------------------------------------------------------------

def _group_rng(seed: int, key) -> np.random.Generator:
    """A generator of its own for one group, from the seed and the group's printed key."""
    text = "|".join(str(part) for part in (key if isinstance(key, tuple) else (key,)))
    return np.random.default_rng([seed, zlib.crc32(text.encode())])


def bootstrap_medians(sorted_values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``n_resamples`` bootstrap medians of ``sorted_values`` (ascending, no NaN); see ``grouped_bootstrap_medians``."""
    values = np.asarray(sorted_values, dtype=float)
    if not len(values):
        return np.full(n_resamples, np.nan)
    draws = rng.random((1, 3, n_resamples))
    return grouped_bootstrap_medians(values, np.array([0]), np.array([len(values)]), draws)[0]


def grouped_bootstrap_medians(values: np.ndarray, first: np.ndarray, sizes: np.ndarray,
                              draws: np.ndarray) -> np.ndarray:
    """Bootstrap medians of several groups at once: group g is ``values[first[g]:first[g] + sizes[g]]``
    (sorted ascending, ``first[0] == 0``, contiguous, sizes >= 1); ``draws`` (groups, 3, resamples)
    are its uniforms in [0, 1). Returns (groups, resamples) medians.

    A bootstrap resample draws n indices uniformly with replacement; its median depends only on
    the ranks drawn. Rather than drawing n * resamples indices and sorting them (about 25 s for the
    122k-row table on this project's machines), each resample's median rank is drawn directly from
    its exact distribution, so a resample costs O(1), with the same distribution as index resampling:

    - lower median rank L (0-based order statistic k = (n - 1) // 2): L <= j exactly when at least
      k + 1 of the n draws are <= j, a Binomial(n, (j + 1) / n) tail, drawn by inverting that CDF;
    - for even n, the upper median rank U: U = L unless exactly k + 1 draws are <= L, which given L
      has probability pmf(k + 1) * (1 - (L / (L + 1)) ** (k + 1)) / P(L); then the other n - k - 1
      draws are uniform above L and U is their minimum, drawn by inverting its CDF.
    """
    count = len(sizes)
    group = np.repeat(np.arange(count), sizes)
    n_row = sizes[group]
    rank = np.arange(len(group)) - np.repeat(first, sizes)
    cdf = special.bdtrc((n_row - 1) // 2, n_row, (rank + 1) / n_row)  # P(L <= rank)
    cdf[first + sizes - 1] = 1.0
    n, start = sizes[:, None], first[:, None]
    k = (n - 1) // 2
    found = np.searchsorted(cdf + group, draws[:, 0, :] + np.arange(count)[:, None], side="right")
    lower = np.minimum(found - start, n - 1)
    m = np.maximum(n - k - 1, 1)  # draws above the lower median when it is not repeated
    previous = np.where(lower > 0, cdf[start + np.maximum(lower - 1, 0)], 0.0)
    p_lower = cdf[start + lower] - previous
    p = (lower + 1) / n
    with np.errstate(divide="ignore", invalid="ignore"):  # p = 1 at the top rank: pmf 0
        log_pmf = (special.gammaln(n + 1) - special.gammaln(k + 2) - special.gammaln(m + 1)
                   + (k + 1) * np.log(p) + m * np.log1p(-p))
        single = np.exp(log_pmf) * (1 - (lower / (lower + 1)) ** (k + 1))
        q = np.clip(np.where(p_lower > 0, single / p_lower, 0.0), 0.0, 1.0)
    above = np.ceil(n - 1 - (n - 1 - lower) * (1 - draws[:, 2, :]) ** (1 / m))
    upper = np.where((n % 2 == 0) & (draws[:, 1, :] < q), np.clip(above, lower + 1, n - 1), lower).astype(np.int64)
    return (values[start + lower] + values[start + upper]) / 2


def median_ci(values, n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
              rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``values`` (NaN ignored)."""
    values = np.sort(np.asarray(values, dtype=float))
    values = values[~np.isnan(values)]
    if not len(values):
        return np.nan, np.nan
    medians = bootstrap_medians(values, n_resamples, rng if rng is not None else np.random.default_rng(seed))
    tail = (1 - level) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return float(low), float(high)


# --- 1. summary ------------------------------------------------------------------------------------------------------

def summary(table: pd.DataFrame, facets: Sequence[str] = (), n_resamples: int = 1000, seed: int = 0,
            level: float = 0.95) -> pd.DataFrame:
    """Median and spread of ASR, RDR and ARR per defense (and per level of each facet column).

    One row per (family, defense, facet levels..., metric), over the successful runs of backdoored
    models, with columns:

    - n: runs with a value of the metric;
    - median, q1, q3: the 50th, 25th and 75th percentiles (numpy's linear interpolation), what the
      survey's box plots draw; iqr = q3 - q1, the height of the box;
    - ci_low, ci_high: a 95 % (``level``) percentile-bootstrap confidence interval of the median
      (``n_resamples`` resamples, seeded per row): where the median of another sweep of the same
      settings would plausibly fall. Two defenses whose intervals do not overlap differ clearly;
      for a proper test of one defense against another use ``paired_comparisons``.

    ``facets`` are table columns such as ("spc",), ("attack",), ("architecture",), ("dataset",),
    ("ratio",) or the derived ("attack_type",) (static/dynamic, Table III). Runs whose facet is null
    (spc of defenses that use no data) form their own level.
    """
    facets = [f for f in facets if f not in ("family", "defense")]
    runs = backdoored_runs(table, facets)
    _require(runs, METRICS)
    keys = [*(["family"] if "family" in runs.columns else []), "defense", *facets]
    frames = []
    for metric in METRICS:
        data = runs[[*keys, metric]].dropna(subset=[metric])
        if data.empty:
            continue
        codes = data.groupby(keys, sort=True, dropna=False).ngroup().to_numpy()
        values = data[metric].to_numpy(dtype=float)
        order = np.lexsort((values, codes))  # by group, then by value
        values, codes = values[order], codes[order]
        first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        sizes = np.diff(np.r_[first, len(values)])
        frame = data.iloc[order[first]][keys].reset_index(drop=True)
        frame["n"] = sizes
        for name, q in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):  # numpy's default (linear) percentiles
            position = (sizes - 1) * q
            below = np.floor(position).astype(np.int64)
            above = np.minimum(below + 1, sizes - 1)
            low, high = values[first + below], values[first + above]
            frame[name] = low + (position - below) * (high - low)
        frame["iqr"] = frame["q3"] - frame["q1"]
        tail = (1 - level) / 2
        intervals = np.empty((len(frame), 2))
        block = max(1, BOOTSTRAP_BLOCK // max(n_resamples, 1))  # groups at a time: memory stays bounded
        key_rows = list(frame[keys].itertuples(index=False, name=None))
        for lo in range(0, len(frame), block):
            hi = min(lo + block, len(frame))
            draws = np.stack([_group_rng(seed, (metric, *key)).random((3, n_resamples)) for key in key_rows[lo:hi]])
            span = slice(first[lo], first[hi - 1] + sizes[hi - 1])
            medians = grouped_bootstrap_medians(values[span], first[lo:hi] - first[lo], sizes[lo:hi], draws)
            intervals[lo:hi] = np.quantile(medians, [tail, 1 - tail], axis=1).T
        frame["ci_low"], frame["ci_high"] = intervals[:, 0], intervals[:, 1]
        frames.append(frame.assign(metric=metric))
    if not frames:
        return pd.DataFrame(columns=[*keys, "metric", *SUMMARY_COLUMNS])
    out = pd.concat(frames, ignore_index=True)[[*keys, "metric", *SUMMARY_COLUMNS]]
    out["n"] = out["n"].astype(int)
    return _ordered(out, ["defense", *facets], metric_column="metric")


# --- 2. Markdown -----------------------------------------------------------------------------------------------------

def _cell(value, float_format: Callable[[float], str]) -> str:
    if value is None or (not isinstance(value, (str, bytes)) and np.ndim(value) == 0 and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        text = float_format(float(value))
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(frame: pd.DataFrame, float_format: str | Callable[[float], str] = "{:.3f}") -> str:
    """``frame`` as a GitHub Markdown table (the index is not written: ``reset_index()`` first to keep it).

    Floats go through ``float_format`` (a ``str.format`` pattern or a function), booleans read
    yes/no, missing values are empty cells, ``|`` is escaped; numeric columns are right-aligned.
    For CSV use ``frame.to_csv(path, index=False)``.
    """
    fmt = float_format.format if isinstance(float_format, str) else float_format
    names = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in frame.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype) else "---"
             for dtype in frame.dtypes]
    lines = ["| " + " | ".join(_cell(n, fmt) for n in names) + " |", "| " + " | ".join(align) + " |"]
    for row in frame.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_cell(value, fmt) for value in row) + " |")
    return "\n".join(lines) + "\n"


# --- 3. paired comparisons -------------------------------------------------------------------------------------------

def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of ``p_values`` (NaN kept as NaN and not counted): the i-th
    smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) * p_(j))."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if not len(valid):
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted


def _signed_rank(differences: np.ndarray) -> tuple[float, float]:
    """Wilcoxon signed-rank statistic and two-sided p-value; zero differences are dropped
    (scipy's default), all-zero differences give (0, 1) and no pairs (NaN, NaN)."""
    if not len(differences):
        return np.nan, np.nan
    if not np.any(differences != 0):
        return 0.0, 1.0
    result = stats.wilcoxon(differences, alternative="two-sided")
    return float(result.statistic), float(result.pvalue)


def paired_comparisons(table: pd.DataFrame, baselines: Mapping[str, str] | None = None,
                       alpha: float = ALPHA) -> pd.DataFrame:
    """Each defense against its family's baseline (FP for pruning, FT for fine-tuning), run by run.

    A pair is one backdoored model (dataset, architecture, attack, ratio, target) mitigated by
    both defenses with the same mitigation set (spc and seed), so the difference isolates the
    defense from the setting. A defense that uses no data (spc null, e.g. CLP) is paired per model
    with the median of the baseline's runs on that model over all its spc/seed (``matched_on`` =
    "model"; otherwise "model+spc+seed"). Runs without a partner are left out; duplicated runs of
    one key are reduced to their median first. Families absent from ``baselines`` (e.g. "none")
    get no rows, nor do the baselines themselves.

    One row per (defense, metric), with columns:

    - n_pairs: matched pairs with the metric on both sides;
    - median_defense, median_baseline: medians over those pairs; median_difference: median of
      (defense - baseline) per pair. 0 is ideal for ASR, RDR and ARR, so negative = better;
    - statistic, p_value: Wilcoxon signed-rank test (two-sided) that the differences are centred on
      0 (zero differences dropped; all zero: p = 1);
    - p_holm: Holm-corrected over all defenses for that metric; significant: p_holm < ``alpha``;
      better: significant and median_difference < 0 (worse: significant and > 0).
    """
    baselines = dict(BASELINES if baselines is None else baselines)
    runs = backdoored_runs(table)
    _require(runs, ("family", *MODEL_KEYS, *RUN_KEYS, *METRICS))
    rows = []
    for family, baseline in baselines.items():
        in_family = runs[runs["family"] == family]
        base = in_family[in_family["defense"] == baseline]
        for defense in sorted(set(in_family["defense"]) - {baseline}):
            own = in_family[in_family["defense"] == defense]
            per_model = own["spc"].isna().all() or (len(base) > 0 and base["spc"].isna().all())
            keys = list(MODEL_KEYS) if per_model else [*MODEL_KEYS, *RUN_KEYS]
            pairs = pd.merge(own.groupby(keys)[list(METRICS)].median(), base.groupby(keys)[list(METRICS)].median(),
                             left_index=True, right_index=True, suffixes=("_defense", "_baseline"))
            for metric in METRICS:
                both = pairs[[f"{metric}_defense", f"{metric}_baseline"]].dropna().to_numpy(dtype=float)
                differences = both[:, 0] - both[:, 1]
                statistic, p_value = _signed_rank(differences)
                medians = np.median(both, axis=0) if len(both) else (np.nan, np.nan)
                rows.append({"family": family, "defense": defense, "baseline": baseline, "metric": metric,
                             "matched_on": "model" if per_model else "model+spc+seed", "n_pairs": len(both),
                             "median_defense": medians[0], "median_baseline": medians[1],
                             "median_difference": np.median(differences) if len(differences) else np.nan,
                             "statistic": statistic, "p_value": p_value})
    out = pd.DataFrame(rows, columns=[c for c in PAIRED_COLUMNS if c not in ("p_holm", "significant", "better")])
    out["p_holm"] = np.nan
    for metric in METRICS:
        mine = (out["metric"] == metric).to_numpy()
        out.loc[mine, "p_holm"] = holm(out.loc[mine, "p_value"].to_numpy(dtype=float))
    out["n_pairs"] = out["n_pairs"].astype(int)
    out["significant"] = (out["p_holm"] < alpha).astype(bool)
    out["better"] = out["significant"] & (out["median_difference"] < 0)
    return _ordered(out[list(PAIRED_COLUMNS)], ["defense"], metric_column="metric")


# --- 4. consistency --------------------------------------------------------------------------------------------------

def consistency(table: pd.DataFrame, facets: Sequence[str] = ("attack", "architecture", "dataset"),
                metric: str = "post_asr") -> pd.DataFrame:
    """How much a defense's median ASR changes with the attack, the architecture and the dataset.

    For each facet, the defense's median ``metric`` is taken separately at every level of the
    facet it was run on (e.g. one median per attack); then, per defense and facet:

    - {facet}_levels: how many levels; {facet}_std: the standard deviation of those medians
      (population, ddof = 0, so one level gives 0); {facet}_range: their max - min;

    and ``score``: the mean of the per-facet standard deviations, ``median`` the overall median.
    Lower is more consistent: 0 means the defense leaves the same median ASR whatever the attack,
    architecture or dataset. It says nothing about how low that ASR is (read it with ``median``).
    Rows are sorted by score, most consistent first.
    """
    facets = list(facets)
    runs = backdoored_runs(table, facets)
    _require(runs, (metric,))
    runs = runs.dropna(subset=[metric])
    out = pd.DataFrame({"median": runs.groupby("defense")[metric].median()})
    if "family" in runs.columns:
        out.insert(0, "family", runs.groupby("defense")["family"].first())
    for facet in facets:
        level_medians = runs.groupby(["defense", facet], dropna=False)[metric].median().groupby(level="defense")
        out[f"{facet}_levels"] = level_medians.size()
        out[f"{facet}_std"] = level_medians.std(ddof=0)
        out[f"{facet}_range"] = level_medians.max() - level_medians.min()
    out["score"] = out[[f"{facet}_std" for facet in facets]].mean(axis=1) if facets else np.nan
    out = out.reset_index()
    return out.sort_values(["score", "defense"], kind="stable").reset_index(drop=True)


# --- 5. cost on clean models -----------------------------------------------------------------------------------------

def clean_cost(table: pd.DataFrame) -> pd.DataFrame:
    """What a defense costs when there is no backdoor: its successful runs on clean models only.

    Per defense: n runs; median_pre_acc and median_post_acc, the clean accuracy before and after;
    median_acc_drop, the median of pre_acc - post_acc (accuracy points lost, as a fraction);
    median_arr, the median ARR = (pre_acc - post_acc) / pre_acc (the share of accuracy lost).
    Near 0 is ideal. Empty, with these columns, when the table has no clean-model runs.
    """
    _require(table, ("attack", "status", "defense", "pre_acc", "post_acc", "arr"))
    runs = table[(table["status"] == "ok") & (table["attack"] == CLEAN)]
    if runs.empty:
        return pd.DataFrame({c: pd.Series(dtype=float if c.startswith("median") else
                                          (int if c == "n" else object)) for c in CLEAN_COST_COLUMNS})
    runs = runs.assign(acc_drop=runs["pre_acc"] - runs["post_acc"],
                       family=runs["family"] if "family" in runs.columns else "")
    grouped = runs.groupby(["family", "defense"])
    out = pd.DataFrame({"n": grouped.size(), "median_pre_acc": grouped["pre_acc"].median(),
                        "median_post_acc": grouped["post_acc"].median(),
                        "median_acc_drop": grouped["acc_drop"].median(), "median_arr": grouped["arr"].median()})
    return _ordered(out.reset_index()[list(CLEAN_COST_COLUMNS)], ["defense"])


# --- 6. failures ------------------------------------------------------------------------------------------------------

def failures(table: pd.DataFrame) -> pd.DataFrame:
    """Per defense: runs, failed runs (an exception or non-finite weights), their share, and the most
    common reason (its first line) with its count. A failed run is a result, never dropped."""
    _require(table, ("status", "defense", "reason"))
    runs = table.assign(failed=table["status"] != "ok",
                        first_line=table["reason"].fillna("").astype(str).str.split("\n").str[0],
                        family=table["family"] if "family" in table.columns else "")
    grouped = runs.groupby(["family", "defense"])
    out = pd.DataFrame({"runs": grouped.size(), "failed": grouped["failed"].sum()})
    out["failed_share"] = out["failed"] / out["runs"]
    per_reason = runs[runs["failed"]].groupby(["family", "defense", "first_line"]).size().sort_values(ascending=False)
    top = per_reason.reset_index(level="first_line").groupby(level=["family", "defense"]).head(1)
    out["most_common_reason"] = top["first_line"].reindex(out.index)  # missing when nothing failed
    out["most_common_reason_count"] = top[0].reindex(out.index).fillna(0).astype(int)
    return _ordered(out.reset_index(), ["defense"])
