"""SAU: its shared PGD examples, the shared-example filter and unlearning loss, the frozen reference, Adam
with amsgrad as FORK builds it, every architecture, few data and the defend stage end to end."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from bdsweep.defenses import Defended, sau
from bdsweep.defenses.sau import (
    SAUParams,
    shared_mistakes,
    shared_pgd,
    shared_unlearning_loss,
    unlearning_mask,
)
from bdsweep.models import create_model
from conftest import QUICK_ARCHITECTURES as ARCHITECTURES
from conftest import defend, random_mitigation, run_defense

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"rounds": 1, "adv_steps": 1}


def run_sau(model, data, **params):
    return run_defense("sau", model, data, **params)


def two_models(num_classes=3, size=16):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=num_classes, image_size=size).eval()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, reference.eval()


def test_shared_pgd_examples_stay_within_the_linf_budget_and_the_pixel_range():
    model, reference = two_models()
    images = torch.rand(6, 3, 16, 16)
    images[0] = 0.0  # saturated images: the [0, 1] clamp must bind
    images[1] = 1.0
    params = SAUParams(trigger_norm=0.1, adv_lr=0.03, adv_steps=5, clip_to_image=True)
    adversarial, steps = shared_pgd(model, reference, images, torch.tensor([0, 1, 2, 0, 1, 2]), params)
    change = (adversarial - images).abs()
    assert change.max() <= 0.1 + 1e-6 and change.max() > 0.099  # the +eps start sits on the bound
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert 1 <= steps <= 5
    # FORK's default: only the L-inf budget binds, so a saturated white image goes above 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    fork, _ = shared_pgd(model, reference, images, labels, replace(params, clip_to_image=False))
    assert (fork - images).abs().max() <= 0.1 + 1e-6 and fork[1].max() > 1.0


def linear_pair(noise=1.0):
    """A linear classifier and a perturbed copy: they disagree on some inputs, and are easy to attack."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(noise * p.abs().mean() * torch.randn_like(p))
    return model, reference


def test_the_agreement_term_makes_the_pgd_examples_shared_mistakes():
    model, reference = linear_pair()
    images = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels, reference_labels = model(images).argmax(1), reference(images).argmax(1)

    def shared(x):
        with torch.no_grad():
            return int(shared_mistakes(model(x), reference(x), labels, reference_labels).sum())

    params = SAUParams(trigger_norm=0.05, adv_lr=0.01, clip_to_image=True)
    with_agreement, _ = shared_pgd(model, reference, images, labels, params)
    without_agreement, _ = shared_pgd(model, reference, images, labels, replace(params, beta_shared=0.0))
    assert shared((images + 0.05).clamp(0, 1)) == 0  # the starting point shares nothing
    assert shared(with_agreement) > 1.5 * shared(without_agreement) > 0  # 31 vs 16 of 64


def test_the_shared_filter_keeps_exactly_the_examples_both_models_misclassify_to_one_label():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])

    def logits(predicted):
        return torch.nn.functional.one_hot(torch.tensor(predicted), 3).float() * 5

    model = logits([1, 1, 0, 2, 2, 1])  # wrong on 0, 1, 3, 4, 5
    reference = logits([1, 2, 1, 2, 2, 1])  # wrong on 0, 1, 2, 3, 4, 5
    # alike and wrong: 0 (1), 3 (2), 4 (2), 5 (1); 1 differs (1 vs 2); 2 the model gets right
    assert shared_mistakes(model, reference, labels, labels).tolist() == [True, False, False, True, True, True]
    # each model is judged against its own labels (the PGD uses each model's clean prediction)
    assert shared_mistakes(model, reference, labels, torch.tensor([1, 0, 0, 0, 1, 2])).tolist()[0] is False

    reference_clean = logits([0, 0, 0, 2, 1, 2])  # the reference predicts 3 as on its clean image: not unlearned
    assert unlearning_mask(reference, reference_clean, labels).tolist() == [True, True, True, False, True, True]
    assert unlearning_mask(reference, reference_clean, labels, model, shared_only=True).tolist() == [
        True, False, False, False, True, True]


def test_the_unlearning_loss_is_minus_log_one_minus_the_models_probability_of_the_references_label():
    adv_logits = torch.tensor([[0.0, math.log(3.0), 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    reference_adv = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])  # labels 1, 2, 0
    mask = torch.tensor([True, False, True])
    # p(1 | x0) = 3/5, p(0 | x2) = 1/3; example 1 is masked out; the sum is divided by the batch (3)
    expected = -(math.log(1 - 3 / 5) + math.log(1 - 1 / 3)) / 3
    assert shared_unlearning_loss(adv_logits, reference_adv, mask).item() == pytest.approx(expected, rel=1e-5)
    assert shared_unlearning_loss(adv_logits, reference_adv, torch.zeros(3, dtype=torch.bool)).item() == 0


def test_the_reference_stays_frozen_while_the_model_unlearns(monkeypatch):
    seen = {}

    class Spy(sau.SharedAdversarialUnlearning):
        def __init__(self, model, reference, *rest):
            super().__init__(model, reference, *rest)
            seen.update(model=model, reference=reference)

    monkeypatch.setattr(sau, "SharedAdversarialUnlearning", Spy)
    model = create_model("small_cnn", num_classes=2, image_size=16)
    original = copy.deepcopy(model.state_dict())
    result = run_sau(model, random_mitigation(n=8, size=16), rounds=2, batch_size=4, lr=1e-2, adv_steps=2)
    reference = seen["reference"]
    assert seen["model"] is result.model and reference is not result.model
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert all(torch.equal(v, original[k]) for k, v in reference.state_dict().items())
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, original[k])]
    assert any(k.endswith("weight") for k in changed)
    assert {"last_round_shared_rate", "last_round_unlearned_rate", "final_training_loss"} <= set(result.details)


def test_the_update_is_forks_adam_with_amsgrad_unless_asked_otherwise(monkeypatch):
    built = []
    real = torch.optim.Adam

    def spy(params, **kwargs):
        built.append(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    data = random_mitigation(n=4, size=16)
    run_sau(create_model("small_cnn", num_classes=2, image_size=16), data, **TINY)
    run_sau(create_model("small_cnn", num_classes=2, image_size=16), data, amsgrad=False, **TINY)
    assert [(kwargs["amsgrad"], kwargs["lr"], kwargs["weight_decay"]) for kwargs in built] == [
        (True, 1e-4, 0.0), (False, 1e-4, 0.0)]  # FORK config/defense/sau/*.yaml: adam, lr 1e-4, wd 0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sau_runs_on_every_architecture(architecture):
    model = create_model(architecture, num_classes=2, image_size=32)
    result = run_sau(model, random_mitigation(n=4), **TINY)
    assert isinstance(result, Defended)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert not result.model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in result.model.modules())


def test_few_data_degrades_as_documented():
    for spc in (2, 1):  # 10 classes: fewer images than the default batch of 256
        data = random_mitigation(n=10 * spc, num_classes=10, size=16)
        result = run_sau(create_model("small_cnn", 10, 16), data, **TINY)
        assert any("one batch per round" in note for note in result.details["notes"])
        assert all(torch.isfinite(p).all() for p in result.model.parameters())
    trailing = run_sau(create_model("small_cnn", 10, 16), random_mitigation(n=21, num_classes=10, size=16),
                       batch_size=10, **TINY)
    assert any("trailing batch of one image" in note for note in trailing.details["notes"])
    model = create_model("small_cnn", 2, 16)
    before = copy.deepcopy(model.state_dict())
    single = run_sau(model, random_mitigation(n=1, size=16), **TINY)
    assert "unchanged" in single.details["notes"][0]
    assert all(torch.equal(v, before[k]) for k, v in single.model.state_dict().items())


def test_sau_removes_the_planted_backdoor_through_the_defend_stage(digits_backdoor):
    # 10 rounds of 4 batches at lr 1e-3 (the default 1e-4 needs the default 100 rounds): ASR 0.91 -> 0.23,
    # ACC 0.97 -> 0.93; 8 or 12 rounds, lr 5e-4 or batch 16 give ASR 0.10-0.36 and ACC >= 0.85.
    record = defend(digits_backdoor, "sau", {"rounds": 10, "lr": 1e-3, "batch_size": 32}, out="sau.json")
    assert record["status"] == "ok" and record["hyperparameters"]["rounds"] == 10
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.8


def test_the_pgd_takes_its_step_before_it_sees_that_every_example_is_shared_as_fork():
    model, reference = linear_pair()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = model(images).argmax(1)
    # a budget so large that the first step shares every example: FORK steps once more, then stops
    params = SAUParams(trigger_norm=1.0, adv_lr=1.0, adv_steps=5, beta_adv=1.0)
    fork_adv, fork_steps = shared_pgd(model, reference, images, labels, params)
    early_adv, early_steps = shared_pgd(model, reference, images, labels, replace(params, step_when_shared=False))
    assert early_steps < 5 and fork_steps == early_steps + 1
