"""Checkpoint and resume: a run stopped by SIGTERM (SLURM preemption) or SIGKILL and then rerun
reaches exactly the weights of an uninterrupted run on CPU, with and without a training-time
attack's hook; a checkpoint of another job is never used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from bdsweep.checkpoints import Checkpoint
from bdsweep.engine import Normalisation, batch_count, train
from bdsweep.errors import PREEMPTED_EXIT_CODE, Preempted
from bdsweep.models import create_model
from bdsweep.params import resolve
from bdsweep.recipe import EngineOptions, Recipe
from bdsweep.registry import ATTACKS
from conftest import REPO, synthetic_raw

NORMALISATION = Normalisation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True)
RECIPE = Recipe(epochs=3, batch_size=16, lr=0.05)  # 4 batches per epoch on 64 images
EVERY_EPOCH = EngineOptions(checkpoint_every=1)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    raw = synthetic_raw(num_classes=4, per_class_train=16, size=16)
    return torch.from_numpy(raw.x_train), torch.from_numpy(raw.y_train)


def test_a_trailing_batch_of_one_image_is_skipped():
    assert batch_count(64, 16) == 4 and batch_count(65, 16) == 4 and batch_count(66, 16) == 5
    assert batch_count(5, 128) == 1
    with pytest.raises(ValueError, match="at least 2 images"):
        batch_count(1, 128)


class SigtermAtCall(nn.Module):
    """A model that sends this process SIGTERM at its n-th training forward pass, as SLURM would."""

    def __init__(self, inner: nn.Module, call: int | None):
        super().__init__()
        self.inner, self.call, self.calls = inner, call, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(x)


def attack_hook(name: str, images, labels):
    from bdsweep.attacks import HookContext

    if name == "none":
        return None
    poisonable = torch.ones(len(labels), dtype=torch.bool)
    poisonable[:8] = False
    context = HookContext(images, labels, poisonable, NORMALISATION, num_classes=4, image_size=16, target=0,
                          ratio=0.25, seed=0, progress=False)
    small = {"iab": {"mask_epochs": 1, "mask_batch_size": 16, "generator_channels": 4, "generator_depth": 2,
                     "generator_decay": 0.7}}.get(name, {})
    attack = ATTACKS.get(name)
    return attack.make_hook(context, resolve(attack.params, small, name))


def run(data, hook_name, checkpoint=None, stop_at_call=None):
    images, labels = data
    torch.manual_seed(0)
    model = SigtermAtCall(create_model("small_cnn", 4, 16), stop_at_call)
    hook = attack_hook(hook_name, images, labels)
    curve = train(model, images, labels, RECIPE, NORMALISATION, seed=0, hook=hook, progress=False,
                  options=EVERY_EPOCH, checkpoint=checkpoint)
    return model, hook, [{k: v for k, v in row.items() if k != "seconds"} for row in curve]


@pytest.mark.parametrize("hook_name", ["none", "wanet", "bpp", "iab"])
def test_sigterm_mid_epoch_checkpoints_and_the_rerun_matches_an_uninterrupted_run(data, tmp_path, hook_name):
    reference, reference_hook, reference_curve = run(data, hook_name)

    checkpoint = Checkpoint(tmp_path / "train.ckpt", "job-a", every=1)
    with pytest.raises(Preempted, match="SIGTERM in epoch 2"):
        run(data, hook_name, checkpoint, stop_at_call=6)  # the second batch of epoch 2
    assert checkpoint.path.exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    saved = checkpoint.load()
    assert (saved["epoch"], saved["batch"], len(saved["curve"])) == (1, 2, 1)

    resumed, resumed_hook, resumed_curve = run(data, hook_name, checkpoint)
    assert resumed_curve == reference_curve
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if reference_hook is not None:  # the trigger (and its generators) resumed too
        assert resumed_hook.effective_ratio == reference_hook.effective_ratio > 0
        for (name, a), b in zip(reference_hook.state().items(), resumed_hook.state().values()):
            assert np.array_equal(a, b), name


def test_a_finished_checkpoint_skips_training_and_another_jobs_checkpoint_is_ignored(data, tmp_path, capsys):
    checkpoint = Checkpoint(tmp_path / "train.ckpt", "job-a", every=2)
    model, _, curve = run(data, "none", checkpoint)
    assert checkpoint.load()["epoch"] == RECIPE.epochs  # saved at the end as well as every 2 epochs
    again, _, again_curve = run(data, "none", checkpoint)  # nothing left to train: same weights at once
    assert again_curve == curve and torch.equal(again.inner.classifier.weight, model.inner.classifier.weight)

    other = Checkpoint(checkpoint.path, "job-b", every=2)
    assert other.load() is None and "different job" in capsys.readouterr().err
    checkpoint.path.write_bytes(b"not a checkpoint")
    assert checkpoint.load() is None and "unreadable checkpoint" in capsys.readouterr().err


def test_compiled_training_shares_the_models_weights(data, monkeypatch):
    """With compile on, the loop calls the compiled module; the model saved afterwards is the
    plain one with the same weights. (Inductor itself takes ~30 s to compile here, so the test
    uses Dynamo's eager backend: the wiring is what is tested, not the compiler.)"""
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda module: compiled.append(module) or real_compile(module, backend="eager"))
    images, labels = data
    torch.manual_seed(0)
    model = create_model("small_cnn", 4, 16)
    curve = train(model, images, labels, Recipe(epochs=1, batch_size=16), NORMALISATION, seed=0, progress=False,
                  options=EngineOptions(compile=True))
    torch.manual_seed(0)
    plain = create_model("small_cnn", 4, 16)
    plain_curve = train(plain, images, labels, Recipe(epochs=1, batch_size=16), NORMALISATION, seed=0,
                        progress=False)
    assert compiled == [model] and set(model.state_dict()) == set(plain.state_dict())
    assert curve[0]["loss"] == pytest.approx(plain_curve[0]["loss"], rel=1e-4)
    assert torch.allclose(model.classifier.weight, plain.classifier.weight, atol=1e-5)


# The train stage as SLURM runs it: a separate process, killed from outside.

def train_command(root, out: str, epochs: int = 30) -> list[str]:
    return [sys.executable, "-m", "bdsweep", "train", "--data", str(root / "data"), "--attack", "clean",
            "--architecture", "small_cnn", "--recipe", json.dumps({"epochs": epochs, "batch_size": 8, "lr": 0.02}),
            "--engine", '{"checkpoint_every": 1}', "--target", "0", "--seed", "0", "--device", "cpu",
            "--out-model", str(root / out / "model.pt"), "--out-metrics", str(root / out / "metrics.json"),
            "--out-curve", str(root / out / "curve.csv")]


def environment():
    return {**os.environ, "PYTHONPATH": str(REPO / "workflow"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A prepared dataset and an uninterrupted training run of the stage: (root, reference metrics, weights)."""
    from bdsweep.data.store import write_dataset

    root = tmp_path_factory.mktemp("resume_stage")
    write_dataset(root / "data", synthetic_raw(), "synthetic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    subprocess.run(train_command(root, "reference"), check=True, env=environment(), capture_output=True)
    metrics = json.loads((root / "reference" / "metrics.json").read_text())
    return root, metrics, torch.load(root / "reference" / "model.pt", weights_only=True)["state_dict"]


def interrupt_after_first_checkpoint(command, checkpoint, signal_number) -> int:
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal_number)
    process.wait(timeout=120)
    return process.returncode


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_train_stage_killed_and_rerun_writes_the_uninterrupted_runs_model(stage, signal_number):
    root, reference_metrics, reference_weights = stage
    out = signal.Signals(signal_number).name
    command, checkpoint = train_command(root, out), root / out / "model.ckpt"
    code = interrupt_after_first_checkpoint(command, checkpoint, signal_number)
    expected = PREEMPTED_EXIT_CODE if signal_number == signal.SIGTERM else -signal.SIGKILL
    assert code == expected and checkpoint.exists()
    assert not (root / out / "model.pt").exists()  # no output until the job completes

    subprocess.run(command, check=True, env=environment(), capture_output=True)
    metrics = json.loads((root / out / "metrics.json").read_text())
    assert metrics["metrics"] == reference_metrics["metrics"]  # same seed, same metrics
    weights = torch.load(root / out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(reference_weights[name], weights[name]) for name in reference_weights)
    assert not checkpoint.exists()  # removed once every output is written


def test_a_checkpoint_follows_its_inputs_contents_not_their_modification_times(tmp_path):
    from bdsweep.checkpoints import fingerprint

    poison = tmp_path / "poison.npz"
    poison.write_bytes(b"drawn")
    first = fingerprint({"seed": 0}, [poison])
    poison.write_bytes(b"drawn")  # redrawn with equal bytes, later
    os.utime(poison, ns=(time.time_ns() + 10**9,) * 2)
    assert fingerprint({"seed": 0}, [poison]) == first
    poison.write_bytes(b"other")
    assert fingerprint({"seed": 0}, [poison]) != first
    assert fingerprint({"seed": 1}, [tmp_path / "poison.npz"]) != fingerprint({"seed": 0}, [poison])
