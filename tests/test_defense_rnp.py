"""RNP as the survey's code ran it: unlearning (weights and masks) stops at the accuracy threshold,
the recovery mask stays in [0, 1] and starts from the unlearned masks, FORK's adaptive threshold sweep
on a stub accuracy sequence, the retry with a lower lr, gradient clipping off, the final copy's BN eps,
the original model returned with exactly the low-score channels pruned, every architecture, few data,
and the defend stage end to end."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import bdsweep.defenses.rnp as rnp
from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses.rnp import RNPParams, learn_neuron_mask, mask_scores, sweep_threshold, unlearn
from bdsweep.defenses.support import accuracy, subset
from bdsweep.engine import NonFiniteLoss, Normalisation
from bdsweep.models import batch_norms, create_model
from bdsweep.registry import ARCHITECTURES, DEFENSES
from bdsweep.results import table_row
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# Unlearns the digits model within a few epochs.
FAST = RNPParams(unlearn_lr=0.05, recover_epochs=10, weight_decay=5e-4)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def ones(model):
    return {name: torch.ones(bn.num_features) for name, bn in batch_norms(model)}


def test_params_are_validated_by_name():
    with pytest.raises(ValueError, match="threshold_step"):
        RNPParams(threshold_step=0.0)
    with pytest.raises(ValueError, match="clean_threshold"):
        RNPParams(clean_threshold=-0.1)
    with pytest.raises(ValueError, match="max_tries"):
        RNPParams(max_tries=0)


def test_unlearning_stops_at_the_first_epoch_whose_accuracy_reaches_the_clean_threshold(digits):
    model, data = digits
    unlearned = copy.deepcopy(model)
    epochs, train_accuracy = unlearn(unlearned, ones(unlearned), data, FAST, generator())
    assert 1 < epochs < FAST.unlearn_epochs and train_accuracy <= FAST.clean_threshold
    assert accuracy(unlearned, data) < 0.3 < accuracy(model, data)  # gradient ascent destroyed the clean task
    # Same seed, one epoch fewer: still above the threshold, so it stopped as soon as it got there.
    _, previous = unlearn(copy.deepcopy(model), ones(model), data, replace(FAST, unlearn_epochs=epochs - 1),
                          generator())
    assert previous > FAST.clean_threshold


@pytest.mark.parametrize("unlearn_masks", [True, False])
def test_unlearning_moves_the_masks_only_as_fork_does(digits, unlearn_masks):
    model, data = digits
    masks = ones(model)
    unlearn(copy.deepcopy(model), masks, data, replace(FAST, unlearn_epochs=2, unlearn_masks=unlearn_masks),
            generator())
    values = torch.cat(list(masks.values()))
    assert (values != 1).any() if unlearn_masks else torch.equal(values, torch.ones_like(values))


def test_the_recovery_mask_starts_from_the_given_masks_stays_in_the_unit_interval_and_leaves_weights_alone(digits):
    model, data = digits
    unlearned, masks = copy.deepcopy(model), ones(model)
    unlearn(unlearned, masks, data, FAST, generator())
    weights = {name: p.clone() for name, p in unlearned.named_parameters()}
    start = {name: m.clone() for name, m in masks.items()}
    # One epoch at a tiny lr: the masks barely leave where unlearning put them (not from 1).
    tiny = learn_neuron_mask(copy.deepcopy(unlearned), {n: m.clone() for n, m in masks.items()}, data,
                             replace(FAST, recover_lr=1e-6, recover_epochs=1), generator())
    assert all(torch.allclose(tiny[n], start[n].clamp(0, 1), atol=1e-4) for n in start)
    # A large step drives many values past the bounds, so the clipping is what keeps them in [0, 1].
    learned = learn_neuron_mask(unlearned, masks, data, replace(FAST, recover_lr=20.0), generator())
    assert set(learned) == {name for name, _ in batch_norms(unlearned)}
    values = torch.cat(list(learned.values()))
    assert values.min() == 0 and values.max() == 1 and ((values > 0) & (values < 1)).any()
    assert all(torch.equal(p, weights[name]) for name, p in unlearned.named_parameters())


def stub_model():
    model = create_model("small_cnn", 2, 16)
    name, bn = batch_norms(model)[0]
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.5)
    return model, name, bn


def test_threshold_sweep_follows_forks_rule_on_a_stub_accuracy_sequence():
    model, name, bn = stub_model()
    scores = {name: torch.full((bn.num_features,), 0.9, dtype=torch.float64)}
    scores[name][[1, 2, 3, 4]] = torch.tensor([0.0, 0.02, 0.05, 0.3], dtype=torch.float64)
    sequence = iter([0.80,  # unpruned
                     0.80, 0.79, 0.78,  # thresholds 0, 0.02, 0.04: within 0.02 absolute (0.78 = 0.80 - 0.02)
                     0.90,  # 0.06: a rise passes
                     0.7799, 0.95])  # 0.08: below 0.78 -> stop (0.95 is never measured)
    pruned_at = {}

    def evaluate(m):
        pruned_at[len(pruned_at)] = torch.nonzero(bn.weight == 0).flatten().tolist()
        return next(sequence)

    threshold, initial, accuracies, pruned = sweep_threshold(model, scores, evaluate, RNPParams())
    assert initial == 0.80 and threshold == pytest.approx(0.06)
    assert list(accuracies) == [0.0, 0.02, 0.04, 0.06, 0.08]  # stopped at the first failure
    # strictly below the threshold: score 0 is never pruned at 0, score 0.02 not at 0.02
    assert pruned_at[1] == [] and pruned_at[2] == [1] and pruned_at[3] == [1, 2] and pruned_at[4] == [1, 2, 3]
    assert pruned == {name: [1, 2, 3]} and torch.nonzero(bn.weight == 0).flatten().tolist() == [1, 2, 3]
    assert bn.bias.eq(0.5).all() and bn.weight[[0, 4, 5]].eq(2).all()
    # prune_bias zeroes the shifts of the same channels; a failure at threshold 0 prunes nothing.
    model, name, bn = stub_model()
    sequence = iter([0.8, 0.8, 0.8, 0.8, 0.1])
    sweep_threshold(model, scores, lambda m: next(sequence), RNPParams(prune_bias=True))
    assert torch.nonzero(bn.bias == 0).flatten().tolist() == [1, 2]
    model, name, bn = stub_model()
    sequence = iter([0.8, 0.7])
    chosen, *_ = sweep_threshold(model, scores, lambda m: next(sequence), RNPParams())
    assert chosen is None and bn.weight.eq(2).all() and bn.bias.eq(0.5).all()


def test_threshold_sweep_runs_to_one_by_float_steps_when_accuracy_never_drops():
    model, name, bn = stub_model()
    scores = {name: torch.linspace(0, 1, bn.num_features, dtype=torch.float64)}
    threshold, _, accuracies, pruned = sweep_threshold(model, scores, lambda m: 0.5, RNPParams())
    expected, t = [], 0.0
    while t < 1.0:  # FORK adds 0.02 up as floats
        expected.append(t)
        t += 0.02
    assert list(accuracies) == [round(e, 6) for e in expected] and threshold == expected[-1]
    assert len(pruned[name]) == int((scores[name] < expected[-1]).sum())


def test_scores_are_rounded_to_four_decimals():
    masks = {"a": torch.tensor([0.12344, 0.12346, 0.99996])}
    assert mask_scores(masks, RNPParams())["a"].tolist() == [0.1234, 0.1235, 1.0]
    assert mask_scores(masks, RNPParams(round_scores=False))["a"].tolist() == pytest.approx([0.12344, 0.12346, 0.99996])


def test_a_failed_try_is_retried_with_a_tenth_of_the_lr(monkeypatch):
    model, data = create_model("small_cnn", 2, 16), random_data()
    lrs, real = [], rnp.unlearn

    def failing_once(model, masks, data, params, generator, lr=None, label=""):
        lrs.append((lr, label))
        if len(lrs) == 1:
            raise NonFiniteLoss("non-finite loss (NaN or inf) in RNP unlearning epoch 1")
        return real(model, masks, data, params, generator, lr, label)

    monkeypatch.setattr(rnp, "unlearn", failing_once)
    result = DEFENSES.get("rnp").run(model, data, RNPParams(unlearn_epochs=1, recover_epochs=1), CPU)
    assert [lr for lr, _ in lrs] == [0.001, pytest.approx(0.0001)]
    assert [label for _, label in lrs] == ["RNP unlearning", "RNP unlearning (try 2)"]
    assert result.details["unlearn_tries"] == 2 and result.details["unlearn_lr_used"] == pytest.approx(1e-4)
    assert any("try 1 failed" in note for note in result.details["notes"])


def random_data(n=8, size=16):
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator())
    return MitigationData(images, torch.arange(n) % 2, Normalisation((0.5,) * 3, (0.25,) * 3, True), size, 2)


@pytest.mark.parametrize("clip", [False, True])
def test_gradients_are_not_clipped_by_default(monkeypatch, clip):
    calls = []
    monkeypatch.setattr(rnp.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: calls.append(args))
    DEFENSES.get("rnp").run(create_model("small_cnn", 2, 16), random_data(),
                            RNPParams(unlearn_epochs=2, recover_epochs=1, clip_gradients=clip), CPU)
    assert (len(calls) == 2) if clip else not calls


def test_the_original_model_is_returned_with_exactly_the_low_score_channels_pruned(digits, monkeypatch):
    model, data = digits
    original = {name: t.clone() for name, t in model.state_dict().items()}
    learned, real = {}, rnp.learn_neuron_mask

    def spy(*args, **kwargs):  # records the mask the defense learns
        learned.update(real(*args, **kwargs))
        return learned

    monkeypatch.setattr(rnp, "learn_neuron_mask", spy)
    result = DEFENSES.get("rnp").run(model, data, replace(FAST, augment_accuracy=False, max_accuracy_drop=0.25), CPU)
    assert isinstance(result, Defended)
    threshold = result.details["threshold"]
    assert threshold is not None and threshold > 0

    state = result.model.state_dict()
    scores = mask_scores(learned, RNPParams())
    low = {f"{name}.weight": score < threshold for name, score in scores.items()}
    pruned = sum(int(m.sum()) for m in low.values())
    assert result.details["pruned_channels"] == pruned
    for name, before in original.items():
        expected = before.clone()
        if name in low:
            expected[low[name]] = 0
        # Everything else, BN shifts and running statistics included, is the original's: not the unlearned copy.
        assert torch.equal(state[name], expected), name
    # With plain (unaugmented) accuracy, the returned model's is within the allowance of the unpruned one's.
    assert result.details["mitigation_accuracy_after"] >= result.details["mitigation_accuracy_before"] - 0.25


# vgg19_bn passes too (checked by hand) but is left out for time: building its 139M-parameter head and
# taking SGD steps on it costs ~20 s on one busy CPU thread.
@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES.names() if a != "vgg19_bn"])
def test_runs_on_every_architecture(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, 2, 32)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                          Normalisation((0.5,) * 3, (0.25,) * 3, True), 32, 2)
    eps = {bn.eps for _, bn in batch_norms(model)}
    result = DEFENSES.get("rnp").run(model, data, RNPParams(unlearn_epochs=1, recover_epochs=1), CPU)
    # FORK returns a copy built with nn.BatchNorm2d's eps 1e-5: only MobileNetV3 (1e-3) changes.
    assert eps == ({1e-3} if architecture == "mobilenet_v3_large" else {1e-5})
    assert {bn.eps for _, bn in batch_norms(result.model)} == {1e-5}
    assert result.details["bn_channels"] == sum(bn.num_features for _, bn in batch_norms(result.model))
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    assert result.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_final_bn_eps_zero_keeps_the_architectures_own():
    model = create_model("mobilenet_v3_large", 2, 32)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                          Normalisation((0.5,) * 3, (0.25,) * 3, True), 32, 2)
    result = DEFENSES.get("rnp").run(model, data, RNPParams(unlearn_epochs=1, recover_epochs=1, final_bn_eps=0.0),
                                     CPU)
    assert {bn.eps for _, bn in batch_norms(result.model)} == {1e-3}


def test_few_images_degrade_as_documented(digits):
    model, data = digits
    spc2 = subset(data, torch.cat([torch.nonzero(data.labels == c).flatten()[:2] for c in range(10)]))
    params = RNPParams(unlearn_epochs=2, recover_epochs=1)  # lr 0.001 cannot unlearn the digits in 2 epochs
    notes = DEFENSES.get("rnp").run(copy.deepcopy(model), spc2, params, CPU).details["notes"]
    assert any("20 mitigation images, fewer than batch_size 256" in n for n in notes)
    assert any("unlearning stopped at unlearn_epochs=2" in n for n in notes)

    before = {name: t.clone() for name, t in model.state_dict().items()}
    one = DEFENSES.get("rnp").run(model, subset(data, torch.tensor([0])), params, CPU)
    assert one.details["pruned_channels"] == 0 and "cannot train on fewer than 2" in one.details["notes"][0]
    assert all(torch.equal(t, before[name]) for name, t in one.model.state_dict().items())


def test_defend_stage_end_to_end_removes_the_backdoor(digits_backdoor):
    # The digits CNN has few channels: at FORK's 0.02 allowance its first pruning step already costs
    # 15 % (nothing is pruned); a 25 % allowance on plain images lets the sweep go on.
    params = {"unlearn_lr": 0.05, "recover_epochs": 10, "max_accuracy_drop": 0.25, "augment_accuracy": False}
    record = defend(digits_backdoor, "rnp", params, out="rnp.json")
    assert record["status"] == "ok" and record["hyperparameters"]["unlearn_lr"] == 0.05
    table_row(record, "rnp.json")  # a valid run record for the aggregate stage
    details = record["details"]
    print(record["pre"], record["post"], details["threshold"], details["pruned_channels"])
    assert details["pruned_channels"] > 0 and isinstance(details["notes"], list)
    assert details["unlearned_train_accuracy"] <= 0.2
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.6
