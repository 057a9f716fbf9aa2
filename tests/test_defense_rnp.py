"""RNP: unlearning stops at the accuracy threshold, the mask stays in [0, 1], the original model
(not the unlearned one) is returned with exactly its low-mask channels pruned, every architecture
runs, few data degrade with notes, and the defend stage end to end."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

import bdsweep.defenses.rnp as rnp
from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses.rnp import RNPParams, learn_neuron_mask, prune_low_mask_channels, unlearn
from bdsweep.defenses.support import accuracy, subset
from bdsweep.engine import Normalisation
from bdsweep.models import batch_norms, create_model
from bdsweep.registry import ARCHITECTURES, DEFENSES
from bdsweep.results import table_row
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# Unlearns the digits model in ~8 epochs; 10 recovery epochs push some masks under 0.7.
FAST = RNPParams(unlearn_lr=0.05, recover_epochs=10)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_params_are_validated_by_name():
    with pytest.raises(ValueError, match="prune_threshold"):
        RNPParams(prune_threshold=1.5)
    with pytest.raises(ValueError, match="clean_threshold"):
        RNPParams(clean_threshold=-0.1)


def test_unlearning_stops_at_the_first_epoch_whose_accuracy_reaches_the_clean_threshold(digits):
    model, data = digits
    unlearned = copy.deepcopy(model)
    epochs, train_accuracy = unlearn(unlearned, data, FAST, generator())
    assert 1 < epochs < FAST.unlearn_epochs and train_accuracy <= FAST.clean_threshold
    assert accuracy(unlearned, data) < 0.3 < accuracy(model, data)  # gradient ascent destroyed the clean task
    # Same seed, one epoch fewer: still above the threshold, so it stopped as soon as it got there.
    _, previous = unlearn(copy.deepcopy(model), data, replace(FAST, unlearn_epochs=epochs - 1), generator())
    assert previous > FAST.clean_threshold


def test_the_recovery_mask_stays_in_the_unit_interval_and_leaves_the_unlearned_weights_alone(digits):
    model, data = digits
    unlearned = copy.deepcopy(model)
    unlearn(unlearned, data, FAST, generator())
    weights = {name: p.clone() for name, p in unlearned.named_parameters()}
    # A large step drives many values past the bounds, so the clipping is what keeps them in [0, 1].
    masks = learn_neuron_mask(unlearned, data, replace(FAST, recover_lr=20.0), generator())
    assert set(masks) == {name for name, _ in batch_norms(unlearned)}
    values = torch.cat(list(masks.values()))
    assert values.min() == 0 and values.max() == 1 and ((values > 0) & (values < 1)).any()
    assert all(torch.equal(p, weights[name]) for name, p in unlearned.named_parameters())


def test_the_original_model_is_returned_with_exactly_the_low_mask_channels_pruned(digits, monkeypatch):
    model, data = digits
    original = {name: t.clone() for name, t in model.state_dict().items()}
    learned, real = {}, rnp.learn_neuron_mask

    def spy(*args):  # records the mask the defense learns
        learned.update(real(*args))
        return learned

    monkeypatch.setattr(rnp, "learn_neuron_mask", spy)
    result = DEFENSES.get("rnp").run(model, data, FAST, CPU)
    assert isinstance(result, Defended)

    state = result.model.state_dict()
    low = {f"{name}.weight": mask <= FAST.prune_threshold for name, mask in learned.items()}
    pruned = sum(int(m.sum()) for m in low.values())
    assert 0 < pruned < sum(m.numel() for m in low.values())
    assert result.details["pruned_channels"] == pruned
    for name, before in original.items():
        expected = before.clone()
        if name in low:
            expected[low[name]] = 0
        # Everything else, BN shifts and running statistics included, is the original's: not the unlearned copy.
        assert torch.equal(state[name], expected), name


def test_the_threshold_is_inclusive_and_prune_bias_also_zeroes_the_shift():
    model = create_model("small_cnn", 2, 16)
    name, bn = batch_norms(model)[0]
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.5)
    mask = torch.ones(bn.num_features)
    mask[[1, 3]] = torch.tensor([0.7, 0.0])
    mask[2] = 0.71
    pruned = prune_low_mask_channels(model, {name: mask}, RNPParams())
    assert pruned == {name: [1, 3]}
    assert bn.weight[[1, 3]].eq(0).all() and bn.weight[[0, 2]].eq(2).all() and bn.bias.eq(0.5).all()
    prune_low_mask_channels(model, {name: mask}, RNPParams(prune_bias=True))
    assert bn.bias[[1, 3]].eq(0).all() and bn.bias[[0, 2]].eq(0.5).all()


# vgg19_bn passes too (checked by hand) but is left out for time: building its 139M-parameter head and
# taking SGD steps on it costs ~20 s on one busy CPU thread.
@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES.names() if a != "vgg19_bn"])
def test_runs_on_every_architecture(architecture):
    torch.manual_seed(0)
    model = create_model(architecture, 2, 32)
    data = MitigationData(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                          Normalisation((0.5,) * 3, (0.25,) * 3, True), 32, 2)
    result = DEFENSES.get("rnp").run(model, data, RNPParams(unlearn_epochs=1, recover_epochs=1), CPU)
    assert result.details["bn_channels"] == sum(bn.num_features for _, bn in batch_norms(result.model))
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    assert result.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_few_images_degrade_as_documented(digits):
    model, data = digits
    spc2 = subset(data, torch.cat([torch.nonzero(data.labels == c).flatten()[:2] for c in range(10)]))
    params = RNPParams(unlearn_epochs=2, recover_epochs=1)  # lr 0.01 cannot unlearn the digits in 2 epochs
    notes = DEFENSES.get("rnp").run(copy.deepcopy(model), spc2, params, CPU).details["notes"]
    assert any("20 mitigation images, fewer than batch_size 128" in n for n in notes)
    assert any("unlearning stopped at unlearn_epochs=2" in n for n in notes)

    before = {name: t.clone() for name, t in model.state_dict().items()}
    one = DEFENSES.get("rnp").run(model, subset(data, torch.tensor([0])), params, CPU)
    assert one.details["pruned_channels"] == 0 and "cannot train on fewer than 2" in one.details["notes"][0]
    assert all(torch.equal(t, before[name]) for name, t in one.model.state_dict().items())


def test_defend_stage_end_to_end_removes_the_backdoor(digits_backdoor):
    record = defend(digits_backdoor, "rnp", {"unlearn_lr": 0.05, "recover_epochs": 10}, out="rnp.json")
    assert record["status"] == "ok" and record["hyperparameters"]["unlearn_lr"] == 0.05
    table_row(record, "rnp.json")  # a valid run record for the aggregate stage
    details = record["details"]
    assert details["pruned_channels"] > 0 and isinstance(details["notes"], list)
    assert details["unlearned_train_accuracy"] <= 0.2
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.6
