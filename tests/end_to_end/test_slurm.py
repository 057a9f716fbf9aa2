"""The project's SLURM profile against a real SLURM cluster: a small variant of the demo runs
through sbatch with workflow/profiles/slurm and gives the same results table as a local run.

Skipped where no SLURM cluster answers. On one machine (as root), ../shared/slurm/local-cluster.sh
start brings up a one-node cluster (partition "main", no accounting database); .ci/run does so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading

import pandas as pd
import pytest
import yaml
from test_profiles import profile_for_test_cluster

from conftest import REPO

# Targets: the table, and one figure and one summary table so the grouped report job runs too.
TARGETS = ["results/table/runs.parquet", "results/figures/fig6_boxplots.png", "results/tables/medians.csv"]
# What a run measures about its machine rather than computes.
MEASURED_COLUMNS = ["wall_time_s", "peak_memory_bytes", "peak_memory_kind"]


def cluster_problem() -> str | None:
    """Why no SLURM cluster can run the test, or None when one answers."""
    for command in ("sbatch", "squeue", "sinfo"):
        if shutil.which(command) is None:
            return f"`{command}` is not installed (start one with ../shared/slurm/local-cluster.sh start)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if not re.search(r"^(idle|mixed|allocated)", states, re.MULTILINE):
        return f"no SLURM node is up (sinfo states: {states.split() or 'none'})"
    return None


pytestmark = pytest.mark.skipif(cluster_problem() is not None, reason=str(cluster_problem()))


def queued_jobs() -> set[str]:
    """Ids of every job the cluster holds (pending or running), whoever submitted it."""
    listing = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return set(listing.split())


class ForeignJobs:
    """Jobs of other workflows seen on the cluster while the test runs (polled every few seconds):
    on a shared one-node cluster they hold the node, and the test's jobs wait behind them."""

    def __init__(self, interval_s: float = 5.0):
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,), daemon=True)

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.seen |= queued_jobs()
            except (OSError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def others_than(self, ours: set[str]) -> set[str]:
        return self.seen - ours


def skip_if_the_cluster_is_busy() -> None:
    busy = queued_jobs()
    if busy:
        pytest.skip(f"the SLURM cluster is busy with {len(busy)} job(s) of another workflow ({sorted(busy)[:5]}); "
                    "this test needs it to itself (its jobs would wait behind them)")


def small_config() -> dict:
    """The demo at its smallest: one model (BadNets), the demo's defenses for one epoch, one partition."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["device"] = "cpu"
    config["datasets"]["digits"]["image_size"] = 16
    config["attacks"] = {"badnets": {}}
    config["clean_models"] = False
    for overrides in config["defenses"].values():
        if "epochs" in (overrides or {}):
            overrides["epochs"] = 1
    config["mitigation"]["spc"] = [2]
    config["training"]["epochs"] = 2
    config["sanity"] = {"min_acc": 0.0, "min_asr": 0.0}  # two epochs need not pass the gates
    return config


def node_size() -> tuple[int, int]:
    """CPUs and memory (MB) of the test cluster's (smallest) node."""
    lines = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, timeout=30).stdout
    sizes = [tuple(int(value.rstrip("+")) for value in line.split()) for line in lines.splitlines() if line.strip()]
    return min(sizes)


def start_snakemake(workdir, *args) -> subprocess.Popen:
    """Snakemake on ``TARGETS`` in ``workdir``, its output into ``workdir/snakemake.out``."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), *args, *TARGETS]
    with open(workdir / "snakemake.out", "w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=workdir)


def finished(process: subprocess.Popen, workdir, foreign: ForeignJobs | None = None) -> str:
    process.wait()
    output = (workdir / "snakemake.out").read_text()
    if process.returncode != 0 and foreign is not None:
        others = foreign.others_than(set(re.findall(r"SLURM jobid (\d+)", output)))
        if others:
            pytest.skip(f"another workflow's SLURM jobs {sorted(others)[:5]} shared the cluster during the test "
                        f"and the SLURM run failed; rerun on an idle cluster. Its output ends:\n{output[-2000:]}")
    assert process.returncode == 0, output[-20000:]
    return output


def results_table(workdir) -> pd.DataFrame:
    table = pd.read_parquet(workdir / "results" / "table" / "runs.parquet").drop(columns=MEASURED_COLUMNS)
    return table.sort_values("path").reset_index(drop=True)


def test_the_slurm_profile_runs_the_workflow_on_slurm_with_the_results_of_a_local_run(tmp_path):
    config = yaml.safe_dump(small_config())
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    for workdir in (on_slurm, local):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(config)
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump(profile_for_test_cluster(*node_size())))

    # No accounting database on the test cluster: no account, and squeue instead of sacct.
    # The local run goes meanwhile: the SLURM run spends most of its time waiting for the queue.
    skip_if_the_cluster_is_busy()
    with ForeignJobs() as foreign:
        slurm_run = start_snakemake(on_slurm, "--profile", str(profile), "--slurm-no-account", "--slurm-status-command",
                                    "squeue", "--slurm-init-seconds-before-status-checks", "2")
        try:
            finished(start_snakemake(local, "--cores", "1"), local)
            log = finished(slurm_run, on_slurm, foreign)
        finally:
            if slurm_run.poll() is None:  # the local run failed: stop, and so cancel, the SLURM run's jobs
                slurm_run.terminate()
                slurm_run.wait()

    submitted = re.findall(r"submitted with SLURM jobid \d+ \(log: \S*/slurm_logs/(\w+)", log)
    assert "rule_train_model" in submitted and "group_report_figure_summary_table" in submitted, submitted
    # BadNets' patch is numpy work: the CPU rule makes it, not the GPU one.
    assert "rule_attack_pattern" in submitted and "rule_attack_resource" not in submitted
    # The grouped small CPU jobs share cluster jobs: one for the data stage, one for the
    # poisoned sets, one for the figure and the summary table.
    assert submitted.count("group_data_draw_partition_prepare_dataset") == 1  # no pool: mitigation.source train
    assert submitted.count("group_poison_poison_dataset") == 1
    assert submitted.count("group_report_figure_summary_table") == 1

    table = results_table(on_slurm)
    assert len(table) == 3 and (table["status"] == "ok").all()  # none, FT, CLP on the one model
    assert "rule_defend_model" in submitted
    pd.testing.assert_frame_equal(table, results_table(local))
    for target in TARGETS[1:]:
        assert (on_slurm / target).stat().st_size > 0
