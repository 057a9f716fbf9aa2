"""kill -9 at every file write of every stage: no partial file is ever at a final path, and the
stage's rerun completes with the output of an uninterrupted run.

Each stage runs in a subprocess whose ``os.replace`` (the rename that publishes a complete file,
see ``bdsweep.atomic``) kills the process with SIGKILL on its n-th call, for n = 1, 2, ... until
the stage finishes without reaching n: every point between two published files is tried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from bdsweep.atomic import read_arrays
from bdsweep.model_file import read_model_file
from conftest import REPO

KILL_AT_NTH_RENAME = """
import os, signal, sys
target, calls, publish = int(sys.argv[1]), [0], os.replace
def replace(source, destination):
    calls[0] += 1
    if calls[0] == target:  # the temporary file is complete; die before it is published
        os.kill(os.getpid(), signal.SIGKILL)
    publish(source, destination)
os.replace = replace
if sys.argv[2] == "aggregate":
    from bdsweep.results import aggregate
    aggregate(sys.argv[3:-2], sys.argv[-2], cache=sys.argv[-1])
else:
    from bdsweep.cli import main
    sys.exit(main(sys.argv[2:]))
"""


def run_killed_at(n: int, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", KILL_AT_NTH_RENAME, str(n), *argv], env=env,
                          capture_output=True, text=True).returncode


def complete(path) -> bool:
    """The file at a final path reads completely in its format."""
    name = str(path)
    if name.endswith((".npy", ".npz")):
        read_arrays(path)
    elif name.endswith(".pt"):
        read_model_file(path)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".parquet"):
        import pandas as pd

        pd.read_parquet(path)
    elif name.endswith(".csv"):
        assert path.read_text().endswith("\n")
    return True


def same_content(path, reference) -> bool:
    """Arrays and weights equal the uninterrupted run's (other files carry timings)."""
    if str(path).endswith((".npy", ".npz")):
        a, b = read_arrays(path), read_arrays(reference)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        return np.array_equal(a, b)
    if str(path).endswith(".pt"):
        a, b = read_model_file(path)[0], read_model_file(reference)[0]
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return True


def stage_command(stage: str, root, out) -> list[str]:
    """The stage's command line on the digits_backdoor fixture's inputs, writing under ``out``."""
    data = str(root / "data")
    if stage == "aggregate":
        runs = sorted(str(p) for p in (root / "runs").glob("*.json"))
        return ["aggregate", *runs, str(out / "table.parquet"), str(out / "cache.parquet")]
    return {
        "prepare": ["prepare", "--name", "digits", "--options", '{"source": "digits", "image_size": 16}',
                    "--out", str(out / "data")],
        "pool": ["pool", "--data", data, "--per-class", "20", "--seed", "0", "--out", str(out / "pool.npy")],
        "poison": ["poison", "--data", data, "--pool", str(root / "pool.npy"), "--resource", str(root / "badnets.npz"),
                   "--attack", "badnets", "--ratio", "0.1", "--target", "0", "--seed", "0",
                   "--out", str(out / "poison.npz")],
        "train": ["train", "--data", data, "--attack", "badnets", "--poison", str(root / "poison.npz"),
                  "--architecture", "small_cnn", "--recipe", '{"epochs": 1, "batch_size": 64}', "--target", "0",
                  "--seed", "0", "--device", "cpu", "--out-model", str(out / "model.pt"),
                  "--out-metrics", str(out / "metrics.json"), "--out-curve", str(out / "curve.csv")],
        "defend": ["defend", "--model", str(root / "model.pt"), "--model-metrics", str(root / "metrics.json"),
                   "--data", data, "--backdoor", str(root / "poison.npz"), "--partition", str(root / "spc10.npy"),
                   "--defense", "ft", "--params", '{"epochs": 1}', "--device", "cpu", "--out", str(out / "run.json")],
    }[stage]


@pytest.fixture(scope="module")
def fault_inputs(digits_backdoor, tmp_path_factory):
    """The digits_backdoor fixture plus three run files for the aggregate stage."""
    runs = digits_backdoor / "runs"
    if not runs.exists():
        scratch = tmp_path_factory.mktemp("defend")
        assert run_killed_at(0, stage_command("defend", digits_backdoor, scratch)) == 0
        record = json.loads((scratch / "run.json").read_text())
        runs.mkdir()
        for seed in range(3):
            (runs / f"run{seed}.json").write_text(json.dumps({**record, "seed": seed}))
    return digits_backdoor


@pytest.mark.parametrize("stage", ["prepare", "pool", "poison", "train", "defend", "aggregate"])
def test_kill_at_every_write_leaves_no_partial_file_and_the_rerun_completes(fault_inputs, tmp_path, stage):
    reference_dir, out = tmp_path / "reference", tmp_path / "out"
    assert run_killed_at(0, stage_command(stage, fault_inputs, reference_dir)) == 0
    references = sorted(p for p in reference_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    outputs = [out / p.relative_to(reference_dir) for p in references]
    argv = stage_command(stage, fault_inputs, out)
    for n in range(1, 40):
        code = run_killed_at(n, argv)
        if code == 0:  # finished before its n-th write: every write has been a kill point
            break
        assert code == -signal.SIGKILL, f"{stage} failed for another reason before write {n}"
        for path in outputs:
            assert not path.exists() or complete(path), f"{stage}: partial {path.name} after a kill at write {n}"
        assert run_killed_at(0, argv) == 0, f"{stage}: the rerun after a kill at write {n} failed"
        for path, reference in zip(outputs, references):
            assert complete(path) and same_content(path, reference), f"{stage}: {path.name} after kill {n}"
        for path in outputs:  # a clean slate for the next kill point
            path.unlink()
    assert code == 0 and n > len(outputs) >= 1  # every output was published through a rename
