"""The model-level job (`bdsweep defend-model`): each run is its own cached result file, computed
only when missing or stale; workers share the job; out of memory halves the batches in the job."""

from __future__ import annotations

import json

from test_defenses import BatchedParams, temporary_defense  # noqa: F401  (a fixture)

from bdsweep.cli import main
from bdsweep.errors import RETRY_EXIT_CODE

FT = {"epochs": 1, "batch_size": 32}


def job_argv(root, defenses, out_dir, workers=1):
    return ["defend-model", "--model", str(root / "model.pt"), "--model-metrics", str(root / "metrics.json"),
            "--data", str(root / "data"), "--backdoor", str(root / "poison.npz"),
            "--defenses", json.dumps(defenses), "--coordinates", json.dumps({"dataset": "digits", "ratio": 0.1}),
            "--partitions", str(root / "spc{spc}.npy"), "--runs", str(out_dir / "{defense}" / "{mitigation}.json"),
            "--workers", str(workers), "--device", "cpu", "--out", str(out_dir / "manifest.json")]


def defend_model(root, defenses, out_dir, workers=1):
    """Run the job on ``digits_backdoor``'s model; its exit code and manifest (None on failure)."""
    code = main(job_argv(root, defenses, out_dir, workers))
    manifest = out_dir / "manifest.json"
    return code, json.loads(manifest.read_text()) if code == 0 else None


def plan(**defenses):
    """``--defenses`` for defenses given as name=params; data-free ones run once without data."""
    data_free = {"none", "clp"}
    return {name: {"params": params, "mitigations": ["nodata"] if name in data_free else ["spc10-seed0"]}
            for name, params in defenses.items()}


def mtimes(out_dir):
    return {path.relative_to(out_dir): path.stat().st_mtime_ns for path in out_dir.rglob("*/*.json")}


def test_each_run_is_computed_once_and_a_changed_hyperparameter_recomputes_only_its_runs(
        digits_backdoor, tmp_path, one_thread):
    code, manifest = defend_model(digits_backdoor, plan(none={}, ft=FT, clp={}), tmp_path)
    assert code == 0 and (manifest["computed"], manifest["reused"]) == (3, 0)
    first = mtimes(tmp_path)
    assert set(map(str, first)) == {"none/nodata.json", "ft/spc10-seed0.json", "clp/nodata.json"}
    record = json.loads((tmp_path / "ft" / "spc10-seed0.json").read_text())
    assert record["status"] == "ok" and (record["spc"], record["seed"], record["ratio"]) == (10, 0, 0.1)

    code, manifest = defend_model(digits_backdoor, plan(none={}, ft=FT, clp={}), tmp_path)
    assert (manifest["computed"], manifest["reused"]) == (0, 3) and mtimes(tmp_path) == first

    code, manifest = defend_model(digits_backdoor, plan(none={}, ft={**FT, "lr": 0.001}, clp={}), tmp_path)
    assert [run["defense"] for run in manifest["runs"] if run["computed"]] == ["ft"]
    assert {path for path, mtime in mtimes(tmp_path).items() if first[path] != mtime} == {
        next(path for path in first if path.parts[0] == "ft")}


def test_a_damaged_run_file_is_recomputed(digits_backdoor, tmp_path, one_thread):
    defend_model(digits_backdoor, plan(none={}, clp={}), tmp_path)
    (tmp_path / "clp" / "nodata.json").write_text('{"status": "o')
    code, manifest = defend_model(digits_backdoor, plan(none={}, clp={}), tmp_path)
    assert [run["defense"] for run in manifest["runs"] if run["computed"]] == ["clp"]
    assert json.loads((tmp_path / "clp" / "nodata.json").read_text())["status"] == "ok"


def test_two_workers_give_the_same_results_as_one(digits_backdoor, tmp_path, one_thread):
    defenses = plan(none={}, ft=FT, clp={})
    defend_model(digits_backdoor, defenses, tmp_path / "one")
    code, manifest = defend_model(digits_backdoor, defenses, tmp_path / "two", workers=2)
    assert code == 0 and manifest["computed"] == 3
    for path in mtimes(tmp_path / "one"):
        one, two = (json.loads((tmp_path / side / path).read_text()) for side in ("one", "two"))
        assert (one["post"], one["inputs_fingerprint"]) == (two["post"], two["inputs_fingerprint"])


def test_out_of_memory_halves_only_that_runs_batches_records_it_and_the_same_command_goes_on(
        digits_backdoor, tmp_path, temporary_defense, one_thread):  # noqa: F811
    import torch

    from bdsweep.results import read_runs

    device_limit = {"batch_size": 32}  # what fits in the simulated device's memory

    def fits_in_device(model, data, params, device):
        if params.batch_size > device_limit["batch_size"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model

    temporary_defense("hungry", fits_in_device, BatchedParams)
    defenses = plan(none={}, hungry={})
    code, manifest = defend_model(digits_backdoor, defenses, tmp_path)
    assert code == 0
    run = tmp_path / "hungry" / "spc10-seed0.json"
    record = json.loads(run.read_text())
    assert record["hyperparameters"]["batch_size"] == 32 and record["batch_percent"] == 25  # 128 -> 64 -> 32
    assert any("scaled to 25 %" in note for note in record["details"]["notes"])
    assert json.loads(run.with_suffix(".oom").read_text())["batch_percent"] == 25  # recorded beside the run
    none = json.loads((tmp_path / "none" / "nodata.json").read_text())  # the other run: untouched
    assert none["batch_percent"] == 100 and not none["details"].get("notes")
    assert not (tmp_path / "none" / "nodata.oom").exists()
    table = read_runs([tmp_path / "none" / "nodata.json", run])
    assert table["batch_percent"].tolist() == [100, 25]  # marked in the table
    assert {entry["defense"]: entry["batch_percent"] for entry in manifest["runs"]} == {"none": 100, "hungry": 25}

    # The reduced run is up to date at its recorded size; with the cause gone (the marker deleted,
    # or a device with more memory) it is recomputed at full size and the marker goes.
    assert defend_model(digits_backdoor, defenses, tmp_path)[1]["computed"] == 0
    device_limit["batch_size"] = 1000
    run.with_suffix(".oom").unlink()
    _, manifest = defend_model(digits_backdoor, defenses, tmp_path)
    assert [entry["defense"] for entry in manifest["runs"] if entry["computed"]] == ["hungry"]
    assert json.loads(run.read_text())["batch_percent"] == 100 and not run.with_suffix(".oom").exists()

    # Out of memory at every size the job tries: exit 75, the size to go on from is recorded, and
    # the rule's retry (the same command) starts there.
    device_limit["batch_size"] = 16
    code, _ = defend_model(digits_backdoor, defenses, tmp_path / "retry")
    assert code == RETRY_EXIT_CODE and not (tmp_path / "retry" / "manifest.json").exists()
    assert (tmp_path / "retry" / "none" / "nodata.json").exists()  # finished runs are kept
    assert not (tmp_path / "retry" / "hungry" / "spc10-seed0.json").exists()
    assert json.loads((tmp_path / "retry" / "hungry" / "spc10-seed0.oom").read_text())["batch_percent"] == 12
    code, manifest = defend_model(digits_backdoor, defenses, tmp_path / "retry")
    assert code == 0 and [entry["defense"] for entry in manifest["runs"] if entry["computed"]] == ["hungry"]
    assert json.loads((tmp_path / "retry" / "hungry" / "spc10-seed0.json").read_text())["hyperparameters"][
        "batch_size"] == 15


def test_a_job_killed_without_running_out_of_memory_and_retried_gives_the_runs_of_an_uninterrupted_job(
        digits_backdoor, tmp_path, monkeypatch, one_thread):
    """kill -9 of the job (scancel, time limit, node failure) while FT trains; the retry is the same
    command (the rule no longer scales batch sizes by attempt), and nothing is recorded as out of
    memory, so the runs equal an uninterrupted job's, at full batch sizes. Both attempts leave a
    trace in the job's history (the rule's ``<log>.history``) and the run file says it resumed."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    defenses = plan(none={}, ft={"epochs": 12, "batch_size": 32})
    assert defend_model(digits_backdoor, defenses, tmp_path / "reference")[0] == 0
    history = tmp_path / "job.log.history"
    monkeypatch.setenv("BDSWEEP_HISTORY", str(history))
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow"), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "bdsweep", *job_argv(digits_backdoor, defenses, tmp_path / "run")],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ft = tmp_path / "run" / "ft" / "spc10-seed0.json"
    deadline = time.monotonic() + 120
    while not ft.with_suffix(".ckpt").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # FT saves its first checkpoint after 5 epochs
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL and not ft.exists(), "the job finished before it was killed"
    code, manifest = defend_model(digits_backdoor, defenses, tmp_path / "run")
    assert code == 0 and not list((tmp_path / "run").rglob("*.oom"))
    for path in ("none/nodata.json", "ft/spc10-seed0.json"):
        run, reference = (json.loads((tmp_path / side / path).read_text()) for side in ("run", "reference"))
        for key in ("post", "hyperparameters", "batch_percent", "inputs_fingerprint", "details"):
            assert run[key] == reference[key], (path, key)
    assert json.loads(ft.read_text())["resumed"] == {"phase": 0, "label": "FT", "saved_phases": 1}
    lines = history.read_text().splitlines()
    assert [line.split(":")[0] for line in lines if " started " in line] == ["bdsweep defend-model"] * 2
    assert any(f"resuming from {ft.with_suffix('.ckpt')}: phase 0 (FT)" in line for line in lines)
    # The rule's command is the same on every attempt: no resource or parameter depends on it.
    rule = (REPO / "workflow" / "rules" / "defend.smk").read_text()
    assert not re.search(r"\battempt\b", rule.split("rule defend_model:")[1])


def test_workers_must_be_positive(digits_backdoor, tmp_path):
    assert defend_model(digits_backdoor, plan(none={}), tmp_path, workers=0)[0] == 1
    assert not (tmp_path / "manifest.json").exists()


def _run_spec(tmp_path, out="run.json"):
    from bdsweep.runs import RunSpec

    return RunSpec(defense="none", overrides={}, coordinates={"dataset": "digits"}, partition=None,
                   out=str(tmp_path / out))


def test_a_run_file_is_up_to_date_exactly_when_it_records_the_fingerprint_whatever_its_age(tmp_path):
    import os

    from bdsweep.runs import up_to_date

    run = _run_spec(tmp_path)
    assert not up_to_date(run, "abc")  # missing
    (tmp_path / "run.json").write_text(json.dumps({"inputs_fingerprint": "abc"}))
    os.utime(tmp_path / "run.json", ns=(1, 1))  # older than any input: age does not matter
    assert up_to_date(run, "abc")
    assert not up_to_date(run, "abd")  # an input's contents changed
    for damaged in ('{"inputs_fingerprint": "ab', "[1, 2]", ""):  # unreadable or not a run record
        (tmp_path / "run.json").write_text(damaged)
        assert not up_to_date(run, "abc")


def test_inputs_rewritten_with_equal_bytes_rerun_nothing_and_other_bytes_rerun_their_runs(
        digits_backdoor, tmp_path, one_thread):
    import os
    import shutil

    import numpy as np
    import torch

    from bdsweep.model_file import load_model, save_model

    model = tmp_path / "model"
    shutil.copytree(digits_backdoor, model, ignore=shutil.ignore_patterns("*.ckpt", "run*"))
    defenses = plan(none={}, clp={}, ft=FT)
    defend_model(model, defenses, tmp_path / "runs")
    first = mtimes(tmp_path / "runs")
    later = max(first.values()) + 10**9
    # Retrained, redrawn, re-poisoned, the dataset prepared again: the same bytes.
    for name in ("model.pt", "spc10.npy", "poison.npz", "data/meta.json", "data/x_test.npy", "data/x_train.npy"):
        (model / name).write_bytes((model / name).read_bytes())
        os.utime(model / name, ns=(later, later))
    _, manifest = defend_model(model, defenses, tmp_path / "runs")
    assert (manifest["computed"], manifest["reused"]) == (0, 3) and mtimes(tmp_path / "runs") == first

    def replace_array(path, array):  # by rename, as the stages write: an open memory map keeps the old file
        np.save(tmp_path / "array.npy", array)
        os.replace(tmp_path / "array.npy", path)

    test_images = np.load(model / "data" / "x_test.npy")
    replace_array(model / "data" / "x_test.npy", test_images[::-1].copy())  # other test images, same meta.json
    _, manifest = defend_model(model, defenses, tmp_path / "runs")
    assert manifest["computed"] == 3  # every run is evaluated on them
    replace_array(model / "data" / "x_test.npy", test_images)
    defend_model(model, defenses, tmp_path / "runs")

    partition = np.load(model / "spc10.npy")
    np.save(model / "spc10.npy", partition[::-1].copy())  # another draw: only the run using it reruns
    _, manifest = defend_model(model, defenses, tmp_path / "runs")
    assert [run["defense"] for run in manifest["runs"] if run["computed"]] == ["ft"]

    weights, metadata = load_model(model / "model.pt")
    with torch.no_grad():
        next(weights.parameters()).add_(0.01)
    save_model(model / "model.pt", weights, metadata)  # retrained to other weights
    _, manifest = defend_model(model, defenses, tmp_path / "runs")
    assert manifest["computed"] == 3  # all its runs


def test_equal_contents_give_equal_files_so_fingerprints_compare_contents(tmp_path):
    """Written at different times under different temporary names, the bytes are the same."""
    import numpy as np
    import torch

    from bdsweep.atomic import write_npz
    from bdsweep.model_file import save_model

    arrays = {"images": np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "labels": np.arange(4)}
    model = torch.nn.Linear(3, 2)
    for name in ("first", "second"):
        write_npz(tmp_path / f"{name}.npz", **arrays)
        save_model(tmp_path / f"{name}.pt", model, {"architecture": "linear"})
    for ext in ("npz", "pt"):
        assert (tmp_path / f"first.{ext}").read_bytes() == (tmp_path / f"second.{ext}").read_bytes()
    with np.load(tmp_path / "first.npz", allow_pickle=False) as loaded:
        assert all(np.array_equal(loaded[key], value) for key, value in arrays.items())


def test_sigterm_stops_the_job_keeping_finished_runs_and_the_rerun_resumes_the_interrupted_one(
        digits_backdoor, tmp_path, monkeypatch, one_thread):
    from test_defense_resume import comparable, count_steps

    from bdsweep.errors import PREEMPTED_EXIT_CODE

    defenses = plan(none={}, ft={"epochs": 2, "batch_size": 32})  # FT: 2 epochs x 4 batches
    steps = count_steps(monkeypatch, "ft")
    defend_model(digits_backdoor, defenses, tmp_path / "reference")
    uninterrupted = steps.calls
    steps.call, steps.calls = 5, 0
    code, _ = defend_model(digits_backdoor, defenses, tmp_path / "run")
    assert code == PREEMPTED_EXIT_CODE and not (tmp_path / "run" / "manifest.json").exists()
    assert (tmp_path / "run" / "none" / "nodata.json").exists()
    ft = tmp_path / "run" / "ft" / "spc10-seed0.json"
    assert ft.with_suffix(".ckpt").exists() and not ft.exists()
    steps.call, steps.calls = None, 0
    code, manifest = defend_model(digits_backdoor, defenses, tmp_path / "run")
    assert code == 0 and [run["defense"] for run in manifest["runs"] if run["computed"]] == ["ft"]
    assert steps.calls <= uninterrupted - 4  # resumed: the steps before SIGTERM are not redone
    for run in ("none/nodata.json", "ft/spc10-seed0.json"):
        assert comparable(tmp_path / "run" / run) == comparable(tmp_path / "reference" / run)
