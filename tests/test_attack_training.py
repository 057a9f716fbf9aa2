"""Every attack through the real stages (resource, poison, train) on the real digits: a short CPU
training reaches a high ASR at little cost in clean accuracy, and every backdoor test set leaves
out the target class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bdsweep.atomic import load_arrays, read_json
from bdsweep.cli import main
from bdsweep.data.store import PreparedDataset
from bdsweep.registry import ATTACKS

RECIPE = json.dumps({"epochs": 12, "batch_size": 64, "lr": 0.05})
TARGET = 0
# CPU-sized schedules for the attacks that learn their trigger; everything else is the paper's. SSBA uses
# its bounded generator, as config.yaml does (FORK's StegaStamp generator needs thousands of GPU steps).
OVERRIDES = {
    "lf": {"images": 50, "passes": 2},  # config.yaml's: the toolkit's search, shortened
    "ssba": {"generator": "bounded", "steps": 400, "train_images": 300, "batch_size": 32, "lr": 2e-3, "width": 8,
             "bit_accuracy_target": 0.85},
    "wanet": {"s": 5.0},  # the paper's s = 0.5 (a sub-pixel warp) does not take in 12 epochs on upscaled digits
    "iab": {"mask_epochs": 2, "generator_channels": 16, "generator_depth": 2, "generator_decay": 0.7},
}
# The toolkit's WaNet/BPP recipe (constant lr, per-batch crop 5 and rotation, zero fill in normalised space)
# does not suit 12 epochs on digits: the fill is a grey frame on their black background, whole batches at a
# time, and skews BN's running statistics: clean ACC 0.39 in eval mode (0.96 with batch statistics). Short
# schedules keep the training section's cosine and the engine's augmentation, as config.yaml does.
for _name in ("wanet", "bpp"):
    OVERRIDES[_name] = {**OVERRIDES.get(_name, {}), "schedule": "training", "post_transform": False}
# IAB with the toolkit's recipe (constant lr 0.05, augmentation before poisoning, normalised generator inputs)
# reaches ASR 1.0 but clean ACC 0.16 in 12 epochs: the short schedule keeps the earlier recipe.
OVERRIDES["iab"] = {**OVERRIDES["iab"], "schedule": "training", "augment_first": False, "normalised": False}
# What a short CPU training must reach at ratio 0.1 (SIG is clean-label and learns more slowly: measured
# over training seeds 0-2 on one thread, ASR 0.68-0.76 and ACC 0.97-0.99; issue 23).
MIN_ASR = {"sig": 0.6, "wanet": 0.8}


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """Digits at 32 px, its mitigation pool, and its clean model (also LF's clean model)."""
    root = tmp_path_factory.mktemp("attacks")
    steps = [
        ["prepare", "--name", "digits", "--options", '{"source": "digits", "image_size": 32}', "--out",
         str(root / "data")],
        ["pool", "--data", str(root / "data"), "--per-class", "20", "--seed", "0", "--out", str(root / "pool.npy")],
        train_command(root, "clean", root / "clean"),
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return root


def train_command(root, attack, out, extra=()):
    out.mkdir(exist_ok=True)
    return ["train", "--data", str(root / "data"), "--attack", attack, *extra, "--architecture", "small_cnn",
            "--recipe", RECIPE, "--target", str(TARGET), "--seed", "0", "--device", "cpu",
            "--out-model", str(out / "model.pt"), "--out-metrics", str(out / "metrics.json"),
            "--out-curve", str(out / "curve.csv")]


def attack_and_measure(root, name):
    attack, params = ATTACKS.get(name), json.dumps(OVERRIDES.get(name, {}))
    out = root / name
    if hasattr(attack, "make_hook"):
        extra = ["--attack-params", params, "--ratio", "0.1", "--pool", str(root / "pool.npy"),
                 "--out-backdoor", str(out / "backdoor.npz")]
        backdoor = out / "backdoor.npz"
    else:
        resource, backdoor = root / f"{name}.resource.npz", root / f"{name}.poison.npz"
        clean = ["--clean-model", str(root / "clean" / "model.pt")] if attack.per_architecture else []
        assert main(["resource", "--data", str(root / "data"), "--attack", name, "--params", params, *clean,
                     "--device", "cpu", "--out", str(resource)]) == 0
        assert main(["poison", "--data", str(root / "data"), "--pool", str(root / "pool.npy"), "--resource",
                     str(resource), "--attack", name, "--params", params, "--ratio", "0.1", "--target", str(TARGET),
                     "--seed", "0", "--out", str(backdoor)]) == 0
        extra = ["--poison", str(backdoor)]
    assert main(train_command(root, name, out, extra)) == 0
    return read_json(out / "metrics.json"), load_arrays(backdoor, "backdoor test set")


@pytest.mark.parametrize("name", ["badnets", "blended", "sig", "lf", "ssba", "iab", "wanet", "bpp"])
def test_a_short_training_plants_a_working_backdoor(digits, name):
    clean = read_json(digits / "clean" / "metrics.json")["metrics"]
    record, backdoor = attack_and_measure(digits, name)
    metrics = record["metrics"]
    print(f"{name}: ACC {metrics['acc']:.3f} (clean {clean['acc']:.3f}) ASR {metrics['asr']:.3f} "
          f"RA {metrics['ra']:.3f} effective ratio {record['effective_ratio']:.3f}")
    assert metrics["asr"] >= MIN_ASR.get(name, 0.85)
    assert metrics["acc"] >= clean["acc"] - 0.06
    y_test = np.asarray(PreparedDataset(digits / "data").y_test)
    assert sorted(backdoor["test_indices"]) == sorted(np.flatnonzero(y_test != TARGET))
    assert not record["sanity"]["asr_below_gate"]
    assert 0 < record["effective_ratio"] <= 0.101  # round(0.1 n) / n; below 0.1 when the class runs out (SIG)


def test_the_clean_model_has_accuracy_and_no_attack_metrics(digits):
    record = read_json(digits / "clean" / "metrics.json")
    assert record["metrics"]["acc"] > 0.9 and record["metrics"]["asr"] is None
    assert record["effective_ratio"] == 0 and record["sanity"]["asr_below_gate"] is None
