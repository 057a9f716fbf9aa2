"""FP (fine-pruning): ranking the input of the first Linear, FORK's stop rule and the corrected one,
a mask that fine-tuning cannot revive, every architecture, too few data, and the defend stage end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bdsweep.defenses.fp as fp
from bdsweep.defenses import Defended, MitigationData
from bdsweep.defenses.fp import FPParams, fine_pruning
from bdsweep.engine import Normalisation
from bdsweep.models import ModelParts, create_model
from conftest import defend

pytestmark = pytest.mark.usefixtures("one_thread")

NORMALISATION = Normalisation((0.5,) * 3, (0.25,) * 3, hflip=False)
CPU = torch.device("cpu")
# Input-independent channels (1x1 conv with zero weight, bias b, then ReLU): their mean activation is b.
CONSTANT_CHANNELS = {0: 0.3, 1: 2.0, 2: 0.05, 3: 1.2, 4: 0.5, 5: 0.1, 6: 3.0, 8: 0.2, 9: 0.9}
INFORMATIVE = 7  # relu(normalised red): about 1.45 on class 1, 0 on class 0, so a mean of about 0.73


class KnownActivations(nn.Module):
    """Two classes told apart by the red channel through channel 7 alone; the other channels are
    constants the head ignores, so pruning them costs no accuracy and pruning channel 7 costs half."""

    parts = ModelParts(classifier="head", last_conv="features.0", stages=("features",), polarizer="features.0")

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 10, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(10, 2)
        with torch.no_grad():
            conv = self.features[0]
            conv.weight.zero_()
            conv.bias.zero_()
            for channel, value in CONSTANT_CHANNELS.items():
                conv.bias[channel] = value
            conv.weight[INFORMATIVE, 0] = 1.0
            self.head.weight.zero_()
            self.head.weight[1, INFORMATIVE] = 2.0
            self.head.bias.copy_(torch.tensor([0.0, -0.5]))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def red_blue_data(per_class: int = 4) -> MitigationData:
    labels = torch.arange(2).repeat_interleave(per_class)
    images = torch.full((len(labels), 4, 4, 3), 120, dtype=torch.uint8)
    images[..., 0] = torch.where(labels == 1, 220, 50).to(torch.uint8).view(-1, 1, 1)
    return MitigationData(images, labels, NORMALISATION, 4, 2)


def random_data(spc: int, classes: int, size: int) -> MitigationData:
    labels = torch.arange(classes).repeat_interleave(spc)
    images = torch.randint(0, 256, (len(labels), size, size, 3), dtype=torch.uint8)
    return MitigationData(images, labels, NORMALISATION, size, classes)


def plain_linears(model) -> bool:
    """No pruning re-parametrisation left behind: every Linear holds a plain weight again."""
    return all(not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
               for m in model.modules() if isinstance(m, nn.Linear))


# Ascending mean activation at the head's input: 0.05 (2), 0.1 (5), 0.2 (8), 0.3 (0), 0.5 (4), then
# channel 7 (~0.73), whose pruning halves the validation accuracy.
KNOWN = dict(step=0.1, epochs=0, augment_selection=False)


def test_fp_ranks_the_input_of_the_first_linear_and_returns_forks_breaking_level():
    torch.manual_seed(0)
    model = KnownActivations()
    before = model.head.weight.detach().clone()
    result = fine_pruning(model, red_blue_data(), FPParams(**KNOWN), CPU)
    assert isinstance(result, Defended)
    details = result.details
    assert details["layer"] == "head" and details["units"] == 10
    # FORK: level k masks k - 1 units, and the level that broke the rule (7: channel 7 masked) is returned.
    assert [step["pruned"] for step in details["trail"]] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [step["masked"] for step in details["trail"]] == [0, 0, 1, 2, 3, 4, 5, 6]
    assert details["trail"][-1]["held_out_accuracy"] == 0.5
    assert details["pruned"] == [2, 5, 8, 0, 4, 7] and details["pruned_channels"] == 6
    assert details["held_out_accuracy_before"] == 1.0 and details["held_out_accuracy_pruned"] == 0.5
    assert any("one held-out image (0.500 of 2)" in note for note in details["notes"])
    head = result.model.head
    assert plain_linears(result.model) and isinstance(head, nn.Linear)
    assert head.weight[:, [2, 5, 8, 0, 4, 7]].abs().max() == 0
    assert torch.equal(head.weight[:, [1, 3, 6, 9]], before[:, [1, 3, 6, 9]])


def test_the_corrected_rule_keeps_the_last_level_that_passed_with_k_units_masked():
    torch.manual_seed(0)
    result = fine_pruning(KnownActivations(), red_blue_data(), FPParams(**KNOWN, stop_rule="last_passing"), CPU)
    details = result.details
    assert [step["masked"] for step in details["trail"]] == [0, 1, 2, 3, 4, 5, 6]
    assert details["pruned"] == [2, 5, 8, 0, 4] and details["held_out_accuracy_pruned"] == 1.0
    assert result.model.head.weight[:, 7].abs().max() > 0


@pytest.mark.parametrize("accuracies, fork, last_passing", [
    ([0.8, 0.8, 0.75, 0.5], 3, 2),  # a 37.5 % fall at level 3
    ([0.5, 0.5, 0.6], 2, 1),  # a 20 % RISE also stops (two-sided)
    ([0.5, 0.4], 1, 0),  # the first level fails
    ([1.0, 0.95, 0.91, 0.95], 3, 3),  # never leaves the band: the last level tried
])
def test_the_stop_rule_as_a_pure_function(accuracies, fork, last_passing):
    assert fp.returned_level(accuracies, 0.1, "fork") == fork
    assert fp.returned_level(accuracies, 0.1, "last_passing") == last_passing
    assert fp.masked_units(5, "fork") == 4 and fp.masked_units(0, "fork") == 0
    # float64 as FORK: 1.0 -> 0.9 is 0.09999999999999998 relative and passes; 0.8 -> 0.72 is 0.10000000000000009
    assert fp.level_passes(0.9, 1.0, 0.1) and not fp.level_passes(36 / 50, 40 / 50, 0.1)
    assert fp.masked_units(5, "last_passing") == 5


def test_the_mask_survives_fine_tuning():
    torch.manual_seed(0)
    model = create_model("small_cnn", 4, 8)
    result = fine_pruning(model, random_data(spc=4, classes=4, size=8),
                          FPParams(step=0.25, max_relative_change=0.9, epochs=3, lr=0.5, batch_size=8), CPU)
    pruned = result.details["pruned"]
    assert pruned, "the test needs some pruned units"
    weight = result.model.classifier.weight
    assert plain_linears(result.model)
    assert torch.nonzero(weight.abs().sum(0) == 0).flatten().tolist() == sorted(pruned)
    assert weight.abs().sum() > 0


def test_the_ranked_layer_is_the_first_linear_in_module_order():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))

    assert fp.first_linear(TwoHeads()) == "classifier.0"
    assert fp.first_linear(create_model("mobilenet_v3_large", 2, 32)) == "classifier.0"
    preact = create_model("preact_resnet18", 2, 32)
    assert fp.first_linear(preact) == preact.parts.classifier
    with pytest.raises(ValueError, match="nn.Linear"):
        fp.first_linear(nn.Sequential(nn.Conv2d(3, 4, 1)))


# vgg19_bn is left out only for time: building its 139M-parameter head alone takes ~10 s on one busy core.
@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18", "efficientnet_b3", "mobilenet_v3_large"])
def test_fp_runs_on_every_architecture_with_two_images_per_class(name):
    torch.manual_seed(0)
    model = create_model(name, 2, 32)
    linear = model.get_submodule(fp.first_linear(model))
    result = fine_pruning(model, random_data(spc=2, classes=2, size=32), FPParams(step=0.25, epochs=1), CPU)
    details = result.details
    assert details["layer"] == fp.first_linear(model) and details["units"] == linear.in_features
    assert plain_linears(result.model)
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    assert result.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    assert any("fewer than the batch size" in note for note in details["notes"])


def test_too_few_data_degrade_as_documented():
    torch.manual_seed(0)
    params = FPParams(epochs=1)
    spc2 = fine_pruning(create_model("small_cnn", 10, 8), random_data(spc=2, classes=10, size=8), params, CPU)
    assert spc2.details["held_out_images"] == 10
    assert not any("overlap" in note for note in spc2.details["notes"])
    assert any("fewer than the batch size 256" in note for note in spc2.details["notes"])
    spc1 = fine_pruning(create_model("small_cnn", 10, 8), random_data(spc=1, classes=10, size=8), params, CPU)
    assert any("overlap" in note for note in spc1.details["notes"])
    one = fine_pruning(create_model("small_cnn", 1, 8), random_data(spc=1, classes=1, size=8), params, CPU)
    assert any("fine-tuning skipped" in note for note in one.details["notes"])


@pytest.mark.parametrize("field, value", [("step", 0.0), ("step", 1.5), ("max_relative_change", 1.0),
                                          ("max_relative_change", 0.0), ("stop_rule", "best"),
                                          ("epochs", -1), ("lr", 0.0), ("schedule", "step"), ("batch_size", 0)])
def test_params_reject_out_of_range_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        FPParams(**{field: value})


def test_fp_through_the_defend_stage_removes_the_backdoor(digits_backdoor):
    # Unaugmented validation: with FORK's augmented one, 10 validation images and a 10 % rule, the
    # augmentation alone flips one prediction at level 1 (measured 0.9 -> 1.0) and nothing is pruned.
    params = {"epochs": 20, "lr": 0.05, "batch_size": 32, "augment_selection": False}
    record = defend(digits_backdoor, "fp", params, out="fp.json")
    assert record["status"] == "ok" and record["defense"] == "fp" and record["family"] == "pruning"
    assert record["hyperparameters"]["step"] == 0.01 and record["details"]["pruned_channels"] > 0
    assert record["pre"]["asr"] > 0.7
    assert record["post"]["asr"] < 0.5 * record["pre"]["asr"]
    assert record["post"]["acc"] > 0.8
