"""The demo workflow end to end through Snakemake, in a temporary directory: the table, the
figures, a rerun with nothing to do, a deleted run file that reruns exactly that run, and partial
reruns after configuration changes."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from bdsweep.figures import FIGURES
from bdsweep.tables import TABLES
from conftest import REPO, place_paper_blended_image


def snakemake(workdir, *args):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo configuration with shorter schedules, run once."""
    workdir = tmp_path_factory.mktemp("demo")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["training"]["epochs"] = 6
    for defense in ("fp", "ft-sam"):
        config["defenses"][defense]["epochs"] = 3
    config["attacks"]["iab"]["mask_epochs"] = 1
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    return workdir


def test_demo_produces_the_table_every_figure_and_every_summary_table(demo):
    table = pd.read_parquet(demo / "results" / "table" / "runs.parquet")
    # 8 backdoored models + 1 clean model, each x (none + (FP + FT-SAM) x 2 SPC x 1 seed)
    assert len(table) == 9 * 5 and (table["status"] == "ok").all()
    assert sorted(table["defense"].value_counts().items()) == [("fp", 18), ("ft-sam", 18), ("none", 9)]
    assert set(table["family"]) == {"none", "pruning", "fine-tuning"}
    assert set(table["attack"]) == {"badnets", "blended", "sig", "lf", "ssba", "iab", "wanet", "bpp", "clean"}
    assert set(table["ratio"]) == {0.0, 0.1} and set(table["spc"].dropna()) == {2, 10}
    clean = table[table["attack"] == "clean"]
    assert clean["pre_asr"].isna().all() and clean["post_asr"].isna().all() and clean["post_acc"].notna().all()
    assert {"pre_acc", "post_asr", "arr", "rdr", "wall_time_s", "hyperparameter_hash"} <= set(table.columns)
    assert clean["pre_acc"].min() > 0.9 and table["pre_acc"].median() > 0.8  # real models on real digits
    model_file = demo / "results" / "models" / "digits" / "small_cnn" / "badnets" / "0.1" / "model.pt"
    meta = torch.load(model_file, weights_only=True)["meta"]
    coordinates = (meta["dataset"], meta["architecture"], meta["attack"], meta["ratio"])
    assert coordinates == ("digits", "small_cnn", "badnets", 0.1)
    assert meta["recipe"]["epochs"] == 6 and "torch" in meta["versions"]
    assert not list((demo / "results" / "models").rglob("*.ckpt"))  # removed once the outputs exist
    for figure in FIGURES:
        for ext in ("png", "pdf"):
            assert (demo / "results" / "figures" / f"{figure}.{ext}").stat().st_size > 1000
    for name in TABLES:
        assert (demo / "results" / "tables" / f"{name}.md").read_text().startswith(TABLES[name].caption)
    medians = pd.read_csv(demo / "results" / "tables" / "medians.csv")
    assert set(medians["defense"]) == {"none", "fp", "ft-sam"} and medians["ci_low"].le(medians["median"]).all()
    assert len(pd.read_csv(demo / "results" / "tables" / "clean_cost.csv")) == 3  # every defense ran on the clean model


def test_the_report_is_one_self_contained_html_file_with_captions(demo):
    snakemake(demo, "--report", str(demo / "report.html"))
    html = (demo / "report.html").read_text()
    assert FIGURES["fig7_medians"].caption.split(":")[1].strip()[:40] in html
    assert html.count("iVBORw0KGgo") >= len(FIGURES)  # every figure embedded as a base64 PNG, nothing linked


def test_a_second_invocation_has_nothing_to_do(demo):
    assert "Nothing to be done" in snakemake(demo)


def run_mtimes(workdir):
    return {path: path.stat().st_mtime_ns for path in (workdir / "results" / "runs").rglob("*.json")}


def test_deleting_one_run_file_reruns_exactly_that_run(demo):
    before = run_mtimes(demo)
    victim = sorted(before)[3]
    victim.unlink()
    # Snakemake sees models, not runs: forcing the model's job recomputes only its missing run.
    # (Paths relative to the working directory, as Snakemake names its files.)
    model = victim.relative_to(demo / "results" / "runs").parent.parent
    snakemake(demo, "--forcerun", f"results/manifests/{model}.json")
    assert victim.exists()
    assert {path: mtime for path, mtime in run_mtimes(demo).items() if path != victim} == {
        path: mtime for path, mtime in before.items() if path != victim}
    assert len(pd.read_parquet(demo / "results" / "table" / "runs.parquet")) == 9 * 5


def plan(*args):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO)


def test_the_paper_preset_plans_the_implemented_methods(tmp_path):
    # The full grid: 129,600 runs in 300 model jobs (benchmarks/planning_speed.py times it).
    place_paper_blended_image(tmp_path)  # Snakemake validates in the working directory (--directory)
    result = plan("--configfile", str(REPO / "workflow" / "presets" / "paper.yaml"), "--directory", str(tmp_path))
    assert result.returncode == 0, result.stderr
    output = " ".join((result.stdout + result.stderr).split())
    assert "not implemented yet" not in output  # every method of the specification is implemented
    # 3 datasets x 4 architectures x (8 attacks x 3 ratios + 1 clean model) = 300 models:
    # 5 data-poisoning attacks x 3 ratios + clean = 16 per (dataset, architecture), 3 training-time
    # attacks x 3 ratios = 9.
    assert "train_model 192" in output and "train_model_poisoned_in_the_loop 108" in output
    assert "defend_model 300" in output  # one job per model runs all of its runs
    # Learned resources on a GPU: SSBA's per dataset + LF's per (dataset, architecture); the numpy
    # patterns of BadNets, Blended and SIG on a CPU, per dataset.
    assert "attack_resource 15" in output and "attack_pattern 9" in output


def test_an_unknown_method_is_refused_before_any_job(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["defenses"]["fine-tune"] = {}
    config["results"] = str(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = plan("--configfile", str(tmp_path / "config.yaml"))
    assert result.returncode != 0
    assert "defenses: unknown defense 'fine-tune'" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_config_yaml_of_the_working_directory_is_used(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"] = {"mydigits": config["datasets"]["digits"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = plan("--directory", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "results/data/mydigits/meta.json" in result.stdout


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_each_profile_plans_the_demo(tmp_path, profile):
    """The profiles parse and plan (their SLURM use is tests/end_to_end/test_slurm.py, where a cluster answers)."""
    result = plan("--profile", str(REPO / "workflow" / "profiles" / profile), "--directory", str(tmp_path),
                  "--configfile", str(REPO / "config.yaml"), "--quiet", "rules")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "defend_model 9" in " ".join(result.stdout.split())
