"""Snakemake itself killed or run twice on one results directory (issue 8).

kill -9 of the whole ``snakemake`` process group while a model trains, then the documented
recovery (``snakemake --unlock``, then the same command with ``--rerun-incomplete``): the run
completes with the outputs of a run that was never killed. And a second ``snakemake`` started
while a first one runs on the same directory is refused by Snakemake's lock and changes nothing;
that first run, once finished, is the never-killed run the kill -9 test compares with.

The workflow is the demo cut to one attack, one model and two runs, and each invocation asks for
the results table only: the figures are drawn from the table alone, so they add minutes of
plotting and nothing to what is tested here. The tests wait for files, never for a time: the
training checkpoint appears after the first of two epochs, while the job runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from test_faults import complete, same_content

from conftest import REPO

TABLE = "results/table/runs.parquet"
CHECKPOINT = "results/models/digits/small_cnn/badnets/0.1/model.ckpt"
MEASUREMENTS = ["wall_time_s", "peak_memory_bytes"]  # of the run, not of its result


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A function: a fresh working directory holding the demo configuration cut to its smallest
    (BadNets only, no clean model, defenses none and FT for one epoch, two training epochs with a
    checkpoint after each, 16-pixel digits)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(
        device="cpu",
        datasets={"digits": {**config["datasets"]["digits"], "image_size": 16}},
        attacks={"badnets": {}},
        clean_models=False,
        defenses={"none": {}, "ft": {"epochs": 1, "lr": 0.05}},
        mitigation={**config["mitigation"], "spc": [10]},
        training={**config["training"], "epochs": 2},
        engine={"checkpoint_every": 1},
    )

    def make(name):
        workdir = tmp_path_factory.mktemp(name)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        return workdir

    return make


def snakemake_command(workdir, *args) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]


def snakemake_env() -> dict:
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def snakemake(workdir, *args) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True, env=snakemake_env())


def start_snakemake(workdir, *args) -> subprocess.Popen:
    """Snakemake in a process group of its own (its jobs join it), so the group can be signalled;
    output to a file, which a full pipe could not block."""
    with open(workdir / "first.log", "w") as log:
        return subprocess.Popen(snakemake_command(workdir, *args), stdout=log, stderr=subprocess.STDOUT,
                                env=snakemake_env(), start_new_session=True)


def wait_for(path, process: subprocess.Popen) -> None:
    """Until ``path`` exists; fails if the process ends first (so a broken run cannot hang the test)."""
    while not path.exists():
        assert process.poll() is None, f"snakemake ended ({process.returncode}) before {path} appeared"
        time.sleep(0.05)


def result_files(workdir) -> list:
    """The files at final paths under results/: no logs, no temporary or cache files."""
    results = workdir / "results"
    return sorted(path.relative_to(workdir) for path in results.rglob("*")
                  if path.is_file() and not path.name.startswith(".") and "logs" not in path.parts
                  and ".cache" not in path.parts)


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=MEASUREMENTS).sort_values("path").reset_index(drop=True)


def stopped(group: int) -> bool:
    """Every thread of every process of the group is stopped or has ended (Linux: /proc states
    T, t; Z, X for a job that ended and that the stopped Snakemake has not reaped yet)."""
    states = []
    for task in Path("/proc").glob("[0-9]*/task/*/stat"):
        try:
            fields = task.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
        if int(fields[2]) == group:
            states.append(fields[0])
    return bool(states) and all(state in "tTZX" for state in states)


def snapshot(workdir) -> dict:
    """Every file under results/ and Snakemake's locks, with its size and modification time."""
    files = [*(workdir / "results").rglob("*"), *(workdir / ".snakemake" / "locks").rglob("*")]
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in files if path.is_file()}


@pytest.fixture(scope="module")
def contested_run(tiny_workdir):
    """A run during which a second invocation on its directory was tried: the first is stopped
    (SIGSTOP) while its model trains, so that it holds its lock and writes nothing while the second
    runs, then continued to its end. What happened, and the directory, which the kill -9 test also
    uses as the outputs of a run that was never killed."""
    workdir = tiny_workdir("contested")
    first = start_snakemake(workdir, TABLE)
    try:
        wait_for(workdir / CHECKPOINT, first)
        os.killpg(first.pid, signal.SIGSTOP)
        while not stopped(first.pid):  # a signal is sent at once, but takes effect a little later
            time.sleep(0.01)
        before = snapshot(workdir)
        second = snakemake(workdir, TABLE)
        after = snapshot(workdir)
        os.killpg(first.pid, signal.SIGCONT)
    except BaseException:
        os.killpg(first.pid, signal.SIGKILL)
        raise
    first.wait()
    return SimpleNamespace(workdir=workdir, first_code=first.returncode, first_log=(workdir / "first.log").read_text(),
                           second=second, before=before, after=after)


def test_a_second_snakemake_on_the_same_directory_is_refused_and_changes_nothing(contested_run):
    second = contested_run.second
    assert second.returncode != 0
    assert "Directory cannot be locked" in second.stdout + second.stderr
    assert contested_run.after == contested_run.before
    assert contested_run.first_code == 0, contested_run.first_log
    workdir = contested_run.workdir
    assert (workdir / TABLE).exists()
    again = snakemake(workdir, TABLE)  # the first has finished: no lock, and nothing left to do
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_kill_9_of_snakemake_mid_training_then_the_documented_recovery_gives_an_uninterrupted_runs_outputs(
        tiny_workdir, contested_run):
    assert contested_run.first_code == 0, contested_run.first_log
    reference = contested_run.workdir
    workdir = tiny_workdir("killed")
    first = start_snakemake(workdir, TABLE)
    try:
        wait_for(workdir / CHECKPOINT, first)  # the model is between its two epochs
    finally:
        os.killpg(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert not (workdir / TABLE).exists()  # the run was cut short
    for path in result_files(workdir):
        assert complete(workdir / path), f"partial {path} after kill -9"

    # The lock of the killed invocation stays and refuses the plain rerun, naming the fix.
    refused = snakemake(workdir, TABLE)
    assert refused.returncode != 0 and "--unlock" in refused.stdout + refused.stderr
    unlocked = snakemake(workdir, "--unlock")
    assert unlocked.returncode == 0, unlocked.stdout + unlocked.stderr
    rerun = snakemake(workdir, "--rerun-incomplete", TABLE)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    assert result_files(workdir) == result_files(reference)
    for path in result_files(workdir):
        assert complete(workdir / path) and same_content(workdir / path, reference / path), path
    assert not list((workdir / "results").rglob("*.ckpt"))  # the resumed training finished
    pd.testing.assert_frame_equal(comparable(pd.read_parquet(workdir / TABLE)),
                                  comparable(pd.read_parquet(reference / TABLE)))
