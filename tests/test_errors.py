"""Damaged or wrong inputs give errors that name the file and say the fix, instead of a bare
library error or a silent cast (issue 21, item 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from bdsweep.atomic import REMAKE, write_npz
from bdsweep.cli import main
from conftest import REPO


@pytest.fixture
def tiny_dataset(tmp_path):
    """A prepared 3-class dataset of 8x8 images: class 2 has only 4 training images."""
    from bdsweep.data.store import RawDataset, write_dataset

    rng = np.random.default_rng(0)
    y_train = np.array([0] * 10 + [1] * 10 + [2] * 4)
    raw = RawDataset(rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8), y_train,
                     rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2, 0, 1, 2]), ("a", "b", "c"))
    directory = tmp_path / "results" / "data" / "tiny"
    write_dataset(directory, raw, "tiny", (0.5,) * 3, (0.25,) * 3, hflip=False)
    return directory


def test_a_truncated_model_file_names_the_file_and_says_to_remake_it(tmp_path):
    """Cut anywhere, a model file gives the same clear error; some cuts used to give a bare
    ``OSError: [Errno 22] Invalid argument`` from the archive reader."""
    import torch

    from bdsweep.model_file import read_model_file, save_model

    torch.manual_seed(0)
    save_model(tmp_path / "whole.pt", torch.nn.Linear(60, 40), {"architecture": "linear"})
    whole = (tmp_path / "whole.pt").read_bytes()
    model = tmp_path / "model.pt"
    for length in range(0, len(whole), 97):
        model.write_bytes(whole[:length])
        with pytest.raises(ValueError) as error:
            read_model_file(model)
        assert str(model) in str(error.value) and REMAKE in str(error.value), length


@pytest.mark.parametrize("labels, problem", [(np.array([0.0, np.nan, 1.0, 1.0]), "NaN or infinite label"),
                                             (np.array([0.0, 1.0, 1.5, 1.0]), "fractional label(s), e.g. 1.5")])
def test_nan_or_fractional_labels_of_an_npz_source_are_refused_naming_the_file(tmp_path, labels, problem, capsys):
    source = tmp_path / "mine.npz"
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    np.savez(source, x_train=images, y_train=labels, x_test=images, y_test=np.array([0, 1, 0, 1]))
    out = tmp_path / "data"
    code = main(["prepare", "--name", "mine", "--options", json.dumps({"source": "npz", "path": str(source)}),
                 "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 1 and not (out / "meta.json").exists()
    assert f"{source}: y_train has 1 {problem}" in message and "store class indices" in message


def test_nan_in_an_attack_resource_is_refused_before_any_image_is_poisoned(tiny_dataset, tmp_path, capsys):
    pool, resource, poison = tmp_path / "pool.npy", tmp_path / "sig.npz", tmp_path / "poison.npz"
    assert main(["pool", "--data", str(tiny_dataset), "--per-class", "2", "--seed", "0", "--out", str(pool)]) == 0
    assert main(["resource", "--data", str(tiny_dataset), "--attack", "sig", "--out", str(resource)]) == 0
    signal = dict(np.load(resource))["signal"].copy()
    signal[3, 5] = np.nan
    write_npz(resource, signal=signal)
    argv = ["poison", "--data", str(tiny_dataset), "--pool", str(pool), "--resource", str(resource), "--attack",
            "sig", "--ratio", "0.5", "--target", "0", "--seed", "0", "--out", str(poison)]
    assert main(argv) == 1 and not poison.exists()
    message = capsys.readouterr().err
    assert f"attack resource file {resource}: array 'signal' has 1 NaN" in message and REMAKE in message

    write_npz(resource, signal=np.full_like(signal, 300.0))  # finite, but beyond any pixel value
    assert main(argv) == 1 and not poison.exists()
    assert "outside [-255, 255]" in capsys.readouterr().err


def test_a_poison_file_with_float_labels_is_refused_naming_it(tmp_path):
    from bdsweep.evaluate import load_poison

    path = tmp_path / "poison.npz"
    write_npz(path, train_indices=np.array([1, 2]), train_images=np.zeros((2, 8, 8, 3), np.uint8),
              train_labels=np.array([0.0, 0.4]), test_indices=np.array([0]),
              test_images=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=f"poison file {path}: array 'train_labels' has dtype float64"):
        load_poison(path)


def test_validate_refuses_a_pool_larger_than_a_class_of_a_prepared_dataset(tiny_dataset, tmp_path, capsys,
                                                                           monkeypatch):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["datasets"] = {"tiny": {"source": "digits"}}
    config["results"] = "results"
    config["mitigation"]["pool_per_class"] = 5
    config["mitigation"]["spc"] = [2]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 1
    message = capsys.readouterr().err
    assert "mitigation.pool_per_class = 5 exceeds the training images of 1 class(es) of dataset 'tiny'" in message
    assert "class 2, has 4: set mitigation.pool_per_class to at most 4" in message
    config["mitigation"]["pool_per_class"] = 4
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 0
    config["results"] = "elsewhere"  # not prepared there: the pool job checks it
    config["mitigation"]["pool_per_class"] = 5
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path)]) == 0


def test_aggregation_meeting_an_unreadable_run_file_gives_the_command_that_recomputes_it_and_logs_it(tmp_path):
    from bdsweep.results import UnreadableRunFiles, aggregate, remake_command

    bad = tmp_path / "runs" / "ft" / "spc10-seed0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"status": "o')  # cut short
    manifest = "results/manifests/digits/small_cnn/badnets/0.1.json"
    argv = ["/opt/env/bin/snakemake", "--profile", "workflow/profiles/slurm", "--forcerun", "figure", "--cores", "2"]
    log = tmp_path / "logs" / "aggregate.log"
    with pytest.raises(UnreadableRunFiles) as error:
        aggregate([bad], tmp_path / "t.parquet", log, remedy=lambda paths: "Recompute them with:\n  "
                  + remake_command(argv, [manifest for _ in paths]))
    command = ("snakemake --profile workflow/profiles/slurm --cores 2 --forcerun "
               "results/manifests/digits/small_cnn/badnets/0.1.json")
    assert str(bad) in str(error.value) and command in str(error.value)
    assert log.read_text() == f"error: {error.value}\n"
    # The rule passes this remedy, with the Snakemake command line it was started with.
    rule = (REPO / "workflow" / "rules" / "aggregate.smk").read_text()
    assert "remake_command(sys.argv" in rule
