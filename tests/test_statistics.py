"""Summary statistics of the results table, on hand-made tables."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from bdsweep.layout import CLEAN
from bdsweep.statistics import (
    CLEAN_COST_COLUMNS,
    PAIRED_COLUMNS,
    bootstrap_medians,
    clean_cost,
    consistency,
    failures,
    grouped_bootstrap_medians,
    holm,
    median_ci,
    paired_comparisons,
    summary,
    to_markdown,
)

FAMILIES = {"none": "none", "clp": "pruning", "fp": "pruning", "anp": "pruning", "ft": "fine-tuning",
            "nad": "fine-tuning"}


def attack_type(attack: str) -> str | None:
    """What the run files record: the attack's registered trigger type (None for clean models)."""
    from bdsweep.registry import ATTACKS

    return None if attack == CLEAN else ATTACKS.get(attack).trigger_type


def row(defense="ft", attack="badnets", spc=10, seed=0, asr=0.1, rdr=0.2, arr=0.05, architecture="small_cnn",
        dataset="digits", ratio=0.1, target=0, status="ok", pre_acc=0.9, post_acc=0.85):
    return {"dataset": dataset, "architecture": architecture, "attack": attack, "attack_type": attack_type(attack),
            "ratio": ratio, "target": target, "defense": defense, "family": FAMILIES[defense], "spc": spc, "seed": seed,
            "pre_acc": pre_acc,
            "pre_asr": np.nan if attack == CLEAN else 0.95, "pre_ra": 0.05, "post_acc": post_acc,
            "post_asr": asr, "post_ra": 0.8, "arr": arr, "rdr": rdr, "status": status}


def table(rows) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("spc", "seed"):
        frame[column] = frame[column].astype("Int64")
    return frame


def synthetic(n_rows: int, seed: int = 0) -> pd.DataFrame:
    """A results table of about ``n_rows`` runs over the grid, with random metrics and a few failures."""
    rng = np.random.default_rng(seed)
    grid = pd.DataFrame(itertools.product(["cifar10", "gtsrb", "tiny"], ["resnet18", "vgg16", "preact"],
                                          ["badnets", "blended", "sig", "lf", "ssba", "iab", "bpp", "wanet", CLEAN],
                                          [0.01, 0.05, 0.1], [0, 1]),
                        columns=["dataset", "architecture", "attack", "ratio", "target"])
    mitigations = pd.DataFrame(itertools.product([10, 50, 100, 500], range(16)), columns=["spc", "seed"])
    data_defenses = [d for d in FAMILIES if d not in ("none", "clp")]
    with_data = grid.merge(mitigations, how="cross").merge(pd.DataFrame({"defense": data_defenses}), how="cross")
    without = grid.merge(pd.DataFrame({"defense": ["none", "clp"]}), how="cross")
    runs = pd.concat([with_data, without], ignore_index=True)
    runs = runs.iloc[np.sort(rng.permutation(len(runs))[:n_rows])].reset_index(drop=True)
    runs["family"] = runs["defense"].map(FAMILIES)
    runs["attack_type"] = runs["attack"].map(attack_type)
    runs["pre_acc"] = rng.uniform(0.7, 0.95, len(runs))
    runs["post_acc"] = runs["pre_acc"] - rng.uniform(0, 0.1, len(runs))
    for column in ("pre_asr", "pre_ra", "post_asr", "post_ra", "rdr"):
        runs[column] = rng.uniform(0, 1, len(runs))
    runs["arr"] = (runs["pre_acc"] - runs["post_acc"]) / runs["pre_acc"]
    runs["status"] = np.where(rng.random(len(runs)) < 0.02, "failed", "ok")
    for column in ("spc", "seed"):
        runs[column] = runs[column].astype("Int64")
    return runs


# --- summary ---------------------------------------------------------------------------------------------------------

def test_summary_quartiles_equal_numpy_and_ci_contains_median():
    rng = np.random.default_rng(3)
    asr_ft, asr_fp = rng.uniform(0, 1, 41), rng.uniform(0, 0.5, 40)
    rows = [row("ft", asr=a, seed=i) for i, a in enumerate(asr_ft)] + [row("fp", asr=a, seed=i)
                                                                       for i, a in enumerate(asr_fp)]
    rows += [row("ft", attack=CLEAN, asr=5.0), row("ft", asr=7.0, status="failed")]  # both ignored
    result = summary(table(rows))
    assert list(result.columns) == ["family", "defense", "metric", "n", "median", "q1", "q3", "iqr", "ci_low",
                                    "ci_high"]
    assert list(result["defense"].unique()) == ["fp", "ft"]  # pruning before fine-tuning
    for defense, values in (("ft", asr_ft), ("fp", asr_fp)):
        got = result[(result["defense"] == defense) & (result["metric"] == "post_asr")].iloc[0]
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        assert got["n"] == len(values)
        assert got["median"] == pytest.approx(median) and got["q1"] == pytest.approx(q1)
        assert got["q3"] == pytest.approx(q3) and got["iqr"] == pytest.approx(q3 - q1)
        assert got["ci_low"] <= median <= got["ci_high"] and got["ci_low"] < got["ci_high"]
        assert values.min() <= got["ci_low"] and got["ci_high"] <= values.max()


def test_summary_ci_narrows_with_more_data_and_is_seeded():
    rng = np.random.default_rng(4)
    small = table([row("ft", asr=a, seed=i) for i, a in enumerate(rng.uniform(0, 1, 20))])
    large = table([row("ft", asr=a, seed=i) for i, a in enumerate(rng.uniform(0, 1, 2000))])
    width = {name: (s := summary(t).iloc[0])["ci_high"] - s["ci_low"] for name, t in (("small", small),
                                                                                     ("large", large))}
    assert width["large"] < width["small"] / 3
    pd.testing.assert_frame_equal(summary(small, seed=1), summary(small.iloc[::-1], seed=1))  # row order irrelevant
    assert summary(large, seed=1).iloc[0]["ci_low"] != summary(large, seed=2).iloc[0]["ci_low"]


def test_summary_ci_of_a_defense_does_not_depend_on_other_defenses():
    rng = np.random.default_rng(5)
    ft = [row("ft", asr=a, seed=i) for i, a in enumerate(rng.uniform(0, 1, 30))]
    fp = [row("fp", asr=a, seed=i) for i, a in enumerate(rng.uniform(0, 1, 30))]
    alone = summary(table(ft))
    together = summary(table(fp + ft))
    pd.testing.assert_frame_equal(alone, together[together["defense"] == "ft"].reset_index(drop=True))


def test_summary_facets_keep_null_levels_and_derive_attack_type():
    rows = [row("ft", spc=10, asr=0.1), row("ft", spc=10, asr=0.3), row("ft", spc=50, asr=0.5),
            row("clp", spc=None, seed=None, asr=0.7), row("ft", attack="wanet", asr=0.9)]
    by_spc = summary(table(rows), facets=("spc",))
    asr = by_spc[by_spc["metric"] == "post_asr"]
    assert asr[["defense", "n", "median"]].values.tolist() == [["clp", 1, 0.7], ["ft", 3, 0.3], ["ft", 1, 0.5]]
    assert pd.isna(asr.iloc[0]["spc"])
    by_type = summary(table(rows), facets=("attack_type",))
    ft = by_type[(by_type["defense"] == "ft") & (by_type["metric"] == "post_asr")]
    assert dict(zip(ft["attack_type"], ft["median"])) == {"dynamic": 0.9, "static": 0.3}


def test_bootstrap_medians_match_exhaustive_resampling():
    """The sampled resample medians have the exact bootstrap distribution (all n^n resamples)."""
    for n in (4, 5):
        values = np.array([0.0, 1.0, 3.0, 7.0, 15.0][:n])
        exact = pd.Series([np.median(values[list(i)]) for i in itertools.product(range(n), repeat=n)])
        exact = exact.value_counts(normalize=True)
        drawn = pd.Series(bootstrap_medians(values, 200_000, np.random.default_rng(0))).value_counts(normalize=True)
        assert 0.5 * exact.sub(drawn, fill_value=0).abs().sum() < 0.01
    # several groups at once give each group what it gets alone
    groups = [np.array([2.0]), np.array([0.0, 1.0, 3.0, 7.0]), np.array([1.0, 2.0, 4.0, 8.0, 9.0])]
    draws = np.random.default_rng(1).random((3, 3, 500))
    together = grouped_bootstrap_medians(np.concatenate(groups), np.array([0, 1, 5]), np.array([1, 4, 5]), draws)
    for i, group in enumerate(groups):
        alone = grouped_bootstrap_medians(group, np.array([0]), np.array([len(group)]), draws[i:i + 1])
        np.testing.assert_array_equal(together[i], alone[0])


def test_median_ci_of_one_value_and_of_none():
    assert median_ci([0.4]) == (0.4, 0.4)
    assert all(np.isnan(median_ci([np.nan])))


# --- Markdown --------------------------------------------------------------------------------------------------------

def test_to_markdown_format():
    frame = pd.DataFrame({"defense": ["fp", "a|b"], "n": [3, 12], "median": [0.12345, np.nan],
                          "better": [True, False]})
    assert to_markdown(frame) == ("| defense | n | median | better |\n"
                                  "| --- | ---: | ---: | --- |\n"
                                  "| fp | 3 | 0.123 | yes |\n"
                                  "| a\\|b | 12 |  | no |\n")
    assert "| 0.1 |" in to_markdown(frame, float_format="{:.1f}")
    assert to_markdown(frame.iloc[:0]).count("\n") == 2


# --- paired comparisons ----------------------------------------------------------------------------------------------

def test_holm_on_known_p_values():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.001, 0.9, np.nan]), [1.0, 0.003, 1.0, np.nan])  # capped, NaN uncounted
    np.testing.assert_allclose(holm([0.02, 0.01]), [0.02, 0.02])  # monotone in the raw order


def matched(defense, baseline_asr, defense_asr, attacks=("badnets",), seeds=range(30)):
    rows = []
    for attack, seed in itertools.product(attacks, seeds):
        rows.append(row(FAMILIES[defense] == "pruning" and "fp" or "ft", attack=attack, seed=seed,
                        asr=baseline_asr(seed)))
        rows.append(row(defense, attack=attack, seed=seed, asr=defense_asr(seed)))
    return rows


def test_defense_identical_to_baseline_is_not_significant():
    result = paired_comparisons(table(matched("nad", lambda s: 0.1 * (s % 7), lambda s: 0.1 * (s % 7))))
    assert list(result.columns) == list(PAIRED_COLUMNS)
    assert set(result["defense"]) == {"nad"}  # the baseline gets no row
    assert (result["n_pairs"] == 30).all() and (result["median_difference"] == 0).all()
    assert (result["p_value"] == 1).all() and (result["p_holm"] == 1).all()
    assert not result["significant"].any() and not result["better"].any()


def test_uniformly_better_defense_is_significant_and_better():
    rows = matched("nad", lambda s: 0.5 + 0.01 * s, lambda s: 0.2 + 0.01 * s)
    rows += matched("anp", lambda s: 0.5 + 0.01 * s, lambda s: 0.5 + 0.01 * s + 0.003 * ((-1) ** s))
    result = paired_comparisons(table(rows)).set_index(["defense", "metric"])
    nad = result.loc[("nad", "post_asr")]
    assert nad["n_pairs"] == 30 and nad["median_difference"] == pytest.approx(-0.3)
    assert nad["p_value"] < 1e-5 and nad["significant"] and nad["better"]
    assert nad["matched_on"] == "model+spc+seed" and nad["baseline"] == "ft"
    anp = result.loc[("anp", "post_asr")]
    assert anp["baseline"] == "fp" and not anp["significant"] and not anp["better"]
    assert not result.loc[("nad", "rdr"), "significant"]  # equal rdr on both sides


def test_unmatched_runs_are_not_paired():
    rows = [row("ft", seed=s, asr=0.5) for s in range(10)]
    rows += [row("nad", seed=s + 100, asr=0.0) for s in range(10)]  # other mitigation sets
    rows += [row("nad", seed=s, asr=0.0, attack="wanet") for s in range(10)]  # another model
    rows += [row("nad", seed=s, asr=0.0, spc=50) for s in range(10)]  # another spc
    rows += [row("nad", seed=s, asr=0.0, status="failed") for s in range(10)]  # failed
    rows += [row("nad", seed=s, asr=0.0, attack=CLEAN) for s in range(3)] + [row("ft", attack=CLEAN, asr=0.5)]
    rows += [row("nad", seed=s, asr=0.0) for s in range(3)]  # the only pairs
    result = paired_comparisons(table(rows))
    assert (result["n_pairs"] == 3).all()


def test_data_free_defense_is_paired_with_the_baselines_median_per_model():
    rows = [row("fp", seed=s, asr=a, attack=attack) for s, a in enumerate([0.2, 0.4, 0.9])
            for attack in ("badnets", "wanet", "sig")]
    rows += [row("clp", spc=None, seed=None, asr=0.1, attack=attack) for attack in ("badnets", "wanet", "iab")]
    result = paired_comparisons(table(rows)).set_index("metric")
    assert result.loc["post_asr", "matched_on"] == "model" and result.loc["post_asr", "n_pairs"] == 2
    assert result.loc["post_asr", "median_difference"] == pytest.approx(0.1 - 0.4)


# --- consistency -----------------------------------------------------------------------------------------------------

def test_consistency_zero_for_a_steady_defense_larger_for_a_varying_one():
    attacks = ["badnets", "blended", "wanet", "iab"]
    rows = [row("ft", attack=a, seed=s, asr=0.2 + 0.01 * s) for a in attacks for s in range(3)]
    rows += [row("nad", attack=a, seed=s, asr=0.2 * i + 0.01 * s) for i, a in enumerate(attacks) for s in range(3)]
    result = consistency(table(rows)).set_index("defense")
    assert result.index.tolist() == ["ft", "nad"]  # most consistent first
    assert result.loc["ft", "attack_std"] == 0 and result.loc["ft", "score"] == 0
    medians = np.array([0.01, 0.21, 0.41, 0.61])
    assert result.loc["nad", "attack_std"] == pytest.approx(medians.std())
    assert result.loc["nad", "attack_range"] == pytest.approx(0.6)
    assert result.loc["nad", "attack_levels"] == 4 and result.loc["nad", "dataset_levels"] == 1
    assert result.loc["nad", "score"] == pytest.approx(medians.std() / 3)
    assert {"family", "median", "architecture_std", "dataset_range"} <= set(result.columns)


# --- clean cost ------------------------------------------------------------------------------------------------------

def test_clean_cost_with_and_without_clean_runs():
    rows = [row("ft", attack=CLEAN, seed=s, pre_acc=0.9, post_acc=0.9 - 0.01 * s, arr=0.01 * s / 0.9)
            for s in range(5)]
    rows += [row("ft", attack=CLEAN, seed=9, post_acc=0.1, status="failed"), row("ft", post_acc=0.1, arr=0.9)]
    result = clean_cost(table(rows))
    assert list(result.columns) == list(CLEAN_COST_COLUMNS)
    assert result["defense"].tolist() == ["ft"] and result.loc[0, "n"] == 5
    assert result.loc[0, "median_acc_drop"] == pytest.approx(0.02)
    assert result.loc[0, "median_arr"] == pytest.approx(0.02 / 0.9)
    empty = clean_cost(table([row("ft")]))
    assert empty.empty and list(empty.columns) == list(CLEAN_COST_COLUMNS)


# --- scale -----------------------------------------------------------------------------------------------------------

def test_all_functions_on_a_20k_row_table():
    runs = synthetic(20_000)
    assert len(summary(runs)) == 6 * 3
    assert len(summary(runs, facets=("spc",))) == (4 * 4 + 2) * 3  # spc null for none and clp
    assert len(summary(runs, facets=("attack_type",))) == 6 * 2 * 3
    assert len(paired_comparisons(runs)) == 3 * 3  # clp, anp and nad against fp/ft, three metrics
    assert consistency(runs).shape == (6, 3 + 3 * 3 + 1)  # defense, family, median, 3 per facet, score
    assert clean_cost(runs).shape == (6, len(CLEAN_COST_COLUMNS))
    assert to_markdown(summary(runs)).count("\n") == 6 * 3 + 2


def test_failures_are_counted_per_defense_with_their_most_common_reason():
    table = pd.DataFrame({"family": ["pruning"] * 4 + ["fine-tuning"] * 2, "defense": ["anp"] * 4 + ["ft"] * 2,
                          "status": ["ok", "failed", "failed", "failed", "ok", "ok"],
                          "reason": [None, "non-finite weights after defense", "ValueError: x\ntrace",
                                     "ValueError: x\nother trace", None, None]})
    out = failures(table).set_index("defense")
    assert out.loc["anp", "runs"] == 4 and out.loc["anp", "failed"] == 3 and out.loc["anp", "failed_share"] == 0.75
    assert out.loc["anp", "most_common_reason"] == "ValueError: x" and out.loc["anp", "most_common_reason_count"] == 2
    assert out.loc["ft", "failed"] == 0 and pd.isna(out.loc["ft", "most_common_reason"])
