"""Defense checkpoints and non-finite losses: SIGTERM in the middle of a defense (an engine-based
one of two phases, and own-loop ones) stops it with Preempted (exit 143, no run file), and the rerun
resumes and writes what an uninterrupted run writes; a checkpoint of another job is ignored; a NaN
loss makes a failed run (defend) or a failed job (train), never a silent result."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdsweep import engine
from bdsweep.checkpoints import (
    Checkpoint,
    LoopState,
    checkpointed_steps,
    defense_checkpoints,
    load_object_state,
    loop_checkpoint,
    object_state,
)
from bdsweep.cli import main
from bdsweep.engine import BatchHook, NonFiniteLoss, train
from bdsweep.errors import PREEMPTED_EXIT_CODE, Preempted
from bdsweep.model_file import save_model
from bdsweep.models import create_model
from bdsweep.recipe import Recipe
from bdsweep.registry import DEFENSES
from bdsweep.runs import run_defense
from conftest import SigtermAt, random_mitigation, same_weights

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SMALL = {
    "nad": {"teacher_epochs": 2, "epochs": 3, "batch_size": 8},  # 4 batches per epoch on 32 images
    "i-bau": {"rounds": 3, "batch_size": 16, "fixed_point_iterations": 2},  # 2 batches per round
    "anp": {"iterations": 6, "batch_size": 16, "updates_per_pass": 2},  # passes of 2 updates
    # two groups of 2 classes, 3 epochs of 2 batches each; 2 unlearning epochs if a class is flagged
    "nc": {"epochs": 3, "batch_size": 16, "classes_per_pass": 2, "patience": 1, "unlearn_epochs": 2,
           "unlearn_batch_size": 8},
    "sau": {"rounds": 2, "adv_steps": 1, "batch_size": 16},
    "pbe": {"epochs": 2, "adversarial_epochs": 1, "pgd_steps": 1, "batch_size": 16},
    "ft-sam": {"epochs": 2, "batch_size": 16},
    "fst": {"epochs": 2, "batch_size": 16},
    "fp": {"epochs": 2, "batch_size": 16},
    "ft": {"epochs": 2, "batch_size": 16},
    "awm": {"epochs": 3, "inner": 1, "batch_size": 16},  # 2 trigger and 2 mask steps per epoch
    "npd": {"warmup_epochs": 2, "epochs": 3, "batch_size": 16},  # 2 batches per epoch
    "mm-bd": {"epochs": 3, "batch_size": 4, "lambda_every": 1},  # the images it classifies right, in 4s
    "rnp": {"unlearn_epochs": 3, "recover_epochs": 3, "batch_size": 16, "clean_threshold": 0.0},
}


def count_steps(monkeypatch, name, stop_at=None) -> SigtermAt:
    """Count a defense's steps where they can be counted, optionally sending SIGTERM at one: the
    engine's per-batch autocast (only train() calls it by that name; the default), i-BAU's per-batch
    hypergradient, ANP's masked forward passes (three per mask update), NC's trigger-search batches;
    epochs of AWM (its trigger searches), NPD (warm-up, then polarizer), MM-BD and RNP (unlearning,
    then mask recovery)."""
    import bdsweep.defenses.anp as anp
    import bdsweep.defenses.awm as awm
    import bdsweep.defenses.ibau as ibau
    import bdsweep.defenses.mmbd as mmbd
    import bdsweep.defenses.nc as nc
    import bdsweep.defenses.npd as npd
    import bdsweep.defenses.rnp as rnp

    DEFENSES.entries()  # import every defense first, so none binds the counter in place of engine.autocast
    owner, attribute = {"i-bau": (ibau, "implicit_hypergradient"), "anp": (anp, "functional_call"),
                        "nc": (nc, "autocast"), "awm": (awm, "universal_perturbation"), "npd": (npd, "batches"),
                        "mm-bd": (mmbd, "fit_epoch"), "rnp": (rnp, "training_batches")}.get(name, (engine, "autocast"))
    counter = SigtermAt(getattr(owner, attribute), stop_at)
    monkeypatch.setattr(owner, attribute, counter)
    return counter


def defend_directly(name, checkpoint=None, **params):
    """(outcome, model) of the defend stage's run_defense on a fresh small model, seeded as the stage
    seeds, with SMALL's hyperparameters updated by ``params``."""
    torch.manual_seed(0)
    model = create_model("small_cnn", 4, 16)
    data = random_mitigation(n=32, num_classes=4, size=16)
    torch.manual_seed(1)
    defense = DEFENSES.get(name)
    return run_defense(defense, model, data, defense.params(**{**SMALL[name], **params}), CPU, checkpoint), model


def test_lists_and_dicts_of_tensors_are_saved_and_restored_into_the_tensors_an_optimiser_holds(tmp_path):
    """Masks per layer (a dict) and bounds per stage (a list), which a loop's progress holds, round-trip
    through a checkpoint file; a restored tensor of the same shape is the one the optimiser steps, so
    optimisation goes on with it."""

    class Loop:
        def __init__(self):
            self.masks = {"conv.weight": torch.ones(2, 3, requires_grad=True), "fc.weight": torch.ones(4)}
            self.bounds = [torch.full((3,), 8.0), torch.full((5,), 8.0)]
            self.optimiser = torch.optim.SGD([self.masks["conv.weight"]], lr=1.0)

    original = Loop()
    with torch.no_grad():
        original.masks["conv.weight"].mul_(0.5)
        original.bounds[1][2] = 1.0
    checkpoint = Checkpoint(tmp_path / "loop.ckpt", "job")
    assert set(object_state(original)) == {"optimiser"}  # a hook's dicts of tensors are per-batch buffers
    checkpoint.save({"loop": object_state(original, tensor_collections=True)})
    saved = checkpoint.load()["loop"]
    assert set(saved) == {"masks", "bounds", "optimiser"}

    resumed = Loop()
    stepped = resumed.masks["conv.weight"]  # the tensor the optimiser holds
    load_object_state(resumed, saved)
    assert resumed.masks["conv.weight"] is stepped and torch.equal(stepped, torch.full((2, 3), 0.5))
    assert torch.equal(resumed.masks["fc.weight"], torch.ones(4))
    assert [b.tolist() for b in resumed.bounds] == [[8.0] * 3, [8.0, 8.0, 1.0, 8.0, 8.0]]
    stepped.sum().backward()
    resumed.optimiser.step()
    assert torch.equal(resumed.masks["conv.weight"], torch.full((2, 3), -0.5))

    other = Loop()
    other.bounds = [torch.zeros(1)]  # a different shape or count is replaced by the saved tensors
    load_object_state(other, saved)
    assert [len(b) for b in other.bounds] == [3, 5]


def toy_loop(checkpoint=None, sigterm_at=None, stop_below=None, steps=6):
    """A checkpointed loop of its own: each step draws from its generator and the global one, and
    records the sum; ``stop_below`` ends it early once a draw falls below it. (state, steps run)."""
    ran = []
    torch.manual_seed(0)
    state = LoopState(generator=torch.Generator().manual_seed(1), total=torch.zeros(()), draws=[])

    def loop():
        for step in checkpointed_steps("toy loop", state, steps,
                                       stop_early=None if stop_below is None else lambda: state.draws[-1] < stop_below):
            ran.append(step)
            if step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            draw = float(torch.rand((), generator=state.generator) + torch.rand(()))
            state.total += draw
            state.draws.append(draw)

    if checkpoint is None:
        loop()
    else:
        with defense_checkpoints(checkpoint):
            loop()
    return state, ran


@pytest.mark.parametrize("stop_below", [None, 0.9])
def test_checkpointed_steps_resume_where_sigterm_stopped_them_and_replay_a_finished_loop(tmp_path, stop_below):
    reference, ran = toy_loop(stop_below=stop_below)
    # 0.9: a draw of 0.49 ends the loop after step 2
    assert ran == list(range(len(ran))) and (len(ran) == 6) == (stop_below is None)
    assert reference.step == len(ran) and reference.stopped == (stop_below is not None)

    checkpoint = Checkpoint(tmp_path / "loop.ckpt", "job")
    with pytest.raises(Preempted, match="toy loop"):
        toy_loop(checkpoint, sigterm_at=1, stop_below=stop_below)  # saved after step 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed, ran = toy_loop(checkpoint, stop_below=stop_below)
    assert ran == list(range(2, reference.step))
    assert resumed.draws == reference.draws and torch.equal(resumed.total, reference.total)

    replayed, ran = toy_loop(checkpoint, stop_below=stop_below)  # finished (or stopped early): no step runs
    assert ran == [] and replayed.draws == reference.draws and replayed.stopped == reference.stopped


def test_a_loop_phase_saved_without_the_loops_state_is_ignored(tmp_path, capsys):
    """A phase saved by other code (here 4 steps of a state without ``draws``) would resume from a
    wrong step: it is ignored and the loop runs from its start."""
    checkpoint = Checkpoint(tmp_path / "loop.ckpt", "job")
    other = LoopState(total=torch.ones(()))
    other.step = 4
    with defense_checkpoints(checkpoint), loop_checkpoint("toy loop", other) as saved:
        saved.boundary(finished=True)
    state, ran = toy_loop(checkpoint)
    assert "holds no draws" in capsys.readouterr().err
    assert ran == list(range(6)) and state.draws == toy_loop()[0].draws


@pytest.mark.parametrize("name, stop_at, phases, left", [
    # teacher 2 x 4 batches, student 3 x 4: SIGTERM in the student's 6th batch, saved after it; the
    # rerun restores the teacher and trains the student's last 6 batches
    ("nad", 2 * 4 + 6, ["NAD teacher", "NAD student"], 6),
    # 3 rounds of 2 batches: SIGTERM in round 2, saved after it; the rerun does round 3
    ("i-bau", 3, ["i-BAU rounds"], 2),
    # 6 updates of 3 forward passes, 2 updates a pass: SIGTERM in update 3, saved after the 2nd
    # pass (update 4); the rerun makes updates 5 and 6
    ("anp", 2 * 3 + 1, ["ANP masks"], 2 * 3),
    # 2 groups x 3 epochs x 2 batches: SIGTERM in epoch 2 of group 2, saved after it; the rerun
    # restores group 1 and does group 2's last epoch
    ("nc", 2 * 3 + 3, ["NC trigger search, classes 0-1", "NC trigger search, classes 2-3"], 2),
    # 3 epochs: SIGTERM in epoch 2, saved after it; the rerun does epoch 3
    ("awm", 2, ["AWM epochs"], 1),
    ("mm-bd", 2, ["MM-BD bounds"], 1),
    # 2 warm-up and 3 polarizer epochs: SIGTERM in the 2nd warm-up epoch or the 2nd polarizer epoch
    ("npd", 2, ["NPD warm-up"], 3),
    ("npd", 2 + 2, ["NPD warm-up", "NPD polarizer"], 1),
    # 3 unlearning and 3 mask epochs: SIGTERM in the 1st unlearning epoch or the 2nd mask epoch
    ("rnp", 1, ["RNP unlearning"], 2 + 3),
    ("rnp", 3 + 2, ["RNP unlearning", "RNP neuron mask"], 1),
])
def test_sigterm_mid_defense_saves_and_the_rerun_matches_an_uninterrupted_run(
        tmp_path, monkeypatch, name, stop_at, phases, left):
    steps = count_steps(monkeypatch, name)
    reference, reference_model = defend_directly(name)
    assert reference["status"] == "ok"

    checkpoint = Checkpoint(tmp_path / "run.ckpt", "job-a")
    steps.call, steps.calls = stop_at, 0
    with pytest.raises(Preempted, match="SIGTERM"):
        defend_directly(name, checkpoint)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the stage's handlers are gone
    saved = checkpoint.load()["phases"]
    assert [saved[number]["label"] for number in sorted(saved)] == phases

    steps.call, steps.calls = None, 0
    resumed, resumed_model = defend_directly(name, checkpoint)
    assert resumed["status"] == "ok" and same_weights(resumed_model, reference_model)
    assert resumed["details"] == reference["details"]
    assert steps.calls == left  # finished work is restored, not recomputed


@pytest.mark.parametrize("name", ["nad", "sau", "pbe", "ft-sam", "fst", "fp", "ft", "i-bau", "anp", "nc",
                                  "awm", "npd", "mm-bd", "rnp"])
def test_a_rerun_after_the_last_phase_restores_everything_the_defense_reports(tmp_path, monkeypatch, name):
    """SIGTERM after the last phase (e.g. during the final evaluation) leaves every phase finished in
    the checkpoint: the rerun trains nothing and reports what the uninterrupted run reported, so the
    hooks' and loops' records (per-epoch lists, last-round summaries, accumulators) are in the state."""
    reference, reference_model = defend_directly(name)
    checkpoint = Checkpoint(tmp_path / "run.ckpt", "job-a")
    first, _ = defend_directly(name, checkpoint)
    assert first["details"] == reference["details"]  # checkpointing itself changes nothing
    counters = [count_steps(monkeypatch, name), count_steps(monkeypatch, "ft")]  # own loop, engine
    replayed, replayed_model = defend_directly(name, checkpoint)
    assert [counter.calls for counter in counters] == [0, 0]
    assert replayed["status"] == "ok" and replayed["details"] == reference["details"]
    assert same_weights(replayed_model, reference_model)


def test_a_checkpoint_of_another_job_is_ignored(tmp_path, monkeypatch, capsys):
    steps = count_steps(monkeypatch, "nad")
    reference, reference_model = defend_directly("nad")
    steps.call, steps.calls = 5, 0
    with pytest.raises(Preempted):
        defend_directly("nad", Checkpoint(tmp_path / "run.ckpt", "job-a"))
    steps.call = None
    other, other_model = defend_directly("nad", Checkpoint(tmp_path / "run.ckpt", "job-b"))
    assert "different job" in capsys.readouterr().err
    assert same_weights(other_model, reference_model) and other["details"] == reference["details"]


def test_sigterm_between_phases_stops_at_once_and_the_rerun_still_matches(tmp_path, monkeypatch):
    """Code outside a checkpointed loop (here NAD's attention gaps, between its two phases) raises
    Preempted at once; the rerun restores the finished teacher and goes on."""
    import bdsweep.defenses.nad as nad

    reference, reference_model = defend_directly("nad")
    monkeypatch.setattr(nad, "attention_gaps", SigtermAt(nad.attention_gaps, 1))
    checkpoint = Checkpoint(tmp_path / "run.ckpt", "job-a")
    with pytest.raises(Preempted, match="outside a checkpointed loop"):
        defend_directly("nad", checkpoint)
    assert [phase["label"] for phase in checkpoint.load()["phases"].values()] == ["NAD teacher"]
    resumed, resumed_model = defend_directly("nad", checkpoint)
    assert same_weights(resumed_model, reference_model) and resumed["details"] == reference["details"]


# The defend stage as the workflow runs it.

@pytest.fixture
def stage(tmp_path, prepared):
    """A model file, its metrics record and a partition for the defend stage on synthetic data."""
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", create_model("small_cnn", 4, 16),
               {"architecture": "small_cnn", "num_classes": 4, "image_size": 16})
    metrics = {"metrics": {"acc": 0.25, "asr": None, "ra": None}, "target": 0, "effective_ratio": 0.0,
               "sanity": {"acc_below_gate": False, "asr_below_gate": None}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    np.save(tmp_path / "partition.npy", np.arange(0, 120, 4))  # 30 images

    def defend(name, params, out):
        return main(["defend", "--model", str(tmp_path / "model.pt"), "--model-metrics", str(tmp_path / "metrics.json"),
                     "--data", str(tmp_path / "data"), "--partition", str(tmp_path / "partition.npy"),
                     "--defense", name, "--params", json.dumps(params), "--device", "cpu", "--out", str(out)])

    return tmp_path, defend


def comparable(path) -> dict:
    record = json.loads(path.read_text())
    return {key: record[key] for key in ("status", "reason", "post", "removal", "details", "hyperparameters")}


def test_the_defend_stage_preempted_exits_143_and_its_rerun_writes_the_uninterrupted_run_file(stage, monkeypatch):
    root, defend = stage
    params = {"epochs": 3, "batch_size": 8}  # FT: one phase of 3 epochs x 4 batches
    assert defend("ft", params, root / "reference.json") == 0
    other = {"epochs": 2, "batch_size": 8}
    assert defend("ft", other, root / "other.json") == 0
    steps = count_steps(monkeypatch, "ft", stop_at=6)
    out = root / "run.json"
    assert defend("ft", params, out) == PREEMPTED_EXIT_CODE
    assert not out.exists() and out.with_suffix(".ckpt").exists()

    steps.call = None
    assert defend("ft", other, out) == 0  # other params: the checkpoint is not theirs
    assert comparable(out) == comparable(root / "other.json")
    out.unlink()
    steps.call, steps.calls = 6, 0
    assert defend("ft", params, out) == PREEMPTED_EXIT_CODE
    steps.call = None
    assert defend("ft", params, out) == 0
    assert comparable(out) == comparable(root / "reference.json")
    assert not out.with_suffix(".ckpt").exists()  # removed once the run file is written


# Non-finite losses.

@dataclass(frozen=True)
class NaNLossParams:
    epochs: int = 2


class NaNLoss(BatchHook):
    """Adds a constant NaN to the loss: its gradient is zero, so the weights stay finite."""

    def loss(self, inputs, labels, logits, cross_entropy):
        return cross_entropy + torch.tensor(float("nan"))


def nan_loss_defense(model, data, params, device):
    train(model, data.images, data.labels, Recipe(epochs=params.epochs, batch_size=8), data.normalisation, 0,
          description="NaN test", hook=NaNLoss())
    return model


def test_a_nan_loss_with_finite_weights_is_a_failed_run(stage, monkeypatch):
    from bdsweep.defenses import defense

    root, defend = stage
    DEFENSES.entries()  # load every module first, then register on a copy: for this test only
    monkeypatch.setattr(DEFENSES, "_entries", dict(DEFENSES._entries))
    defense("nan-loss", "test double", NaNLossParams, family="fine-tuning")(nan_loss_defense)
    assert defend("nan-loss", {}, root / "run.json") == 0
    record = json.loads((root / "run.json").read_text())
    assert record["status"] == "failed" and record["post"] is None
    assert record["reason"] == "NonFiniteLoss: non-finite loss (NaN or inf) in NaN test, epoch 1, batch 1"


def test_the_engine_names_the_first_non_finite_batch_and_the_gradients_stay_finite():
    data = random_mitigation(n=32, num_classes=4, size=16)
    model = create_model("small_cnn", 4, 16)

    class NaNFromBatch(BatchHook):
        batches = 0

        def loss(self, inputs, labels, logits, cross_entropy):
            self.batches += 1
            return cross_entropy + (torch.tensor(float("inf")) if self.batches >= 7 else 0)

    with pytest.raises(NonFiniteLoss, match="epoch 2, batch 3"):  # batch 7 of 4 per epoch
        train(model, data.images, data.labels, Recipe(epochs=3, batch_size=8), data.normalisation, 0,
              description="test", hook=NaNFromBatch(), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name, where", [("anp", "ANP mask update 1"), ("i-bau", "i-BAU round 1, batch 1"),
                                         ("nc", "NC trigger search, classes 0-1, epoch 1"),
                                         ("awm", "AWM epoch 1, mask step 1"), ("npd", "NPD warm-up epoch 1, batch 1"),
                                         ("rnp", "RNP unlearning epoch 1")])
def test_the_own_loops_report_a_non_finite_loss(monkeypatch, name, where):
    """The own loops check their losses with the engine's LossWatch: a NaN makes the defense fail."""
    cross_entropy = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *args, **kwargs: cross_entropy(*args, **kwargs) * np.nan)
    outcome, _ = defend_directly(name)
    assert outcome["status"] == "failed"
    assert outcome["reason"] == f"NonFiniteLoss: non-finite loss (NaN or inf) in {where}"


def test_mm_bd_reports_a_non_finite_loss():
    """MM-BD's loss has no cross-entropy: an overflowing bound penalty makes it infinite instead."""
    outcome, _ = defend_directly("mm-bd", lam=1e308)
    assert outcome["status"] == "failed"
    assert outcome["reason"] == "NonFiniteLoss: non-finite loss (NaN or inf) in MM-BD epoch 1"


def test_training_a_model_with_a_nan_loss_fails_with_a_clear_error(prepared, tmp_path, monkeypatch, capsys):
    import bdsweep.stages.train as stage

    class NaNLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * float("nan")

    monkeypatch.setattr(stage, "create_model", lambda *args: NaNLogits(create_model(*args)))
    code = main(["train", "--data", str(tmp_path / "data"), "--attack", "clean", "--architecture", "small_cnn",
                 "--recipe", '{"epochs": 2, "batch_size": 32}', "--target", "0", "--seed", "0", "--device", "cpu",
                 "--out-model", str(tmp_path / "model.pt"), "--out-metrics", str(tmp_path / "metrics.json"),
                 "--out-curve", str(tmp_path / "curve.csv")])
    assert code == 1 and not (tmp_path / "model.pt").exists()
    assert "non-finite loss (NaN or inf) in train small_cnn clean, epoch 1, batch 1" in capsys.readouterr().err
