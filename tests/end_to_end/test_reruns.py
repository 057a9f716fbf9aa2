"""Partial reruns through Snakemake on a tiny grid: each change reruns only what depends on it.

Snakemake sees one job per model; inside it, a run is recomputed only when its file is missing or
records another fingerprint. So the tests watch run files, models and figures (their modification
times), not job counts. The tests share one results directory and run in file order; they ask for
the results table (or the figures) only, as summary tables add minutes and nothing to what is tested.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from test_workflow import snakemake

from bdsweep.figures import FIGURES, drawing_functions
from conftest import REPO

TARGET = "table"  # the target rule: models, runs and the results table
FIGURE_FILES = [f"results/figures/{name}.{ext}" for name in sorted(FIGURES) for ext in ("png", "pdf")]


def mtimes(root, pattern):
    """Modification times of the files under ``root`` matching ``pattern``, by relative path."""
    return {path.relative_to(root): path.stat().st_mtime_ns for path in root.rglob(pattern) if path.is_file()}


def changed(before, after):
    return {path for path in after if before.get(path) != after[path]}


def write_config(workdir, config):
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two backdoored models (BadNets, Blended), defenses none / FT / CLP, one SPC and one seed."""
    workdir = tmp_path_factory.mktemp("reruns")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["attacks"] = {"badnets": {}, "blended": {}}
    config["clean_models"] = False
    config["datasets"]["digits"]["image_size"] = 16
    config["training"]["epochs"] = 3
    config["defenses"] = {"none": {}, "ft": {"epochs": 2, "lr": 0.05}, "clp": {"u": 3.0}}
    config["mitigation"]["spc"] = [10]
    write_config(workdir, config)
    snakemake(workdir, TARGET)
    return workdir, config


def runs_of(workdir):
    return mtimes(workdir / "results" / "runs", "*.json")


def test_changing_one_hyperparameter_reruns_only_that_defenses_runs(tiny):
    workdir, config = tiny
    before = runs_of(workdir)
    models = mtimes(workdir / "results" / "models", "model.pt")
    table = (workdir / "results" / "table" / "runs.parquet").stat().st_mtime_ns
    config["defenses"]["ft"]["lr"] = 0.02
    write_config(workdir, config)
    snakemake(workdir, TARGET)
    after = runs_of(workdir)
    assert changed(before, after) == {path for path in before if path.parts[-2] == "ft"} != set()
    assert mtimes(workdir / "results" / "models", "model.pt") == models
    assert (workdir / "results" / "table" / "runs.parquet").stat().st_mtime_ns > table
    rows = pd.read_parquet(workdir / "results" / "table" / "runs.parquet")
    assert set(rows.loc[rows["defense"] == "ft", "hyperparameters"].map(lambda h: json.loads(h)["lr"])) == {0.02}


def test_adding_a_seed_and_a_defense_runs_only_the_new_runs(tiny):
    workdir, config = tiny
    before = runs_of(workdir)
    config["mitigation"]["seeds"] = 2
    config["defenses"]["fst"] = {"epochs": 1}
    write_config(workdir, config)
    snakemake(workdir, TARGET)
    after = runs_of(workdir)
    assert changed(before, after) == set(after) - set(before)  # nothing that existed was recomputed
    new = {(path.parts[-2], path.stem) for path in set(after) - set(before)}
    assert new == {("ft", "spc10-seed1"), ("fst", "spc10-seed0"), ("fst", "spc10-seed1")}
    assert len(pd.read_parquet(workdir / "results" / "table" / "runs.parquet")) == 2 * (1 + 1 + 2 + 2)


def test_deleting_a_model_reruns_that_model_and_its_runs(tiny):
    workdir, _ = tiny
    before = runs_of(workdir)
    models = mtimes(workdir / "results" / "models", "model.pt")
    victim = next(path for path in models if path.parts[2] == "badnets")
    (workdir / "results" / "models" / victim).unlink()
    snakemake(workdir, TARGET)
    assert changed(models, mtimes(workdir / "results" / "models", "model.pt")) == {victim}
    assert changed(before, runs_of(workdir)) == {path for path in before if path.parts[2] == "badnets"}


def test_editing_a_plotting_function_redraws_only_the_figures_that_use_it(tiny, tmp_path):
    workdir, _ = tiny
    edited = "median_scatter"
    users = {name for name in FIGURES if edited in drawing_functions(name)}
    assert users and users != set(FIGURES)
    # An edited copy of the workflow, run on the same results directory.
    copy = tmp_path / "workflow-copy"
    for directory in ("workflow", "envs"):
        shutil.copytree(REPO / directory, copy / directory, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Snakefile", copy / "Snakefile")
    figures_py = copy / "workflow" / "bdsweep" / "figures.py"
    source = figures_py.read_text()
    header = f"def {edited}("
    figures_py.write_text(source.replace(header, f"def {edited}(  # edited\n    ", 1))
    def everything_but_figures():
        return {path: mtime for path, mtime in mtimes(workdir / "results", "*").items()
                if path.parts[0] not in ("figures", "logs")}

    snakemake(workdir, *FIGURE_FILES)
    figures, others = mtimes(workdir / "results" / "figures", "*.png"), everything_but_figures()
    snakemake(workdir, "--snakefile", str(copy / "Snakefile"), *FIGURE_FILES)
    redrawn = {path.stem for path in changed(figures, mtimes(workdir / "results" / "figures", "*.png"))}
    assert redrawn == users
    assert everything_but_figures() == others
