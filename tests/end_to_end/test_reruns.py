"""Partial reruns through Snakemake on a tiny grid: each change reruns only what depends on it.

Snakemake sees one job per model; inside it, a run is recomputed only when its file is missing or
records another fingerprint. So the tests watch run files, models and figures (their modification
times), not job counts. The tests share one results directory and run in file order; they ask for
the results table (or the figures) only, as summary tables add minutes and nothing to what is tested.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

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


def manifest_of(workdir, run):
    """The manifest of the model ``run`` (a path under results/runs) belongs to, read."""
    model = run.parts[:4]  # dataset, architecture, attack, ratio
    return json.loads((workdir / "results" / "manifests" / Path(*model[:3]) / f"{model[3]}.json").read_text())


def test_deleting_a_model_retrains_it_and_equal_bytes_rerun_none_of_its_runs(tiny):
    workdir, _ = tiny
    before = runs_of(workdir)
    models = mtimes(workdir / "results" / "models", "model.pt")
    victim = next(path for path in models if path.parts[2] == "badnets")
    victim_bytes = (workdir / "results" / "models" / victim).read_bytes()
    (workdir / "results" / "models" / victim).unlink()
    snakemake(workdir, TARGET)
    assert changed(models, mtimes(workdir / "results" / "models", "model.pt")) == {victim}
    # Training is deterministic on CPU: the same bytes, so its runs' fingerprints hold and its job
    # (rerun by Snakemake, the model being newer than its manifest) computes none of them.
    assert (workdir / "results" / "models" / victim).read_bytes() == victim_bytes
    assert runs_of(workdir) == before
    its_runs = [path for path in before if path.parts[:4] == victim.parts[:4]]
    assert (manifest_of(workdir, its_runs[0])["computed"], manifest_of(workdir, its_runs[0])["reused"]) == (
        0, len(its_runs))


def test_a_deleted_partition_is_redrawn_by_the_next_jobs_that_read_it_and_reruns_no_run_on_it(tiny):
    workdir, config = tiny
    before = runs_of(workdir)
    partition = workdir / "results" / "partitions" / "digits" / "spc10" / "seed0.npy"
    drawn = partition.read_bytes()
    partition.unlink()
    # An intermediate file: Snakemake redraws it only for a job that reads it, here every model's
    # job, which a changed CLP threshold reruns.
    config["defenses"]["clp"]["u"] = 3.5
    write_config(workdir, config)
    snakemake(workdir, TARGET)
    assert partition.read_bytes() == drawn  # redrawn: newer, with equal bytes
    assert changed(before, runs_of(workdir)) == {path for path in before if path.parts[-2] == "clp"}


def test_a_deleted_run_file_is_recomputed_by_a_plain_snakemake_call(tiny):
    workdir, _ = tiny
    assert "Nothing to be done" in snakemake(workdir, "-n", TARGET)
    before = runs_of(workdir)
    victim = next(path for path in before if path.parts[2] == "blended" and path.parts[-2] == "ft")
    (workdir / "results" / "runs" / victim).unlink()
    manifest = Path("results", "manifests", *victim.parts[:3], f"{victim.parts[3]}.json")
    its_runs = [path for path in before if path.parts[:4] == victim.parts[:4]]
    planned = snakemake(workdir, "-n", TARGET)
    assert f"bdsweep: {manifest}: 1 of its {len(its_runs)} run files missing (results/runs/{victim})" in planned
    assert "reason: Forced execution" in planned
    assert re.search(r"^defend_model\s+1$", planned, re.MULTILINE)  # that model's job only
    snakemake(workdir, TARGET)
    assert changed(before, runs_of(workdir)) == {victim}
    assert manifest_of(workdir, victim)["computed"] == 1
    assert "Nothing to be done" in snakemake(workdir, "-n", TARGET)


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
