"""Every figure of section VI and every summary table draws from a results table alone; a figure
redraws only when its own code changes."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from bdsweep.figures import FIGURES, code_digest, draw, drawing_functions, facet_levels, successful_runs
from bdsweep.registry import ATTACKS
from bdsweep.tables import TABLES, write

FAMILIES = {"none": "none", "fp": "pruning", "clp": "pruning", "bnp": "pruning", "sau": "fine-tuning",
            "ft": "fine-tuning", "ft-sam": "fine-tuning"}
FEATURED = {"clp", "bnp", "sau", "ft-sam"}  # as their registrations say (test below)


def synthetic_table(seed: int = 0) -> pd.DataFrame:
    """A small grid: 2 datasets x 2 architectures x 3 attacks x 2 ratios, SPC 2/10, 2 seeds, plus clean models."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, arch, attack, ratio, defense in itertools.product(
            ("cifar10", "gtsrb"), ("preact_resnet18", "vgg19_bn"), ("badnets", "wanet", "clean"), (0.01, 0.1),
            FAMILIES):
        data_free = defense in ("none", "clp")
        for spc, seed in [(None, None)] if data_free else itertools.product((2, 10), (0, 1)):
            asr = None if attack == "clean" else float(rng.uniform())
            rows.append({"dataset": dataset, "architecture": arch, "attack": attack, "ratio": ratio, "target": 0,
                         "attack_type": None if attack == "clean" else ATTACKS.get(attack).trigger_type,
                         "defense": defense, "family": FAMILIES[defense], "featured": defense in FEATURED,
                         "spc": spc, "seed": seed, "post_asr": asr, "rdr": float(rng.uniform()),
                         "arr": float(rng.uniform(-0.1, 0.5)),
                         "pre_acc": 0.9, "post_acc": float(rng.uniform(0.5, 0.9)),
                         "status": "failed" if rng.uniform() < 0.05 else "ok"})
            rows[-1]["reason"] = "RuntimeError: boom" if rows[-1]["status"] == "failed" else None
    return pd.DataFrame(rows).astype({"spc": "Int64", "seed": "Int64"})


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_figure_is_drawn_as_png_and_pdf(tmp_path, name):
    draw(name, synthetic_table(), tmp_path / "f.png", tmp_path / "f.pdf")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.png").stat().st_size > 10_000
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert FIGURES[name].caption


def test_the_paper_figures_and_their_supplementary_versions_are_all_targets():
    numbers = {name.split("_")[0] for name in FIGURES}
    assert numbers == {f"fig{n}" for n in range(6, 15)} | {f"supp{n}" for n in range(10, 15)}


def test_facets_order_levels_as_the_paper_and_split_static_from_dynamic_attacks():
    runs = successful_runs(synthetic_table())
    types, levels = facet_levels(runs, "attack_type")
    assert levels == ["static", "dynamic"]
    assert set(types[runs["attack"] == "wanet"]) == {"dynamic"}
    assert set(types[runs["attack"] == "badnets"]) == {"static"}
    assert facet_levels(runs, "ratio")[1] == ["1", "10"]
    assert facet_levels(runs, "architecture")[1] == ["vgg19_bn", "preact_resnet18"]


def test_a_figure_fingerprints_exactly_the_code_it_draws_with():
    assert {"medians", "median_scatter", "median_summary", "successful_runs"} <= set(drawing_functions("fig7_medians"))
    assert "facet_boxplots" not in drawing_functions("fig7_medians")
    assert "median_scatter" not in drawing_functions("fig10_attack")
    assert code_digest("fig10_attack") != code_digest("supp10_attack")  # same code, other options
    assert code_digest("fig7_medians") == code_digest("fig7_medians")


def test_figures_leave_out_clean_models_and_failed_runs():
    runs = successful_runs(synthetic_table())
    assert (runs["status"] == "ok").all() and not (runs["attack"] == "clean").any() and runs["post_asr"].notna().all()


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_summary_table_is_written_as_csv_and_markdown(tmp_path, name):
    frame = write(name, synthetic_table(), tmp_path / "t.csv", tmp_path / "t.md")
    assert len(frame) > 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), frame.reset_index(drop=True), check_dtype=False)
    markdown = (tmp_path / "t.md").read_text().splitlines()
    assert markdown[0] == TABLES[name].caption and markdown[2].startswith("| ") and len(markdown) == len(frame) + 4


def test_the_featured_figures_show_exactly_the_defenses_registered_as_featured(tmp_path):
    from bdsweep.figures import facet_boxplots
    from bdsweep.registry import DEFENSES

    assert {name for name in FAMILIES if DEFENSES.get(name).featured} == FEATURED
    fig = facet_boxplots(synthetic_table(), "attack", featured_only=True)
    labels = {tick.get_text().lower() for tick in fig.axes[-1].get_xticklabels()}
    assert labels and all(any(name in label for name in FEATURED) for label in labels)
    assert not any(label.startswith(("fp", "ft ")) or label == "ft" for label in labels)


def crowded_table() -> pd.DataFrame:
    """Defenses whose medians coincide (none, FP, CLP, BNP) or nearly do (FT, FT-SAM, SAU)."""
    medians = {"none": (0.96, 0.0, 0.0), "fp": (0.96, 0.0, 0.0), "clp": (0.96, 0.0, 0.0), "bnp": (0.96, 0.0, 0.0),
               "ft": (0.05, 0.9, 0.1), "ft-sam": (0.06, 0.91, 0.1), "sau": (0.05, 0.9, 0.11)}
    rows = [{"attack": "badnets", "defense": defense, "family": FAMILIES[defense], "spc": spc, "status": "ok",
             "post_asr": asr, "rdr": rdr, "arr": arr}
            for defense, (asr, rdr, arr) in medians.items() for spc in (2, 10)]
    return pd.DataFrame(rows).astype({"spc": "Int64"})


@pytest.mark.parametrize("name", ["fig7_medians", "fig9_spc_medians"])
def test_point_labels_of_coinciding_points_do_not_overlap(name):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from bdsweep.figures import LABEL_OFFSET, POINT_LABEL

    fig = FIGURES[name].draw(crowded_table())
    try:
        for dpi in (fig.dpi, 150):  # as drawn, and as saved (draw() saves at 150 dpi)
            fig.set_dpi(dpi)
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:
                labels = [text for text in ax.texts if text.get_gid() == POINT_LABEL]
                if not labels:
                    continue
                assert len(labels) == 7 and len({label.get_text() for label in labels}) == 7
                boxes = [Text.get_window_extent(label, renderer) for label in labels]  # the text, not its line
                for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, boxes), 2):
                    assert not box_a.overlaps(box_b), (a.get_text(), b.get_text())
                # repelled, not scattered: each label stays within a few label heights of its point
                assert all(abs(x) < 80 and abs(y) < 80 for x, y in (label.xyann for label in labels))
                moved = [max(abs(a - b) for a, b in zip(label.xyann, LABEL_OFFSET)) > 1 for label in labels]
                assert sum(moved) >= 5  # at most one label of each crowd keeps its place
                assert moved == [label.arrow_patch.get_visible() for label in labels]  # a line to its point
    finally:
        plt.close(fig)
