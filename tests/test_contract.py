"""The contract every defense and attack keeps, parametrized from the registries at collection time,
so a newly registered defense, architecture or attack is tested without editing a list.

Every defense runs with the ``smoke`` settings of its registration (``@defense(..., smoke={...})``:
one epoch, a few steps, small batches) through the defend stage's ``runs.run_defense``:

- on every architecture at 32 and 64 px, on a randomly initialised model and one random image per
  class (plus the spare draw): it returns a model with finite weights that takes the same images and
  gives logits for the same classes, keeps every tensor of the model it was given (it may add
  modules, as NPD's polarizer), leaves no hook on it, and reports details the run file can hold;
- on the defend stage's own path (the digits model): it reads no test set, poison file or model
  record while it runs;
- on the small CNN: two runs from one seed agree; SIGTERM halfway through (at the middle of the
  checks where its checkpointed loops can stop) stops it, and the rerun resumes to the result of an
  uninterrupted run; under CPU bfloat16 autocast, where the CUDA path autocasts, it returns finite
  float32 weights.

Every attack, with its own ``smoke`` settings, builds its trigger at 32 and 64 px (the end of this
file). What a defense does to a backdoor, or an attack to a model, is tested per method
(tests/test_defense_<name>.py, tests/test_attack_training.py); here only what every method promises.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bdsweep.attacks import META, HookContext, ResourceContext, is_training_time
from bdsweep.checkpoints import Checkpoint
from bdsweep.engine import Normalisation, precision, train
from bdsweep.errors import Preempted
from bdsweep.models import ModelParts, create_model
from bdsweep.recipe import Recipe
from bdsweep.registry import ARCHITECTURES, ATTACKS, DEFENSES
from bdsweep.runs import run_defense
from conftest import SigtermAt, defend, random_mitigation, same_weights, sigterm_at_check

CPU = torch.device("cpu")
DEFENSE_NAMES = DEFENSES.names()
ARCHITECTURE_NAMES = ARCHITECTURES.names()
SIZES = (32, 64)  # CIFAR-10 and GTSRB; Tiny-ImageNet
CLASSES = 4


def smoke_run(name, model, data, checkpoint=None, **overrides) -> dict:
    """The defend stage's ``run_defense`` of ``name`` with its smoke settings (updated by
    ``overrides``), seeded as the stage seeds a run; its outcome."""
    defense = DEFENSES.get(name)
    torch.manual_seed(0)
    return run_defense(defense, model, data, defense.params(**{**defense.smoke, **overrides}), CPU, checkpoint)


def failure(outcome) -> str:
    return f"{outcome['reason']}\n{outcome['details'].get('traceback', '')}"


def float_tensors(model) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if value.is_floating_point()}


def assert_records_details(outcome) -> None:
    """Details are a dict the run file can hold (``atomic.write_json``: no NaN, sortable keys)."""
    assert isinstance(outcome["details"], dict)
    json.dumps(outcome["details"], sort_keys=True, allow_nan=False)


# Every defense on every architecture at every image size.

@pytest.fixture(scope="module")
def initial_models():
    """A randomly initialised model per (architecture, size), built once per module (VGG19-BN takes
    seconds to initialise); every test gets its own copy."""
    built = {}

    def initial(architecture, size):
        if (architecture, size) not in built:
            torch.manual_seed(0)
            built[architecture, size] = create_model(architecture, CLASSES, size)
        return copy.deepcopy(built[architecture, size])

    yield initial
    built.clear()


# One SGD step at lr 0.01 on 4 images moves a randomly initialised EfficientNet-B3's depthwise weights
# by up to ~100 at 32 px (its last stages are 1 x 1 maps; batch statistics of 4 values), so its
# eval-mode activations overflow: finite weights, non-finite outputs. NAD checks its teacher's
# activations and reports that as a failed run, as it should (tests/test_defense_nad.py runs it on
# every architecture at lr 1e-4 for this reason); a trained model does not do this.
RANDOM_MODEL_OVERFLOWS = {("nad", "efficientnet_b3", 32)}


def grid():
    for name in DEFENSE_NAMES:
        for architecture in ARCHITECTURE_NAMES:
            for size in SIZES:
                marks = [pytest.mark.xfail(strict=True, reason="the random EfficientNet-B3's eval activations "
                                           "overflow after one step at 32 px; NAD's guard fails the run")
                         ] if (name, architecture, size) in RANDOM_MODEL_OVERFLOWS else []
                yield pytest.param(name, architecture, size, marks=marks, id=f"{name}-{architecture}-{size}")


@pytest.mark.parametrize("name, architecture, size", list(grid()))
def test_a_defense_returns_a_finite_model_of_the_same_interface(initial_models, name, architecture, size):
    model = initial_models(architecture, size)
    given = sorted((tuple(t.shape), str(t.dtype)) for t in model.state_dict().values())
    # SPC 1 with the spare draw: one training step per smoke epoch, and FORK's smallest split
    data = random_mitigation(n=CLASSES, num_classes=CLASSES, size=size, spare=True)

    outcome = smoke_run(name, model, data)

    assert outcome["status"] == "ok", failure(outcome)
    defended = outcome["model"]
    assert isinstance(getattr(defended, "parts", None), ModelParts)
    kept = sorted((tuple(t.shape), str(t.dtype)) for t in defended.state_dict().values())
    missing = list(given)
    for entry in kept:  # every tensor it was given is still there (as a multiset): nothing removed or reshaped
        if entry in missing:
            missing.remove(entry)
    assert not missing
    # the defense's hooks are gone: nothing outside the weights changes what the model computes
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in defended.modules())
    with torch.no_grad():  # finite weights (run_defense's check), not finite outputs: see RANDOM_MODEL_OVERFLOWS
        logits = defended.eval()(data.normalisation.normalise(data.images.permute(0, 3, 1, 2).float() / 255))
    assert logits.shape == (CLASSES, CLASSES) and logits.dtype == torch.float32
    assert_records_details(outcome)


# Every defense on the defend stage's own path.

OPENED: list[str] | None = None  # files opened while a watched defense runs


def record_opened_files(event, args):
    if event == "open" and OPENED is not None:
        OPENED.append(str(args[0]))


@pytest.fixture(scope="module")
def opened_files():
    """Audits file opens (an audit hook stays for the process, so it records only while asked)."""
    global OPENED
    sys.addaudithook(record_opened_files)
    OPENED = []
    Path(__file__).read_bytes()
    assert OPENED == [__file__]  # the hook sees an open
    OPENED = None


@pytest.mark.parametrize("name", DEFENSE_NAMES)
def test_a_defense_reads_no_test_poison_or_model_record_while_it_runs(
        name, digits_backdoor, recorded_reads, opened_files, monkeypatch):
    global OPENED
    defense = DEFENSES.get(name)
    seen = {}

    def watched(*args):
        global OPENED
        seen["before"], OPENED = list(recorded_reads), []
        try:
            return defense.run(*args)
        finally:
            seen["during"], seen["opened"], OPENED = recorded_reads[len(seen["before"]):], OPENED, None

    entry = DEFENSES.entry(name)
    monkeypatch.setitem(DEFENSES._entries, name, replace(entry, obj=replace(defense, run=watched)))
    record = defend(digits_backdoor, name, defense.smoke, partition=defense.needs_data, out=f"contract-{name}.json")

    assert record["status"] == "ok", record["reason"]
    assert set(seen["before"]) <= {"x_train", "y_train"} and seen["during"] == []
    forbidden = {os.path.realpath(digits_backdoor / name)
                 for name in ("data/x_test.npy", "data/y_test.npy", "poison.npz", "metrics.json")}
    assert not forbidden & {os.path.realpath(path) for path in seen["opened"]}
    assert {"x_test", "y_test", "load_poison", "read_json"} <= set(recorded_reads)  # the stage evaluated after


# Every defense on the small CNN: determinism, resumption, bfloat16.

def small_run(name, checkpoint=None, **overrides) -> tuple[dict, torch.nn.Module]:
    """(outcome, model) of a smoke run on a fresh small CNN with 8 random images per class."""
    torch.manual_seed(0)
    model = create_model("small_cnn", CLASSES, 16)
    data = random_mitigation(n=8 * CLASSES, num_classes=CLASSES, size=16, spare=True)
    return smoke_run(name, model, data, checkpoint, **overrides), model


@pytest.mark.parametrize("name", DEFENSE_NAMES)
def test_a_defense_is_deterministic_on_cpu_for_one_seed(name):
    first, first_model = small_run(name)
    second, second_model = small_run(name)
    assert first["status"] == second["status"] == "ok", failure(first)
    assert same_weights(first["model"], second["model"])
    assert first["details"] == second["details"]


@pytest.mark.parametrize("name", DEFENSE_NAMES)
def test_a_defense_stopped_by_sigterm_resumes_to_the_uninterrupted_result(name, tmp_path, monkeypatch):
    checks = sigterm_at_check(monkeypatch)
    reference, _ = small_run(name, Checkpoint(tmp_path / "reference.ckpt", "job"))
    assert reference["status"] == "ok", failure(reference)

    checkpoint = Checkpoint(tmp_path / "run.ckpt", "job")
    if checks.calls:  # halfway through the points where its loops can stop
        checks.call, checks.calls = (checks.calls + 1) // 2, 0
        with pytest.raises(Preempted):
            small_run(name, checkpoint)
        checks.call = None
    else:  # no checkpointed loop: SIGTERM stops it at once, wherever it is
        defense = DEFENSES.get(name)
        interrupted = replace(defense, run=SigtermAt(defense.run, 1))
        monkeypatch.setitem(DEFENSES._entries, name, replace(DEFENSES.entry(name), obj=interrupted))
        with pytest.raises(Preempted):
            small_run(name, checkpoint)
        monkeypatch.undo()

    resumed, _ = small_run(name, checkpoint)
    assert resumed["status"] == "ok", failure(resumed)
    assert same_weights(resumed["model"], reference["model"])
    assert resumed["details"] == reference["details"]
    assert (resumed["resumed"] is not None) == checkpoint.path.exists()


@pytest.mark.parametrize("name", DEFENSE_NAMES)
def test_a_defense_runs_under_cpu_bfloat16_autocast_as_on_cuda(name):
    """The CUDA path autocasts to bfloat16 where ``engine.autocast`` says (precision "bf16"); here the
    CPU does the same, so a dtype error of the GPU path (a bf16 tensor meeting a float32 one outside
    autocast, bf16 weights left behind) fails on a machine without one."""
    with precision("bf16", on_cpu=True):
        outcome, _ = small_run(name)
    assert outcome["status"] == "ok", failure(outcome)
    assert {str(t.dtype) for t in float_tensors(outcome["model"]).values()} == {"torch.float32"}
    assert_records_details(outcome)


# Every attack at every image size.

ATTACK_NAMES = ATTACKS.names()


def training_images(size, n=32):
    """Random uint8 NHWC training images with balanced labels, as a prepared dataset holds them."""
    generator = np.random.default_rng(size)
    return generator.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % CLASSES


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_an_attack_triggers_images_of_every_size(name, size):
    """With its smoke settings: a data-poisoning attack builds the same resource twice from one seed
    (a per-architecture one against a clean model) and stamps uint8 images into changed uint8 images
    of the same shape; a training-time attack trains a model to finite weights for an epoch,
    poisons a share of it, and its trigger keeps images in [0, 1]."""
    attack = ATTACKS.get(name)
    params = attack.params(**attack.smoke)
    images, labels = training_images(size)
    normalisation = Normalisation((0.5,) * 3, (0.25,) * 3, True)
    torch.manual_seed(0)
    model = create_model("small_cnn", CLASSES, size)
    if is_training_time(attack):
        pixels, targets = torch.from_numpy(images), torch.from_numpy(labels)
        context = HookContext(pixels, targets, torch.ones(len(labels), dtype=torch.bool), normalisation, CLASSES,
                              size, target=0, ratio=0.5, seed=0, progress=False)
        hook = attack.make_hook(context, params)
        train(model, pixels, targets, hook.training_recipe(Recipe(epochs=1, batch_size=16)), normalisation, 0,
              description=f"contract {name}", hook=hook, progress=False)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
        assert 0 < hook.effective_ratio <= 1
        clean = pixels.permute(0, 3, 1, 2).float() / 255
        triggered = hook.trigger(clean)
        assert triggered.shape == clean.shape and triggered.min() >= 0 and triggered.max() <= 1
        assert not torch.equal(triggered, clean)
    else:
        def resource():
            clean_model = copy.deepcopy(model) if attack.per_architecture else None
            context = ResourceContext(size, CLASSES, target=0, seed=0, device=CPU, normalisation=normalisation,
                                      train_images=images, train_labels=labels, clean_model=clean_model)
            return attack.make_resource(context, params)

        first, second = resource(), resource()
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[key], second[key]) for key in first if key != META)  # meta: timings
        poisoned = attack.apply_trigger(images, first, params)
        assert poisoned.dtype == np.uint8 and poisoned.shape == images.shape
        assert (poisoned != images).any()
        assert np.array_equal(attack.apply_trigger(images, first, params), poisoned)
